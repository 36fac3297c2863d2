"""The diffusion objective: the S -> infinity end of multistep consistency models (docs/algorithms.md sections 2-3).

Same VP parameterization (x-prediction through a v-head, vp.VPPrecond), same weighting w(t) = SNR(t) + 1 and the
same distance registry as multistep.py. With one teacher step per segment (T = S) the MCM-CT target
invDDIM_{t->s}(DDIM_{t->s}(x, z_t), z_t) is exactly x, so this is [MCM Alg. 1] with continuous t [MCM eq. 9].
A diffusion model sampled in k steps is [MCM Alg. 2] with S = k: the sampler is multistep.sample.
This is the teacher that multistep CD distills.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewstep.distances import default_huber_c, get_distance
from fewstep.multistep import SAMPLERS, XPredictor, sample
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, register
from fewstep.vp import VPConfig, VPPrecond, alpha_sigma, snr


class DiffusionConfig(ObjectiveConfig):
    """Diffusion objective and sampler settings."""

    name: Literal["diffusion"] = "diffusion"
    vp: VPConfig = Field(default_factory=VPConfig)
    distance: Literal["pseudo_huber", "l2", "l2_squared"] = Field(
        "pseudo_huber",
        description="Per-sample distance; l2_squared with w = SNR + 1 is the usual v-prediction MSE (the presets' "
        "choice: the unsquared norms weight small t by 1 / sigma_t).",
    )
    huber_c: float | None = Field(
        1e-4, ge=0, description="Pseudo-Huber c, as in MultistepConfig; None = iCT's 0.00054 sqrt(D)."
    )
    sampler: Literal["ddim", "addim"] = Field(
        "ddim", description="DDIM [MCM eq. 4] or aDDIM with the analytic x_var [MCM Alg. 3], any step count."
    )


@register("diffusion")
class DiffusionObjective(Objective):
    """L = E_t[w(t) d(f(z_t, t), x)], t ~ U(t_min, t_max), w = SNR + 1."""

    config = DiffusionConfig

    def __init__(self, cfg: DiffusionConfig, data_dim: int, total_steps: int | None = None):
        super().__init__(cfg, data_dim, total_steps)
        self.distance = get_distance(cfg.distance)
        self.c = cfg.huber_c if cfg.huber_c is not None else default_huber_c(data_dim)

    @classmethod
    def precondition(cls, net: nn.Module, cfg: DiffusionConfig) -> nn.Module:
        return VPPrecond(net, cfg.vp)

    @property
    def capabilities(self) -> Capabilities:
        # a diffusion model samples in any number of steps k >= 1 (t = 1, (k-1)/k, ..., 1/k) and can be a teacher
        return Capabilities(steps=StepCounts(1, None), samplers=SAMPLERS, default_sampler=self.cfg.sampler,
                            family="vp", role="diffusion", guidance=True)

    def loss(
        self,
        model: XPredictor,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        teacher: XPredictor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        vp = self.cfg.vp
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)  # (B, C, H, W)
        # 1. t ~ U(t_min, t_max), continuous [MCM eq. 9: S -> infinity]
        t = vp.t_min + (vp.t_max - vp.t_min) * torch.rand(x.shape[0], device=x.device, dtype=dtype)  # (B,)
        # 2. z_t = alpha_t x + sigma_t eps [MCM sec. 2]
        alpha_t, sigma_t = alpha_sigma(t, vp)
        z_t = alpha_t.view(-1, 1, 1, 1) * x + sigma_t.view(-1, 1, 1, 1) * torch.randn_like(x)
        # 3. x_hat = f(z_t, t)
        x_hat = model(z_t, t, labels).to(dtype)
        # 4. L = w(t) d(x_hat, x), w = SNR(t) + 1 (with the squared L2 this is the v-prediction MSE)
        w = snr(t, vp) + 1.0  # (B,)
        return (w * self.distance(x_hat, x, self.c)).mean(), {}

    def sample(
        self, model: XPredictor, noise: torch.Tensor, num_steps: int, labels: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.capabilities.steps.check(num_steps)
        return sample(model, noise, num_steps, labels, self.cfg.vp,
                      sampler=self.capabilities.check_sampler(sampler, "diffusion"))
