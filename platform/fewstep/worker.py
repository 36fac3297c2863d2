"""The per-worker training loop that Ray Train runs on every rank: DeepSpeed engine, data shard, frozen teacher
(distillation), EMA, metrics (rank 0), sample grids and FID (rank 0), checkpoints (every rank)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from fewstep import teacher as teachers
from fewstep.config import TrainConfig
from fewstep.data.stream import TrainStream
from fewstep.distributed import (
    build_optimizer,
    deepspeed_config,
    ema_update,
    enable_activation_checkpointing,
    gathered,
    lr_schedule,
)
from fewstep.evaluation import TrainingFID
from fewstep.faults import DebugHooks, DivergenceGuard
from fewstep.generator import Generator
from fewstep.images import grid
from fewstep.objectives import build_model, build_objective
from fewstep.tracking import last_logged_step, mark_diverged

STATE = "trainer_state.json"
TAG = "ds"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.engine.threads_per_worker)
    device = ray.train.torch.get_device() if cfg.engine.use_gpu else torch.device("cpu")

    # 0. data first: this rank's stream starts reading (resumed at shard granularity, fewstep.data.stream) while
    #    the model and DeepSpeed are set up
    ckpt = ray.train.get_checkpoint()
    data_state = None
    if ckpt:
        with ckpt.as_directory() as d:
            data_state = json.loads((Path(d) / STATE).read_text()).get("data")
    micro = deepspeed_config(cfg, world)["train_micro_batch_size_per_gpu"]
    data = TrainStream(cfg.data, rank, world, micro, resume=data_state).start()

    # 1. identical initial weights on every rank (the teacher's, when distilling with init_from_teacher), then
    #    rank-specific noise streams. The teacher is small: every rank holds a frozen copy outside DeepSpeed.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    teacher = None
    if loop_config.get("teacher"):
        teacher = teachers.load(loop_config["teacher"], loop_config["tracking_uri"], device)
        if cfg.objective.init_from_teacher:
            teachers.init_student(model, teacher)
    text = None
    if cfg.text.enabled:  # text-to-image: a frozen encoder on every rank; CD guides the teacher with it
        from fewstep.text import Guided, TextEncoder

        text = TextEncoder(cfg.text, device)
        if teacher is not None:
            teacher = Guided(teacher, text, cfg.objective.guidance)
    if cfg.engine.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_schedule(optimizer, cfg.optim),
        config=deepspeed_config(cfg, world),
    )
    torch.manual_seed(cfg.seed * 1000 + rank)
    objective = build_objective(cfg)
    ema = AveragedModel(build_model(cfg), multi_avg_fn=ema_update(cfg.ema.decay)) if rank == 0 else None
    accum = engine.gradient_accumulation_steps()

    # 2. resume: DeepSpeed state (weights, optimizer, scheduler), EMA, step counter, RNG of this rank
    step, skipped = 0, 0
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            state = json.loads((Path(d) / STATE).read_text())
            step, skipped = state["step"], int(state.get("skipped_steps", 0))
            torch.set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=True))
            if ema is not None:
                ema.module.load_state_dict(load_file(str(Path(d) / "model" / "weights.safetensors")))
                ema.n_averaged.fill_(max(step, 1))

    mlflow = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["run_id"]
    # A restore replays the steps after the checkpoint: log only steps the run's history lacks, so that
    # every step appears once in MLflow (the replayed steps keep the values of their first attempt).
    logged_through = last_logged_step(mlflow, run_id) if mlflow and ckpt else 0
    if mlflow and ckpt:
        mlflow.log_metric(run_id, "resumed_from_step", step, step=step)
    saved = step  # the last checkpoint this run can fall back to
    guard = DivergenceGuard(cfg.engine.max_bad_steps, world, skipped)
    hooks = DebugHooks(cfg.engine.debug, rank, Path(os.path.expanduser(cfg.engine.storage_path)), run_id)
    window = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter()}
    conditional = cfg.network.num_classes > 0

    def checkpoint(metrics: dict[str, float]) -> None:
        # Every rank saves its ZeRO partition and reports; rank 0 adds the EMA export and run state.
        nonlocal saved
        saved = step
        metrics = {**metrics, "skipped_steps": float(guard.skipped)}
        position = data.state()  # every rank (it gathers the data position and skip counts of all ranks)
        if mlflow is not None:  # samples read / skipped by reason, all ranks
            ts = int(time.time() * 1000)
            mlflow.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in data.metrics().items()])
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=TAG)
            torch.save(torch.get_rng_state(), Path(d) / f"rng_rank{rank}.pt")
            if ema is not None:
                Generator(ema.module, cfg).save(Path(d) / "model")
                (Path(d) / STATE).write_text(json.dumps({"step": step, **metrics, "data": position}))
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d))

    def log_samples() -> None:
        gen = Generator(ema.module, cfg, text)
        n = cfg.eval.grid_size**2
        for k in cfg.eval.steps:
            imgs = gen.generate(n, num_steps=k, seed=0, labels=gen.grid_labels(n))
            mlflow.log_image(run_id, grid(imgs, cfg.eval.grid_size), key=f"samples_{k}step", step=step)
        gen.model.train()  # Generator switched the EMA module to eval mode

    def log_metrics(epoch: int, info: dict[str, float]) -> None:
        elapsed = time.perf_counter() - window["t0"]
        metrics = {
            "loss": window["loss"] / window["n"],
            **info,
            "lr": engine.get_lr()[0],
            "images_per_s": window["n"] * micro * accum * world / elapsed,
            "data_wait_frac": window["wait"] / elapsed,
            "epoch": float(epoch),
            "skipped_steps": float(guard.skipped),
        }
        ts = int(time.time() * 1000)
        mlflow.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        print(
            f"step {step}/{cfg.optim.total_steps} loss {metrics['loss']:.4f} "
            + "".join(f"{k} {v:g} " for k, v in info.items())
            + f"{metrics['images_per_s']:.0f} img/s data-wait {100 * metrics['data_wait_frac']:.1f}%",
            flush=True,
        )

    fid = TrainingFID(cfg, loop_config["fid_reference"]) if rank == 0 and cfg.eval.fid_every else None
    last_fid: dict[str, float] = {}  # the latest FID rides in every later checkpoint report (Tune ranks trials by it)

    def log_fid() -> None:
        gen = Generator(ema.module, cfg, text)
        scores = fid(gen)
        gen.model.train()
        ts = int(time.time() * 1000)
        mlflow.log_batch(run_id, metrics=[Metric(f"fid_steps_{k}", v, ts, step) for k, v in scores.items()])
        last_fid.update({f"fid_steps_{k}": v for k, v in scores.items()})
        print(f"step {step} FID ({cfg.eval.fid_n} samples) " + " ".join(f"{k}:{v:.1f}" for k, v in scores.items()),
              flush=True)

    stream = iter(data)
    while step < cfg.optim.total_steps:
        # 3. one micro-batch; DeepSpeed applies the optimizer at every `accum`-th (its global_steps is the truth)
        t = time.perf_counter()
        epoch, batch = next(stream)
        window["wait"] += time.perf_counter() - t
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device) if conditional else None
        if text is not None:  # caption dropout from this rank's torch stream (seeded, saved in checkpoints)
            y = text.condition(batch["caption"], cfg.text.caption_dropout)
        loss, info = objective.loss(engine, x, y, step, **({"teacher": teacher} if teacher else {}))
        loss = hooks.corrupt(loss)
        # 4. divergence guard: a NaN/inf loss on any rank skips this micro-batch on every rank
        if guard.bad(loss):
            if rank == 0:
                print(f"step {step + 1}: non-finite loss, skipped ({guard.in_a_row} in a row)", flush=True)
            if guard.diverged:  # stop without a checkpoint: the last good one stays the latest
                if mlflow:
                    mark_diverged(mlflow, run_id, guard.message(step + 1, saved))
                return  # a normal return on every rank: Ray Train would retry a raised error
            continue
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        window["loss"] += loss.item() / accum
        if not boundary:
            continue
        step = engine.global_steps
        window["n"] += 1
        # 5. EMA of the student for evaluation only (gathered under ZeRO-3)
        with gathered(engine.module, cfg.engine.zero_stage):
            if ema is not None:
                ema.update_parameters(engine.module)
        last = step == cfg.optim.total_steps
        if rank == 0 and (step % cfg.engine.log_every == 0 or last):
            if step > logged_through:
                log_metrics(epoch, info)
            window.update(loss=0.0, n=0, wait=0.0, t0=time.perf_counter())
        if rank == 0 and step > logged_through and (step % cfg.eval.every == 0 or last):
            log_samples()
        if fid is not None and step > logged_through and (step % cfg.eval.fid_every == 0 or last):
            log_fid()
        if step % cfg.engine.checkpoint_every == 0 or last:
            checkpoint({"loss": float(loss.item()), **info, **last_fid})
        hooks.after_step(step)
