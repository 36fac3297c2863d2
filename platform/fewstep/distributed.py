"""DeepSpeed wiring: the optimizer, the LR schedule, the engine config, ZeRO-3 parameter gathering."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fewstep.config import OptimConfig, TrainConfig

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then constant (iCT trains at a constant lr)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the typed config: global batch = micro x accum x world."""
    e = cfg.engine
    micro = e.micro_batch or cfg.optim.batch_size // e.num_workers
    if world_size != e.num_workers:
        raise ValueError(f"engine.num_workers={e.num_workers} but Ray started {world_size} workers")
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": e.grad_accum(cfg.optim.batch_size),
        "zero_optimization": {"stage": e.zero_stage},
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,  # a torch optimizer (RAdam) under ZeRO
        "steps_per_print": 2**31 - 1,
    }


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: an fp32 EMA that also follows bf16/fp16 engine weights (torch's
    get_ema_multi_avg_fn requires equal dtypes)."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, current, strict=True)], 1.0 - decay)

    return update


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters inside the block on every rank (ZeRO-3 partitions them); a collective call."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
