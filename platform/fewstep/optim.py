"""The optimizer side of a run: its config, the torch optimizer, the learning-rate schedule and the evaluation EMA.
Backends (fewstep.backends) take these as they are: DeepSpeed wraps the same optimizer and schedule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class OptimConfig(BaseModel):
    """Optimizer and run length. iCT: RAdam, lr 1e-4, batch 1024, 400k iterations."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["radam", "adam", "adamw"] = "radam"
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    decay_fraction: float = Field(
        0.0, ge=0, le=1, description="Linear lr decay to 0 over this last fraction of total_steps; 0 = constant (iCT)."
    )
    grad_clip: float = Field(0.0, ge=0, description="Global grad-norm clip; 0 = off.")
    batch_size: int = Field(1024, ge=1, description="Global batch (all workers, all accumulation steps).")
    total_steps: int = Field(400_000, ge=1, description="Optimizer steps of the whole run.")


class EMAConfig(BaseModel):
    """Evaluation EMA of the student weights; never the teacher [iCT]."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["classic", "posthoc"] = Field(
        "classic",
        description="classic: one EMA of decay ema.decay. posthoc: power-function EMAs of the lengths "
        "ema.sigma_rels, saved as snapshots in every checkpoint, from which pipelines.posthoc_ema reconstructs "
        "any EMA length after training [EDM2 sec. 3]; the exported model is the first of ema.sigma_rels.",
    )
    decay: float = Field(
        0.99993, ge=0, lt=1, description="Per-step decay; half-life = ln(0.5)/ln(decay) steps (iCT CIFAR-10). "
        "ema.mode=classic only.",
    )
    sigma_rels: list[float] = Field(
        default_factory=lambda: [0.05, 0.10], min_length=1,
        description="ema.mode=posthoc: the tracked EMA lengths (the profile's standard deviation over the "
        "training time, each in (0, 0.288]) [EDM2 sec. 3.1]; the first is the exported model's.",
    )
    snapshot_every: int | None = Field(
        None, ge=1, description="ema.mode=posthoc: save the tracked EMAs every N optimizer steps (and at the "
        "end); None = every total_steps // 16 steps (at least 1).",
    )

    @field_validator("sigma_rels")
    @classmethod
    def _valid_lengths(cls, v: list[float]) -> list[float]:
        from fewstep.posthoc_ema import MAX_SIGMA_REL

        bad = [s for s in v if not 0 < s <= MAX_SIGMA_REL]
        if bad:
            raise ValueError(f"ema.sigma_rels must lie in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"ema.sigma_rels has duplicates: {v}")
        return v

    def snapshot_interval(self, total_steps: int) -> int:
        return self.snapshot_every or max(1, total_steps // 16)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then constant (iCT trains at a constant lr); with `decay_fraction`, a linear
    decay to 0 over that last fraction of `total_steps` (warm-up / stable / decay, for short budgets). A fraction, so
    that `--set optim.total_steps=...` keeps the schedule's shape."""
    decay = round(cfg.decay_fraction * cfg.total_steps)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if decay == 0:
            return warm
        return min(warm, max(0.0, (cfg.total_steps - step) / decay))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: an fp32 EMA that also follows bf16/fp16 engine weights (torch's
    get_ema_multi_avg_fn requires equal dtypes)."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, current, strict=True)], 1.0 - decay)

    return update
