"""The driver side of a training run: one path, `run`, for `pipelines.train` and sweep trials. It checks the
config against the world (`preflight`: shards, the MLflow server, teacher and init_from models) before anything
exists, opens the MLflow run, runs the loop (Ray Train workers running DeepSpeed, or this process with
engine.backend=local) and says how it ended (`RunResult`); `train` adds the export, the registry and the sample
grid. A run that fails once its MLflow run exists ends FAILED with the reason as the `fewstep.failure` tag."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import ray
import ray.data
import ray.train
import torch
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import save_file

from fewstep import lineage
from fewstep import teacher as teachers
from fewstep.backends import student_state_dict
from fewstep.cluster import connect_ray
from fewstep.config import ConfigError, TrainConfig
from fewstep.console import say, ui_hint
from fewstep.faults import DivergenceError
from fewstep.generator import STUDENT_WEIGHTS, Generator
from fewstep.images import DISPLAY_CELL, grid, save_png
from fewstep.loop import STATUS, Inputs, Place, train_loop
from fewstep.probe import check_reachable
from fewstep.tracking import (
    diverged,
    log_and_register,
    log_image_file,
    mark_failed,
    resolve_uri,
    run_url,
    start_or_resume_run,
)
from fewstep.worker import train_loop_per_worker

log = logging.getLogger("fewstep")
STATUS_TAG = "fewstep.status"  # finished | diverged | failed, of the run's last attempt


def storage_dir(cfg: TrainConfig, run_name: str) -> Path | None:
    """The run's directory in engine.storage_path when that is a local path (None for a storage URI)."""
    if "://" in cfg.engine.storage_path:
        return None
    return Path(os.path.expanduser(cfg.engine.storage_path)).absolute() / run_name


def resolve_inputs(cfg: TrainConfig, run_id: str, uri: str, teacher: str | None, init_from: str | None) -> Inputs:
    """What every copy of the loop needs besides the config: absolute paths and pinned versions, since workers run
    elsewhere and must all see the same files."""
    from fewstep.data.storage import absolute_spec, resolve_shards

    reference = resolve_shards(absolute_spec(cfg.data.test_shards)) if cfg.eval.fid_every else None
    return Inputs(run_id, uri, teacher, init_from, reference)


def loop_config(cfg: TrainConfig, run_name: str, inputs: Inputs) -> dict:
    status = storage_dir(cfg, run_name)
    return {"config": cfg.model_dump(mode="json"), "inputs": asdict(inputs),
            "status_dir": str(status) if status else None}


