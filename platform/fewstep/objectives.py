"""The one place that maps `objective.name` to its parameterization, loss and sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fewstep.edm import EDMPrecond
from fewstep.ict import ICTObjective
from fewstep.networks import UNet

if TYPE_CHECKING:
    from fewstep.config import TrainConfig


def build_model(cfg: TrainConfig) -> nn.Module:
    """The single-device denoiser f(x, sigma, labels): network F inside its objective's preconditioner."""
    return EDMPrecond(UNet(cfg.network), cfg.objective.edm)


def build_objective(cfg: TrainConfig) -> ICTObjective:
    return ICTObjective(cfg.objective, data_dim=cfg.data_dim, total_steps=cfg.optim.total_steps)
