"""The Ray Train side of a run: what `TorchTrainer` runs on every rank. It only says where the loop runs (rank,
device, the checkpoint to resume, how a checkpoint is reported); the loop itself is fewstep.loop."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import ray.train
import torch

from fewstep.config import TrainConfig
from fewstep.loop import Inputs, Place, train_loop


def _report(metrics: dict[str, Any], d: Path) -> None:
    # every rank reports its part of the checkpoint (its ZeRO partition); Ray Train merges them in storage
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.engine.use_gpu else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
        place = Place(ctx.get_world_rank(), ctx.get_world_size(), device, Path(restored) if restored else None,
                      _report, Path(loop_config["status_dir"]) if loop_config["status_dir"] else None)
        train_loop(cfg, place, Inputs(**loop_config["inputs"]))
