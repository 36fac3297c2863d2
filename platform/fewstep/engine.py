"""The driver side of a training run: cluster connection, Ray Train TorchTrainer, MLflow run, registry."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.data
import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import save_file

from fewstep import teacher as teachers
from fewstep.config import TrainConfig
from fewstep.distributed import consolidated_state_dict
from fewstep.faults import DivergenceError
from fewstep.generator import STUDENT_WEIGHTS, Generator
from fewstep.images import grid, save_png
from fewstep.tracking import (
    diverged,
    log_and_register,
    log_image_file,
    resolve_uri,
    run_url,
    start_or_resume_run,
)
from fewstep.worker import TAG, train_loop_per_worker

log = logging.getLogger("fewstep")
TEACHER_TAG = "fewstep.teacher"


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the running cluster (RAY_ADDRESS, a `ray job`, or `ray start` on this machine); else start a
    local one with more logical CPUs than the workers reserve, so Ray Data keeps a budget (STACK.md)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        log.info("connected to the running Ray cluster")
    except ConnectionError:
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, object_store_memory=1024**3, include_dashboard=False)
        log.info("started a local Ray cluster (%d logical CPUs)", cpus)


def fit(
    cfg: TrainConfig, run_name: str, run_id: str, uri: str, teacher_ref: str | None = None, callbacks: list = ()
) -> ray.train.Result:
    """One Ray Train run; `callbacks` are Train V2 UserCallbacks (a sweep forwards reports to Tune with one)."""
    from fewstep.data.storage import absolute_spec, resolve_shards

    # Data: workers resolve shards themselves (each rank streams its own, fewstep.data.stream); here the spec is
    # made absolute and checked, so an empty shard list or an unreachable bucket fails before workers start.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": absolute_spec(cfg.data.shards)})})
    resolve_shards(cfg.data.shards)
    e = cfg.engine
    # Absolute paths and a pinned teacher version: workers run elsewhere and must all see the same files.
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "run_id": run_id,
        "tracking_uri": uri,
        "teacher": teacher_ref,
        "fid_reference": resolve_shards(absolute_spec(cfg.data.test_shards)) if cfg.eval.fid_every else None,
    }
    # Per-operator progress bars flood `ray job logs`; rank 0 logs throughput and data wait instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": e.cpus_per_worker, **({"GPU": 1} if e.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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


def export_model(checkpoint_dir: Path, out: Path) -> Path:
    """The registry's model directory from a final checkpoint: rank 0's EMA export (weights.safetensors,
    config.yaml) plus the student consolidated from every rank's ZeRO partitions into one fp32 state_dict
    (student.safetensors). Neither needs DeepSpeed to load."""
    shutil.copytree(checkpoint_dir / "model", out, dirs_exist_ok=True)
    save_file(consolidated_state_dict(checkpoint_dir, TAG), str(out / STUDENT_WEIGHTS))
    return out


def resolve_teacher(cfg: TrainConfig, uri: str) -> str | None:
    """multistep_cd: the teacher pinned to a version (or an absolute directory), checked against the config."""
    ref = getattr(cfg.objective, "teacher", None)
    if not ref:
        return None
    pinned = teachers.pin(ref, uri)
    teachers.check_compatible(cfg, teachers.teacher_config(pinned, uri))
    log.info("teacher %s -> %s", ref, pinned)
    return pinned


def record_teacher(run_id: str, pinned: str, uri: str) -> str:
    """The teacher this MLflow run distils, as a run tag; a resumed run keeps the teacher it started with even
    if the alias has moved since."""
    client = MlflowClient(uri)
    first = client.get_run(run_id).data.tags.get(TEACHER_TAG)
    if first and first != pinned:
        log.warning("resuming with the run's original teacher %s (the alias now points at %s)", first, pinned)
    client.set_tag(run_id, TEACHER_TAG, first or pinned)
    return first or pinned


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
    uri = resolve_uri(cfg.tracking.uri)
    teacher_ref = resolve_teacher(cfg, uri)  # before the run exists: a bad teacher is a config error
    run_id = start_or_resume_run(cfg, run_name, uri)
    client = MlflowClient(uri)
    diverged(client, run_id, clear=True)  # a resumed attempt starts clean
    if teacher_ref:
        teacher_ref = record_teacher(run_id, teacher_ref, uri)
    connect_ray()
    t0 = time.time()
    result = fit(cfg, run_name, run_id, uri, teacher_ref)
    seconds = time.time() - t0
    if result.error:
        raise result.error
    message = diverged(client, run_id)
    if message:
        client.set_terminated(run_id, "FAILED")
        where = result.checkpoint.path if result.checkpoint else "none (diverged before the first checkpoint)"
        raise DivergenceError(
            f"run {run_name}: {message}: {where}. Fix the cause (lr, data, precision) and re-run with the same "
            "run name to resume from that checkpoint."
        )
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    out = Path(output_dir) / run_name
    with result.checkpoint.as_directory() as d:
        model_dir = export_model(Path(d), out / "model")
    generator = Generator.from_dir(model_dir)
    name, version = log_and_register(run_id, model_dir, cfg, uri)
    # 1-step and 2-step samples of the same classes, rows = steps
    n = cfg.eval.grid_size
    labels = generator.grid_labels(n)
    rows = [generator.generate(n, num_steps=k, seed=0, labels=labels) for k in cfg.eval.steps]
    image = grid(np.concatenate(rows), n)
    png = save_png(image, out / "samples.png")
    log_image_file(run_id, image, "samples/final.png", uri)
    return RunSummary(run_id, run_url(uri, run_id), name, version, png.resolve(), result.metrics["step"], seconds)
