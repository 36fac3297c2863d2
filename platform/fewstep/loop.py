"""The training loop of one rank, the same for a Ray Train worker and for the local backend: build, restore, then
`train_step` until total_steps, handing off to three parts that each decide when they run: the metrics logger,
the evaluator (sample grids, FID) and the checkpointer. Where it runs (rank, device, how a checkpoint is handed
over) comes in as a `Place`: fewstep.worker makes one for Ray Train, fewstep.engine one for a local run."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from fewstep import lineage
from fewstep import teacher as teachers
from fewstep.backends import build_backend, micro_batch
from fewstep.config import TrainConfig
from fewstep.console import say, timing
from fewstep.data.stream import TrainStream
from fewstep.distributed import enable_activation_checkpointing
from fewstep.ema import PosthocEMA, build_ema
from fewstep.evaluation import TrainingFID
from fewstep.faults import DebugHooks, DivergenceGuard
from fewstep.generator import Generator
from fewstep.images import DISPLAY_CELL, grid
from fewstep.objectives import build_model, build_objective
from fewstep.tracking import last_logged_step, mark_diverged
from fewstep.train_step import train_step

STATE = "trainer_state.json"
STATUS = "run_status.json"  # the run's outcome, written into its storage by rank 0 (read by the driver)


@dataclass
class Inputs:
    """What the driver resolved for every copy of the loop: absolute, pinned, the same on every rank."""

    run_id: str
    tracking_uri: str
    teacher: str | None = None  # the pinned distillation teacher
    init_from: str | None = None  # the pinned model the student starts from
    fid_reference: list[str] | None = None  # the test shards of the in-training FID


@dataclass
class Place:
    """Where one copy of the loop runs."""

    rank: int
    world: int
    device: torch.device
    restored: Path | None  # the checkpoint directory to resume from (None: a fresh start)
    report: Callable[[dict[str, Any], Path], None]  # hand a saved checkpoint directory and its metrics over
    status_dir: Path | None  # the run's local storage directory, where rank 0 writes STATUS (None: remote storage)
    scratch: Path | None = None  # where checkpoints are written before `report` (its filesystem: moved, not copied)


def _log(mlflow: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    ts = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])


class MetricsLogger:
    """Rank 0: loss, lr, throughput and data wait every engine.log_every steps, to MLflow and stdout (with the time
    since this attempt's first step and the ETA)."""

    def __init__(self, cfg: TrainConfig, mlflow: MlflowClient, run_id: str, images_per_step: int, logged_through: int,
                 first_step: int = 0):
        self.cfg, self.mlflow, self.run_id, self.images_per_step = cfg, mlflow, run_id, images_per_step
        self.logged_through = logged_through  # a restore replays steps after the checkpoint: log each step once
        self.first_step, self.started = first_step, time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.wait, self.t0 = 0.0, 0, 0.0, time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.cfg.engine.log_every == 0 or step == self.cfg.optim.total_steps

    def log(self, step: int, epoch: int, info: dict[str, float], lr: float, skipped: int) -> None:
        elapsed = time.perf_counter() - self.t0
        metrics = {"loss": self.loss / self.n, **info, "lr": lr,
                   "images_per_s": self.n * self.images_per_step / elapsed,
                   "data_wait_frac": self.wait / elapsed, "epoch": float(epoch), "skipped_steps": float(skipped)}
        if step > self.logged_through:
            _log(self.mlflow, self.run_id, metrics, step)
            total = self.cfg.optim.total_steps
            say(f"step {step}/{total} loss {metrics['loss']:.4f} " + "".join(f"{k} {v:g} " for k, v in info.items())
                + f"{metrics['images_per_s']:.0f} img/s data-wait {100 * metrics['data_wait_frac']:.1f}% | "
                + timing(step, total, self.first_step, time.perf_counter() - self.started))
        self.reset()


class Evaluator:
    """Rank 0: sample grids of the EMA model every eval.every steps, FID every eval.fid_every (and at the end)."""

    def __init__(self, cfg: TrainConfig, mlflow: MlflowClient, run_id: str, ema: AveragedModel, text, fid_reference,
                 logged_through: int):
        self.cfg, self.mlflow, self.run_id, self.ema, self.text = cfg, mlflow, run_id, ema, text
        self.fid = TrainingFID(cfg, fid_reference) if cfg.eval.fid_every else None
        self.logged_through = logged_through
        self.last_fid: dict[str, float] = {}  # rides in every later checkpoint report (Tune ranks trials by it)

    def __call__(self, step: int) -> None:
        e, last = self.cfg.eval, step == self.cfg.optim.total_steps
        if step <= self.logged_through:
            return
        gen = Generator(self.ema.module, self.cfg, self.text)
        if step % e.every == 0 or last:
            n = e.grid_size**2
            for k in e.steps:
                imgs = gen.generate(n, num_steps=k, seed=0, labels=gen.grid_labels(n))
                image = grid(imgs, e.grid_size, cell=DISPLAY_CELL)
                self.mlflow.log_image(self.run_id, image, key=f"samples_{k}step", step=step)
        if self.fid is not None and (step % e.fid_every == 0 or last):
            scores = self.fid(gen)
            if not self.last_fid:  # which reference these FIDs are measured against (compare only equal hashes)
                ref = self.fid.reference
                for key, value in (("fid_train_reference_sha256", ref.sha256), ("fid_train_reference_n", ref.n)):
                    self.mlflow.set_tag(self.run_id, key, str(value))
            _log(self.mlflow, self.run_id, {f"fid_steps_{k}": v for k, v in scores.items()}, step)
            self.last_fid.update({f"fid_steps_{k}": v for k, v in scores.items()})
            say(f"step {step} FID ({e.fid_n} samples) " + " ".join(f"{k}:{v:.1f}" for k, v in scores.items()))


class Checkpointer:
    """Every rank, every engine.checkpoint_every steps and at the end: the backend's state (its ZeRO partition),
    this rank's RNG; rank 0 adds the EMA export and the run state (step, metrics, data position)."""

    def __init__(self, cfg: TrainConfig, place: Place, backend, ema, data: TrainStream, mlflow, run_id: str):
        self.cfg, self.place, self.backend, self.ema, self.data = cfg, place, backend, ema, data
        self.mlflow, self.run_id = mlflow, run_id
        self.saved = 0  # the last step this run can fall back to

    def due(self, step: int) -> bool:
        return step % self.cfg.engine.checkpoint_every == 0 or step == self.cfg.optim.total_steps

    def restore(self, d: Path) -> tuple[int, int]:
        """(step, skipped steps) of checkpoint d, with the backend, RNG and EMA restored."""
        self.backend.load(d)
        state = json.loads((d / STATE).read_text())
        step = state["step"]
        torch.set_rng_state(torch.load(d / f"rng_rank{self.place.rank}.pt", weights_only=True))
        cuda = d / f"cuda_rng_rank{self.place.rank}.pt"
        if cuda.is_file() and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(torch.load(cuda, weights_only=True))
        if isinstance(self.ema, PosthocEMA):
            self.ema.restore(d)
        elif self.ema is not None:
            self.ema.module.load_state_dict(load_file(str(d / "model" / "weights.safetensors")))
            self.ema.n_averaged.fill_(max(step, 1))
        self.saved = step
        return step, int(state.get("skipped_steps", 0))

    def save(self, step: int, metrics: dict[str, float]) -> None:
        self.saved = step
        position = self.data.state()  # every rank (it gathers the data position and skip counts of all ranks)
        if self.mlflow is not None:
            _log(self.mlflow, self.run_id, self.data.metrics(), step)
        if self.place.scratch is not None:
            self.place.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.place.scratch) as tmp:
            d = Path(tmp)
            self.backend.save(d)
            torch.save(torch.get_rng_state(), d / f"rng_rank{self.place.rank}.pt")
            if torch.cuda.is_available():
                torch.save(torch.cuda.get_rng_state_all(), d / f"cuda_rng_rank{self.place.rank}.pt")
            if self.ema is not None:
                Generator(self.ema.module, self.cfg).save(d / "model")
                if isinstance(self.ema, PosthocEMA):
                    self.ema.save(d, step)
                (d / STATE).write_text(json.dumps({"step": step, **metrics, "data": position}))
            self.place.report({"step": step, **metrics}, d)


