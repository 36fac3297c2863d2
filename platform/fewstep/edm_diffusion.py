"""The diffusion end of the VE family: EDM's denoising objective and sampler (docs/algorithms.md section 4).

The same network and EDM preconditioning as iCT and ECT (edm.EDMPrecond without the consistency offset), so a model
trained here is what `ect` and `ict` start from (`objective.init_from`). Sampled with EDM's deterministic Heun
sampler [EDM Alg. 1] (or Euler) on the Karras noise levels [EDM eq. 5], at any step count.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewstep.edm import Denoiser, EDMConfig, EDMPrecond, karras_sigmas
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, register

SAMPLERS = ("heun", "euler")


class EDMDiffusionConfig(ObjectiveConfig):
    """EDM objective and sampler settings; defaults are EDM's [EDM Table 1]."""

    name: Literal["edm"] = "edm"
    edm: EDMConfig = Field(default_factory=EDMConfig)
    p_mean: float = Field(-1.2, description="Training noise levels: ln sigma ~ N(p_mean, p_std^2) [EDM Table 1].")
    p_std: float = Field(1.2, gt=0, description="Training noise levels: std of ln sigma [EDM Table 1].")
    sampler: Literal["heun", "euler"] = Field(
        "heun", description="heun: EDM's 2nd-order sampler, 2 k - 1 network calls for k steps [EDM Alg. 1]; euler: "
        "k calls. Serving may override.",
    )


# Loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 [EDM Table 1]
def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sampling_sigmas(num_steps: int, cfg: EDMConfig) -> list[float]:
    """t_0 = sigma_max > ... > t_{k-1} = sigma_min on the Karras schedule, then t_k = 0 [EDM eq. 5, Alg. 1]; one step
    is a single denoising from sigma_max."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    levels = [cfg.sigma_max] if num_steps == 1 else karras_sigmas(num_steps, cfg).flip(0).tolist()
    return [*levels, 0.0]


@torch.no_grad()
def sample(model: Denoiser, noise: torch.Tensor, sigmas: list[float], labels: torch.Tensor | None,
           heun: bool = True) -> torch.Tensor:
    """EDM's deterministic sampler [EDM Alg. 1]: Euler steps of dx/dsigma = (x - D(x, sigma)) / sigma, with Heun's
    2nd-order correction on every step that does not end at sigma = 0."""
    ones = torch.ones(noise.shape[0], device=noise.device)  # (B,)
    x = sigmas[0] * noise  # x_0 ~ N(0, sigma_max^2 I)
    for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - model(x, t * ones, labels)) / t
        x_next = x + (t_next - t) * d
        if heun and t_next > 0:
            d_next = (x_next - model(x_next, t_next * ones, labels)) / t_next
            x_next = x + (t_next - t) * 0.5 * (d + d_next)
        x = x_next
    return x.clamp(-1, 1)


@register("edm")
class EDMDiffusionObjective(Objective):
    """L = E[lambda(sigma) ||D(x + sigma n, sigma) - x||^2 / D], ln sigma ~ N(p_mean, p_std^2) [EDM Table 1]."""

    config = EDMDiffusionConfig

    @classmethod
    def precondition(cls, net: nn.Module, cfg: EDMDiffusionConfig) -> nn.Module:
        return EDMPrecond(net, cfg.edm, boundary=False)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(steps=StepCounts(1, None), samplers=SAMPLERS, default_sampler=self.cfg.sampler,
                            family="ve", role="diffusion")

    def loss(
        self, model: Denoiser, x: torch.Tensor, labels: torch.Tensor | None, step: int, teacher: None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = x.float()  # (B, C, H, W)
        # 1. ln sigma ~ N(P_mean, P_std^2)
        sigma = (self.cfg.p_mean + self.cfg.p_std * torch.randn(x.shape[0], device=x.device)).exp()  # (B,)
        # 2. the denoiser at x + sigma n
        denoised = model(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma, labels).float()
        # 3. lambda(sigma) times the mean squared error per sample
        err = (denoised - x).flatten(1).square().mean(dim=1)  # (B,)
        return (edm_weight(sigma, self.cfg.edm.sigma_data) * err).mean(), {}

    def sample(
        self, model: Denoiser, noise: torch.Tensor, num_steps: int, labels: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.capabilities.steps.check(num_steps)
        heun = self.capabilities.check_sampler(sampler, "edm") == "heun"
        return sample(model, noise, sampling_sigmas(num_steps, self.cfg.edm), labels, heun=heun)