def fit(cfg: TrainConfig, run_name: str, inputs: Inputs, callbacks: list = ()) -> ray.train.Result:
    """One Ray Train run; `callbacks` are Train V2 UserCallbacks (a sweep forwards reports to Tune with one)."""
    e = cfg.engine
    # Per-operator progress bars flood `ray job logs`; rank 0 logs throughput and data wait instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": e.cpus_per_worker, **({"GPU": 1} if e.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, run_name, inputs),
        torch_config=TorchConfig(backend="nccl" if e.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=e.num_workers, use_gpu=e.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=os.path.expanduser(e.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=e.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=e.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


class LocalCheckpoints:
    """engine.backend=local: checkpoints as checkpoint_<step> folders of the run's storage directory, the newest
    engine.keep_checkpoints kept; a run with the same name resumes from the newest."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("checkpoint_*") if not p.name.endswith(".tmp"))

    def latest(self) -> Path | None:
        return (self.all() or [None])[-1]

    def report(self, metrics: dict, d: Path) -> None:
        dst = self.root / f"checkpoint_{metrics['step']:09d}"
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in d.iterdir():  # d is on the same filesystem (Place.scratch): renamed, not copied
            shutil.move(str(item), tmp / item.name)
        (tmp / "metrics.json").write_text(json.dumps(metrics))
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)  # a checkpoint appears whole or not at all
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old)


def fit_local(cfg: TrainConfig, run_name: str, inputs: Inputs) -> Path | None:
    """The same loop in this process (no Ray, no DeepSpeed); returns the newest checkpoint directory."""
    root = storage_dir(cfg, run_name)
    if root is None:
        raise ValueError("engine.backend=local needs a local engine.storage_path")
    checkpoints = LocalCheckpoints(root, cfg.engine.keep_checkpoints)
    place = Place(0, 1, torch.device("cpu"), checkpoints.latest(), checkpoints.report, root, scratch=root)
    train_loop(cfg, place, inputs)
    return checkpoints.latest()


def export_model(checkpoint_dir: Path, out: Path) -> Path:
    """The registry's model directory from a final checkpoint: rank 0's EMA export (weights.safetensors,
    config.yaml) plus the student consolidated from every rank's ZeRO partitions into one fp32 state_dict
    (student.safetensors). Neither needs DeepSpeed to load."""
    shutil.copytree(checkpoint_dir / "model", out, dirs_exist_ok=True)
    save_file(student_state_dict(checkpoint_dir), str(out / STUDENT_WEIGHTS))
    return out


def resolve_teacher(cfg: TrainConfig, uri: str) -> str | None:
    """multistep_cd: the teacher pinned to a version (or an absolute directory), checked against the config."""
    ref = cfg.objective.teacher_ref
    if not ref:
        return None
    pinned = teachers.pin(ref, uri)
    teachers.check_compatible(cfg, teachers.teacher_config(pinned, uri))
    log.info("teacher %s -> %s", ref, pinned)
    return pinned


@dataclass
class RunResult:
    """How a run ended. finished: trained to total_steps; diverged: stopped by the divergence guard (`checkpoint` is
    the last good one, or None); failed: an error (`error`)."""

    status: Literal["finished", "diverged", "failed"]
    run_id: str
    run_name: str
    checkpoint: Path | None
    metrics: dict = field(default_factory=dict)
    message: str = ""
    error: BaseException | None = None
    seconds: float = 0.0


def read_status(cfg: TrainConfig, run_name: str, client: MlflowClient, run_id: str) -> dict:
    """The run's own record of how it ended (rank 0 writes it into the run's storage); else the MLflow tag."""
    root = storage_dir(cfg, run_name)
    if root is not None and (root / STATUS).is_file():
        return json.loads((root / STATUS).read_text())
    message = diverged(client, run_id)
    return {"status": "diverged", "message": message} if message else {"status": "finished"}


@dataclass
class Preflight:
    """What `preflight` resolved: the config with absolute shard paths, the tracking URI, the pinned models."""

    cfg: TrainConfig
    uri: str
    teacher: str | None
    init_from: str | None


def preflight(cfg: TrainConfig) -> Preflight:
    """Everything a run needs from the world, checked before an MLflow run or a Ray connection exists (and by
    `pipelines.train --dry-run`): the shards and test shards exist and are not empty, the MLflow server answers
    within a few seconds, the teacher and init_from models resolve and fit the config, the model samples at every
    eval step count. Errors name the field."""
    from fewstep.data.storage import absolute_spec, resolve_shards
    from fewstep.objectives import capabilities

    steps = capabilities(cfg).steps  # the sample grids and FIDs of the run, not found out at its first evaluation
    for key, counts in (("eval.steps", cfg.eval.steps), ("eval.fid_steps", cfg.eval.fid_steps or [])):
        for k in counts:
            try:
                steps.check(k, f"objective.name={cfg.objective.name}")
            except ValueError as e:
                raise ConfigError(f"{key}: {e}: set it to counts the model samples, e.g. --set {key}=[{steps.lo}]"
                                  ) from None
    # Workers resolve shards themselves (each rank streams its own); here the spec is made absolute and checked.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": absolute_spec(cfg.data.shards)})})
    for key, spec in (("data.shards", cfg.data.shards), ("data.test_shards", cfg.data.test_shards)):
        if spec is None:
            continue
        try:
            resolve_shards(spec)
        except OSError as e:  # none there, or an unreachable bucket
            unset = "" if key == "data.shards" else " (or set data.test_shards=null: no FID reference)"
            raise ConfigError(f"{key}: {e}: point {key} at your shards or write them with "
                              f"`python -m pipelines.prepare_data`{unset}") from None
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    teacher = resolve_teacher(cfg, uri)
    return Preflight(cfg, uri, teacher, lineage.resolve(cfg, uri, teacher))


def run(cfg: TrainConfig, run_name: str, callbacks: list = (), before_fit=None) -> RunResult:
    """Check, open (or find again) the MLflow run, train, and report how it ended; a diverged or failed run is
    marked FAILED in MLflow with the reason as a tag. `before_fit(run_id)` runs once the MLflow run exists (sweeps
    tag their trials there)."""
    pre = preflight(cfg)
    cfg, uri = pre.cfg, pre.uri
    run_id = start_or_resume_run(cfg, run_name, uri)
    client = MlflowClient(uri)
    with fail_run_on_error(client, run_id):
        out = _run(cfg, run_name, pre, run_id, client, callbacks, before_fit)
    client.set_tag(run_id, STATUS_TAG, out.status)  # every attempt sets it: a resumed run that finishes is clean
    if out.status != "finished":
        mark_failed(client, run_id, out.message or out.status)
    return out


@contextlib.contextmanager
def fail_run_on_error(client: MlflowClient, run_id: str):
    """An exception inside ends the MLflow run FAILED (Ctrl-C: KILLED) with the reason as a tag; it is raised on."""
    try:
        yield
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        try:
            client.set_tag(run_id, STATUS_TAG, "failed")
            mark_failed(client, run_id, "interrupted" if interrupted else f"{type(e).__name__}: {e}",
                        "KILLED" if interrupted else "FAILED")
        except Exception:  # noqa: BLE001  the original error matters more than the mark
            log.exception("could not mark MLflow run %s as failed", run_id)
        raise


def _run(cfg: TrainConfig, run_name: str, pre: Preflight, run_id: str, client: MlflowClient, callbacks,
         before_fit) -> RunResult:
    diverged(client, run_id, clear=True)  # a resumed attempt starts clean
    teacher_ref, init_ref = pre.teacher, pre.init_from
    if teacher_ref:
        teacher_ref = lineage.record(client, run_id, lineage.TEACHER_TAG, teacher_ref)
    if init_ref:
        init_ref = lineage.record(client, run_id, lineage.PARENT_TAG, init_ref)
    inputs = resolve_inputs(cfg, run_id, pre.uri, teacher_ref, init_ref)
    if before_fit:
        before_fit(run_id)
    root = storage_dir(cfg, run_name)
    if root is not None:
        (root / STATUS).unlink(missing_ok=True)
    t0 = time.time()
    if cfg.engine.backend == "local":
        try:
            checkpoint, error = fit_local(cfg, run_name, inputs), None
        except Exception as e:  # noqa: BLE001  reported as the run's outcome, raised by train()
            checkpoint, error = LocalCheckpoints(root, 1).latest(), e
        metrics = json.loads((checkpoint / "metrics.json").read_text()) if checkpoint else {}
    else:
        connect_ray(cfg.engine.ray_address)
        try:
            result = fit(cfg, run_name, inputs, callbacks)
            checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
            metrics, error = dict(result.metrics or {}), result.error
        except ray.train.TrainingFailedError as e:  # Train V2 raises a worker group's (or controller's) failure
            checkpoint, metrics, error = None, {}, e
    seconds = time.time() - t0
    status = read_status(cfg, run_name, client, run_id)
    if error is not None:
        return RunResult("failed", run_id, run_name, checkpoint, metrics, f"{type(error).__name__}: {error}", error,
                         seconds)
    if status["status"] == "diverged":
        return RunResult("diverged", run_id, run_name, checkpoint, metrics, status.get("message", ""), None, seconds)
    return RunResult("finished", run_id, run_name, checkpoint, metrics, "", None, seconds)


@dataclass
class RunSummary:
    run_id: str
    run_url: str
    registered_model: str | None
    version: str | None
    samples_png: Path
    steps: int
    seconds: float


def train(cfg: TrainConfig, run_name: str | None = None, output_dir: str | Path = "outputs") -> RunSummary:
    """Train, track, export the EMA generator, register it, and write a sample grid."""
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    r = run(cfg, run_name)
    if r.status == "failed":
        raise r.error
    if r.status == "diverged":
        where = r.checkpoint or "none (diverged before the first checkpoint)"
        raise DivergenceError(
            f"run {run_name}: {r.message}: {where}. Fix the cause (lr, data, precision) and re-run with the same "
            "run name to resume from that checkpoint."
        )
    with fail_run_on_error(MlflowClient(resolve_uri(cfg.tracking.uri)), r.run_id):
        return _publish(cfg, run_name, r, output_dir)


def _publish(cfg: TrainConfig, run_name: str, r: RunResult, output_dir: str | Path) -> RunSummary:
    """A finished run's model exported, registered (the MLflow run ends FINISHED there) and sampled."""
    if r.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    uri = resolve_uri(cfg.tracking.uri)
    out = Path(output_dir) / run_name
    model_dir = export_model(r.checkpoint, out / "model")
    generator = Generator.from_dir(model_dir)
    name, version = log_and_register(r.run_id, model_dir, cfg, uri)
    # samples of the same classes, rows = eval.steps
    n = cfg.eval.grid_size
    labels = generator.grid_labels(n)
    rows = [generator.generate(n, num_steps=k, seed=0, labels=labels) for k in cfg.eval.steps]
    image = grid(np.concatenate(rows), n, cell=DISPLAY_CELL)
    png = save_png(image, out / "samples.png")
    log_image_file(r.run_id, image, "samples/final.png", uri)
    if hint := ui_hint(uri):
        say(hint)
    return RunSummary(r.run_id, run_url(uri, r.run_id), name, version, png.resolve(), r.metrics["step"], r.seconds)