def data_position(restored: Path | None) -> dict | None:
    return json.loads((restored / STATE).read_text()).get("data") if restored else None


def write_status(place: Place, status: dict[str, Any]) -> None:
    if place.rank == 0 and place.status_dir is not None:
        place.status_dir.mkdir(parents=True, exist_ok=True)
        (place.status_dir / STATUS).write_text(json.dumps(status))


def train_loop(cfg: TrainConfig, place: Place, inputs: Inputs) -> str:
    """Train this rank to cfg.optim.total_steps (or divergence); returns 'finished' or 'diverged'."""
    rank, world, device = place.rank, place.world, place.device
    run_id, tracking_uri = inputs.run_id, inputs.tracking_uri
    torch.set_num_threads(cfg.engine.threads_per_worker)
    write_status(place, {"status": "running"})
    # 0. data first: this rank's stream starts reading (resumed at shard granularity) while the model is set up
    micro = micro_batch(cfg)
    data = TrainStream(cfg.data, rank, world, micro, resume=data_position(place.restored),
                       local=cfg.engine.backend == "local").start()

    # 1. identical initial weights on every rank (seeded, or the pinned init_from model's), then rank-specific
    #    noise streams. The teacher is small: every rank holds a frozen copy outside the backend.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if inputs.init_from and not place.restored:
        lineage.load_into(model, inputs.init_from, tracking_uri)
    objective = build_objective(cfg)
    teacher = teachers.load(inputs.teacher, tracking_uri, device) if inputs.teacher else None
    text = None
    if cfg.text.enabled:  # text-to-image: a frozen encoder on every rank
        from fewstep.text import TextEncoder

        text = TextEncoder(cfg.text, device)
    if teacher is not None:
        teacher = objective.prepare_teacher(teacher, text)
    if cfg.engine.activation_checkpointing:
        enable_activation_checkpointing(model)
    backend = build_backend(cfg, model.to(device), world)
    torch.manual_seed(cfg.seed * 1000 + rank)
    ema = build_ema(cfg, device, place.scratch) if rank == 0 else None
    accum = backend.gradient_accumulation_steps()

    # 2. the parts, and the restore
    mlflow = MlflowClient(tracking_uri) if rank == 0 else None
    ckpt = Checkpointer(cfg, place, backend, ema, data, mlflow, run_id)
    step, skipped = ckpt.restore(place.restored) if place.restored else (0, 0)
    logged_through = last_logged_step(mlflow, run_id) if mlflow and place.restored else 0
    if mlflow and place.restored:
        mlflow.log_metric(run_id, "resumed_from_step", step, step=step)
    guard = DivergenceGuard(cfg.engine.max_bad_steps, world, skipped)
    hooks = DebugHooks(cfg.engine.debug, rank, Path(os.path.expanduser(cfg.engine.storage_path)), run_id)
    logger = MetricsLogger(cfg, mlflow, run_id, micro * accum * world, logged_through, step) if mlflow else None
    evaluate = Evaluator(cfg, mlflow, run_id, ema, text, inputs.fid_reference, logged_through) if mlflow else None
    conditional = cfg.network.num_classes > 0

    stream = iter(data)
    while step < cfg.optim.total_steps:
        # 3. one micro-batch; the backend applies the optimizer at every `accum`-th (its global_steps is the truth)
        t = time.perf_counter()
        epoch, batch = next(stream)
        wait = time.perf_counter() - t
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device) if conditional else None
        if text is not None:  # caption dropout from this rank's torch stream (seeded, saved in checkpoints)
            y = text.condition(batch["caption"], cfg.text.caption_dropout)
        out = train_step(backend, objective, x, y, step, guard, teacher=teacher, ema=ema, corrupt=hooks.corrupt)
        if logger:
            logger.wait += wait
        if out.skipped:
            if rank == 0:
                say(f"step {step + 1}: non-finite loss, skipped ({guard.in_a_row} in a row)")
            if guard.diverged:  # stop without a checkpoint: the last good one stays the latest
                message = guard.message(step + 1, ckpt.saved)
                if mlflow:
                    mark_diverged(mlflow, run_id, message)
                write_status(place, {"status": "diverged", "message": message, "step": step + 1,
                                     "last_checkpoint": ckpt.saved})
                return "diverged"  # a normal return on every rank: Ray Train would retry a raised error
            continue
        if logger:
            logger.loss += out.loss / accum
        if not out.stepped:
            continue
        step = backend.global_steps
        if logger:
            logger.n += 1
            if logger.due(step):
                logger.log(step, epoch, out.info, backend.get_lr()[0], guard.skipped)
            evaluate(step)
        if ckpt.due(step):
            ckpt.save(step, {"loss": float(out.loss), **out.info, **(evaluate.last_fid if evaluate else {}),
                             "skipped_steps": float(guard.skipped)})
        hooks.after_step(step)
    write_status(place, {"status": "finished", "step": step})
    return "finished"
