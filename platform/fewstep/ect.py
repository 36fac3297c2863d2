"""Easy Consistency Tuning, Geng et al., ICLR 2025 (docs/algorithms.md section 5).

Continuous-time consistency training whose gap t - r shrinks in stages: at stage 0 most of the time r = 0 and the
target is the data (the diffusion objective), later r -> t (consistency training). A diffusion model is therefore
its natural starting point (`objective.init_from` an `edm` model). The teacher is the student itself under
stop-gradient, with the same noise z and the same dropout mask, as in iCT.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewstep.distances import default_huber_c, get_distance
from fewstep.edm import Denoiser, EDMConfig, EDMPrecond, sample
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, register


class ECTConfig(ObjectiveConfig):
    """ECT objective and sampler settings; defaults are the paper's CIFAR-10 ones [ECT sec. 4]."""

    name: Literal["ect"] = "ect"
    edm: EDMConfig = Field(default_factory=EDMConfig)
    p_mean: float = Field(-1.1, description="Training times: ln t ~ N(p_mean, p_std^2) [ECT sec. 4].")
    p_std: float = Field(2.0, gt=0, description="Training times: std of ln t.")
    q: float = Field(2.0, gt=1, description="The gap shrinks by 1/q per stage (q = 256 with one stage: the paper's "
                     "short tuning run).")
    k: float = Field(8.0, ge=0, description="n(t) = 1 + k sigmoid(-b t): larger gaps at small t.")
    b: float = Field(1.0, description="n(t) = 1 + k sigmoid(-b t).")
    stages: int = Field(8, ge=1, description="Stages over the run when stage_steps is null.")
    stage_steps: int | None = Field(None, ge=1, description="d: iterations per stage; null = total_steps / stages.")
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = Field(
        None, ge=0, description="Pseudo-Huber c on the whole-sample norm; 0 = the L2 norm; null = 0.00054 sqrt(D)."
    )
    sigma_mid: list[float] = Field(
        default_factory=lambda: [0.821],
        description="Intermediate times of multistep sampling (ECT's CIFAR-10 value; ImageNet-64: 1.526).",
    )


# The staged gap [ECT sec. 3-4]: r = max(0, t (1 - q^-(stage+1) n(t))), n(t) = 1 + k sigmoid(-b t)
def gap_r(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - q ** -(stage + 1) * n)).clamp_min(0.0)


# Loss weight w(t) = 1/t^2 + 1/sigma_data^2 [ECT sec. 4]
def ect_weight(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1.0 / t**2 + 1.0 / sigma_data**2


@register("ect")
class ECTObjective(Objective):
    """One ECT step: L = w(t) d(f(x + t z, t), sg f(x + r z, r)), with sg f(x_r, 0) = x."""

    config = ECTConfig

    def __init__(self, cfg: ECTConfig, data_dim: int, total_steps: int):
        super().__init__(cfg, data_dim, total_steps)
        self.d = cfg.stage_steps or max(1, math.ceil(total_steps / cfg.stages))
        self.distance = get_distance(cfg.distance)
        self.c = cfg.huber_c if cfg.huber_c is not None else default_huber_c(data_dim)

    def stage(self, step: int) -> int:
        # every rank computes it from the global step
        return step // self.d

    @classmethod
    def precondition(cls, net: nn.Module, cfg: ECTConfig) -> nn.Module:
        return EDMPrecond(net, cfg.edm, boundary=False)  # EDM's: the boundary condition comes from r = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            steps=StepCounts(1, 1 + len(self.cfg.sigma_mid)), samplers=("consistency",),
            default_sampler="consistency", family="ve",
            steps_reason=f"objective.sigma_mid = {self.cfg.sigma_mid} gives the times of steps 2 and on",
        )

    def target(self, model: Denoiser, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor,
               labels: torch.Tensor | None) -> torch.Tensor:
        """sg f(x + r z, r), and exactly x where r = 0 (the network is not asked about sigma = 0)."""
        at = torch.where(r > 0, r, torch.ones_like(r))  # (B,): any positive level for the rows that take x
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # replayed by the student: same dropout
            f_r = model(x + at.view(-1, 1, 1, 1) * z, at, labels).float()
        return torch.where((r > 0).view(-1, 1, 1, 1), f_r, x).detach()

    def loss(
        self, model: Denoiser, x: torch.Tensor, labels: torch.Tensor | None, step: int, teacher: None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        x = x.float()  # (B, C, H, W)
        # 1. t ~ lognormal, one z shared by both points
        t = (cfg.p_mean + cfg.p_std * torch.randn(x.shape[0], device=x.device)).exp()  # (B,)
        z = torch.randn_like(x)
        # 2. the staged gap r(t) < t
        stage = self.stage(step)
        r = gap_r(t, stage, cfg.q, cfg.k, cfg.b)
        # 3. target = sg f(x + r z, r) (x where r = 0), then the student at t, same dropout mask
        target = self.target(model, x, z, r, labels)
        pred = model(x + t.view(-1, 1, 1, 1) * z, t, labels).float()
        # 4. w(t) d(pred, target)
        loss = (ect_weight(t, cfg.edm.sigma_data) * self.distance(pred, target, self.c)).mean()
        return loss, {"stage": float(stage), "r_zero_frac": float((r == 0).float().mean())}

    def sample_sigmas(self, num_steps: int) -> list[float]:
        self.capabilities.steps.check(num_steps, self.capabilities.steps_reason)
        return [self.cfg.edm.sigma_max, *self.cfg.sigma_mid][:num_steps]

    def sample(
        self, model: Denoiser, noise: torch.Tensor, num_steps: int, labels: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.capabilities.check_sampler(sampler, "ect")
        # [CM Alg. 1]: one step f(t_max z, t_max), then re-noise to each intermediate t (no sigma_min offset here)
        return sample(model, noise, self.sample_sigmas(num_steps), labels, 0.0, generator)
