"""The one place that maps `objective.name` to its parameterization, loss and sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fewstep.diffusion import DiffusionConfig, DiffusionObjective
from fewstep.edm import EDMPrecond
from fewstep.ict import ICTConfig, ICTObjective
from fewstep.multistep import MultistepConfig, MultistepObjective
from fewstep.networks import TextUNet, UNet
from fewstep.vp import VPPrecond

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

Objective = ICTObjective | MultistepObjective | DiffusionObjective


def build_model(cfg: TrainConfig) -> nn.Module:
    """The single-device denoiser: network F inside its objective's preconditioner (VE for iCT, VP otherwise)."""
    o = cfg.objective
    net = TextUNet(cfg.network, cfg.text.dim) if cfg.text.enabled else UNet(cfg.network)
    if isinstance(o, ICTConfig):
        return EDMPrecond(net, o.edm)
    return VPPrecond(net, o.vp)


def build_objective(cfg: TrainConfig) -> Objective:
    o, dim, total = cfg.objective, cfg.data_dim, cfg.optim.total_steps
    if isinstance(o, ICTConfig):
        return ICTObjective(o, data_dim=dim, total_steps=total)
    if isinstance(o, MultistepConfig):
        return MultistepObjective(o, data_dim=dim, total_steps=total)
    if isinstance(o, DiffusionConfig):
        return DiffusionObjective(o, data_dim=dim, total_steps=total)
    raise TypeError(f"no objective for {type(o).__name__}")
