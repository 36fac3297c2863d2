"""Backends: what the training step needs from whatever applies the gradients.

The step (fewstep.train_step) calls the backend as the model, then `backward(loss)`, `step()`, and reads
`is_gradient_accumulation_boundary()` and `global_steps`: DeepSpeed's engine API. `DeepSpeedBackend` is the engine
itself (ZeRO, precision, offload; one per Ray Train rank); `LocalBackend` is the same contract around a plain torch
optimizer in one process (benchmarks, quick experiments, the quality regression test), so that both run one step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fewstep.distributed import consolidated_state_dict, deepspeed_config, gathered
from fewstep.optim import build_optimizer, lr_schedule

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

TAG = "ds"  # DeepSpeed's checkpoint tag inside a checkpoint directory
LOCAL = "local"  # the local backend's folder inside a checkpoint directory
STUDENT = "student.safetensors"


class LocalBackend:
    """One process, one torch optimizer and lr schedule, gradient accumulation over `accum` micro-batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, accum: int = 1,
                 grad_clip: float = 0.0):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum, self.grad_clip = accum, grad_clip
        self.micro_steps, self.global_steps = 0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # as DeepSpeed: the accumulated gradient is the mean over micro-batches

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def master_parameters(self) -> Iterator[list[torch.Tensor]]:
        yield list(self.module.parameters())

    def save(self, d: Path) -> None:
        (d / LOCAL).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(d / LOCAL / STUDENT))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro_steps": self.micro_steps, "global_steps": self.global_steps}, d / LOCAL / "trainer.pt")

    def load(self, d: Path) -> None:
        self.module.load_state_dict(load_file(str(d / LOCAL / STUDENT)))
        state = torch.load(d / LOCAL / "trainer.pt", weights_only=True)  # tensors and plain containers only
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]


class DeepSpeedBackend:
    """The DeepSpeed engine as a backend; `full_parameters` gathers ZeRO-3 partitions (a collective call)."""

    def __init__(self, engine, zero_stage: int, mixed_precision: bool = False):
        self.engine, self.zero_stage, self.module = engine, zero_stage, engine.module
        self.mixed_precision = mixed_precision

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def step(self) -> None:
        self.engine.step()

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def get_lr(self) -> list[float]:
        return self.engine.get_lr()

    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def full_parameters(self):
        return gathered(self.module, self.zero_stage)

    @contextlib.contextmanager
    def master_parameters(self) -> Iterator[list[torch.Tensor]]:
        """Every parameter whole, in fp32 (a collective call: every rank enters). Under bf16/fp16 these are the
        optimizer's fp32 master weights, not the rounded copies the forward pass uses (docs/algorithms.md
        section 6)."""
        if not self.mixed_precision or self.zero_stage == 3:  # ZeRO-3: the gathered (bf16) parameters, as before
            with gathered(self.module, self.zero_stage):
                yield list(self.module.parameters())
            return
        from deepspeed.utils import safe_get_full_fp32_param

        yield [safe_get_full_fp32_param(p) for p in self.module.parameters()]

    def save(self, d: Path) -> None:
        self.engine.save_checkpoint(str(d), tag=TAG)

    def load(self, d: Path) -> None:
        self.engine.load_checkpoint(str(d), tag=TAG)


Backend = LocalBackend | DeepSpeedBackend


def micro_batch(cfg: TrainConfig) -> int:
    """Images per micro-batch on one rank."""
    return cfg.engine.micro_batch or cfg.optim.batch_size // cfg.engine.num_workers


def build_backend(cfg: TrainConfig, model: nn.Module, world: int) -> Backend:
    """The model wrapped for training, with the run's optimizer and lr schedule."""
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    if cfg.engine.backend == "local":
        accum = cfg.engine.grad_accum(cfg.optim.batch_size)
        return LocalBackend(model, optimizer, lr_schedule(optimizer, cfg.optim), accum, cfg.optim.grad_clip)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg.optim),
        config=deepspeed_config(cfg, world),
    )
    return DeepSpeedBackend(engine, cfg.engine.zero_stage, mixed_precision=cfg.engine.precision != "fp32")


def student_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights of a checkpoint as one fp32 state_dict, whichever backend wrote it."""
    if (checkpoint_dir / LOCAL / STUDENT).is_file():
        return load_file(str(checkpoint_dir / LOCAL / STUDENT))
    return consolidated_state_dict(checkpoint_dir, TAG)
