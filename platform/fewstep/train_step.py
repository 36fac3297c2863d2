"""The training step: the one place a micro-batch becomes a gradient and an optimizer step, on any backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fewstep.faults import DivergenceGuard
from fewstep.objectives import Objective


@dataclass
class StepOutcome:
    loss: float | None  # None when the micro-batch was skipped
    info: dict[str, float] = field(default_factory=dict)
    stepped: bool = False  # an optimizer step happened (the accumulation boundary)
    skipped: bool = False  # a non-finite loss on some rank: skipped on every rank


def train_step(
    backend, objective: Objective, x: torch.Tensor, cond: torch.Tensor | None, step: int, guard: DivergenceGuard,
    teacher: Callable | None = None, ema: nn.Module | None = None,
    corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepOutcome:
    """One micro-batch: loss, divergence guard, backward, optimizer step (at accumulation boundaries), EMA.

    `backend`: a fewstep.backends backend (the DeepSpeed engine or a local torch optimizer); `step`: the global
    optimizer step, which the objective's curricula read; `ema`: an AveragedModel (rank 0 only) or None;
    `corrupt`: test-only fault injection on the loss (engine.debug)."""
    # 1. the objective's loss of this micro-batch
    loss, info = objective.loss(backend, x, cond, step, teacher=teacher)
    if corrupt is not None:
        loss = corrupt(loss)
    # 2. a NaN/inf loss on any rank skips this micro-batch on every rank (a collective call when distributed)
    if guard.bad(loss):
        return StepOutcome(None, info, skipped=True)
    # 3. backward; the backend applies the optimizer and lr schedule at each accumulation boundary
    backend.backward(loss)
    boundary = backend.is_gradient_accumulation_boundary()
    backend.step()
    # 4. the evaluation EMA follows the student's fp32 weights after every optimizer step (gathered on every rank)
    if boundary:
        with backend.master_parameters() as params:
            if ema is not None:
                ema.update_parameters(_Parameters(params, list(backend.module.buffers()), backend.global_steps))
    return StepOutcome(loss.item(), info, stepped=boundary)


class _Parameters:
    """Parameters (and the module's buffers) where AveragedModel.update_parameters expects a module; `step`: the
    optimizer step they are the result of (the post-hoc EMA's time t)."""

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor], step: int = 0):
        self.params, self._buffers, self.step = params, buffers, step

    def parameters(self):
        return iter(self.params)

    def buffers(self):
        return iter(self._buffers)
