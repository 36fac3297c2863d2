"""Variance-preserving parameterization for multistep consistency models and diffusion (docs/algorithms.md section 2).

z_t = alpha_t x + sigma_t eps, sigma_t^2 = 1 - alpha_t^2, continuous t in [0, 1] [MCM sec. 2]. Every tensor of
images is (B, C, H, W) and every time is per sample, (B,); a 0-dim time broadcasts over the batch.

Schedule: the cosine schedule in log-SNR form, shifted by a constant,

    logSNR(t) = -2 ln tan(pi t / 2) + 2 ln(shift),   alpha_t^2 = sigmoid(logSNR),  sigma_t^2 = sigmoid(-logSNR)

so shift = 1 is exactly alpha_t = cos(pi t / 2) and shift = k multiplies the SNR by k^2 at every t ("shifted
cosine" of simple diffusion, Hoogeboom et al. 2023; shift < 1, e.g. 64 / resolution, adds noise). MCM uses a
shifted/"interpolated" cosine without giving its form, so the shift is a config value.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class VPConfig(BaseModel):
    """Noise schedule of the VP process; t is clipped to [t_min, t_max] where the schedule is evaluated."""

    model_config = ConfigDict(extra="forbid")
    schedule: Literal["cosine"] = Field("cosine", description="alpha_t = cos(pi t / 2) at shift = 1 [MCM sec. 2].")
    shift: float = Field(
        1.0, gt=0, description="logSNR(t) = logSNR_cosine(t) + 2 ln(shift): SNR times shift^2; 1 = plain cosine."
    )
    t_min: float = Field(
        1e-4, gt=0, lt=0.5,
        description="Lower clip of t: sigma_t > 0 (DDIM divides by it) and finite logSNR; must stay below 1/T of "
        "the finest teacher grid (checked by the multistep objective).",
    )
    t_max: float = Field(
        1 - 1e-4, gt=0.5, lt=1, description="Upper clip of t: alpha_t > 0 and finite logSNR at t = 1."
    )


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> (B, 1, 1, 1) (as many singleton dims as `like` has beyond the batch) for broadcasting."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# Shifted cosine schedule in log-SNR form (module docstring); shift = 1 is alpha_t = cos(pi t / 2) [MCM sec. 2].
def logsnr(t: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    t = t.clamp(cfg.t_min, cfg.t_max)
    return -2.0 * torch.log(torch.tan(0.5 * math.pi * t)) + 2.0 * math.log(cfg.shift)


def alpha_sigma(t: torch.Tensor, cfg: VPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t), each shaped like t. Via the sigmoid, so sigma_t^2 = 1 - alpha_t^2 holds without the
    cancellation of sqrt(1 - alpha^2) near t = 0 (sigma ~ 1e-4 is still exact in float32)."""
    lam = logsnr(t, cfg)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def snr(t: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    """SNR(t) = alpha_t^2 / sigma_t^2 [MCM sec. 2]."""
    return torch.exp(logsnr(t, cfg))


def c_noise(t: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    """Network noise conditioning: -logSNR / 8 = 0.25 ln(sigma_t / alpha_t), i.e. EDM's c_noise = 0.25 ln(sigma)
    of the equivalent VE noise level sigma / alpha. The same UNet embedding scale (x1000) then serves edm.py and
    vp.py, and the network sees the noise level itself, so a change of `shift` does not relabel its inputs.
    Range at the default clips, shift = 1: [-2.2, 2.2] (EDM: [-1.55, 1.1])."""
    return -0.125 * logsnr(t, cfg)


# DDIM step t -> s [MCM eq. 4]: DDIM_{t->s}(x, z_t) = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)
def ddim(x: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    alpha_t, sigma_t = (_b(v, z_t) for v in alpha_sigma(t, cfg))  # (B, 1, 1, 1)
    alpha_s, sigma_s = (_b(v, z_t) for v in alpha_sigma(s, cfg))
    return alpha_s * x + (sigma_s / sigma_t) * (z_t - alpha_t * x)  # (B, C, H, W)


# Inverse DDIM [MCM eq. 5]: the x for which DDIM_{t->s}(x, z_t) = z_s
def inv_ddim(z_s: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    alpha_t, sigma_t = (_b(v, z_t) for v in alpha_sigma(t, cfg))
    alpha_s, sigma_s = (_b(v, z_t) for v in alpha_sigma(s, cfg))
    return (z_s - (sigma_s / sigma_t) * z_t) / (alpha_s - alpha_t * sigma_s / sigma_t)


# Adjusted DDIM [MCM Alg. 3, eq. 14]: DDIM whose z_s keeps the variance that x_hat's uncertainty x_var adds
def addim(
    x_hat: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    x_var: torch.Tensor | float,
    cfg: VPConfig,
) -> torch.Tensor:
    """x_var: per-sample (B,) or scalar variance per dimension of x around x_hat. x_var = 0 is exactly DDIM."""
    alpha_t, sigma_t = (_b(v, z_t) for v in alpha_sigma(t, cfg))
    alpha_s, sigma_s = (_b(v, z_t) for v in alpha_sigma(s, cfg))
    x_var = _b(torch.as_tensor(x_var, dtype=z_t.dtype, device=z_t.device), z_t)  # (B or 1, 1, 1, 1)
    D = z_t[0].numel()  # data dimensions per sample
    # [MCM Alg. 3] eps_hat = (z_t - alpha_t x_hat) / sigma_t
    eps_hat = (z_t - alpha_t * x_hat) / sigma_t  # (B, C, H, W)
    # [MCM eq. 14] zs_var = (alpha_s - alpha_t sigma_s / sigma_t)^2 x_var
    zs_var = (alpha_s - alpha_t * sigma_s / sigma_t) ** 2 * x_var  # (B, 1, 1, 1)
    eps_sq = _b(eps_hat.flatten(1).square().sum(dim=1), z_t).clamp_min(1e-20)  # ||eps_hat||^2 per sample
    # [MCM Alg. 3] z_s = alpha_s x_hat + sqrt(sigma_s^2 + (D / ||eps_hat||^2) zs_var) eps_hat
    return alpha_s * x_hat + torch.sqrt(sigma_s**2 + (D / eps_sq) * zs_var) * eps_hat


# Analytic x-prediction variance for aDDIM sampling [MCM Alg. 3]: x_var = 0.1 / (2 + alpha_t^2 / sigma_t^2)
def analytic_x_var(t: torch.Tensor, cfg: VPConfig) -> torch.Tensor:
    return 0.1 / (2.0 + snr(t, cfg))


class VPPrecond(nn.Module):
    """x-prediction through a v-prediction head: f(z_t, t) = alpha_t z_t - sigma_t F(z_t, c_noise(t), labels).

    No input scaling: z_t already has variance alpha_t^2 Var[x] + sigma_t^2 <= 1 for data in [-1, 1].
    """

    def __init__(self, net: nn.Module, cfg: VPConfig):
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = t.to(torch.float32).reshape(-1)  # (B,)
        z_t = z_t.to(torch.float32)  # (B, C, H, W)
        alpha_t, sigma_t = (_b(v, z_t) for v in alpha_sigma(t, self.cfg))  # (B, 1, 1, 1)
        dtype = next(self.net.parameters()).dtype  # bf16/fp16 under mixed precision; fp32 otherwise
        # c_noise(t) stays fp32: adjacent MCM grid points can share a bf16 value (docs/algorithms.md section 6)
        v_hat = self.net(z_t.to(dtype), c_noise(t, self.cfg), class_labels)
        # [MCM sec. 2, v-prediction] x_hat = alpha_t z_t - sigma_t v_hat
        return alpha_t * z_t - sigma_t * v_hat.to(torch.float32)
