"""Variance-exploding EDM parameterization of iCT, ECT and the EDM diffusion model (docs/algorithms.md sections 1, 4).

x_sigma = x + sigma * z; data in [-1, 1]. iCT's preconditioner enforces the consistency boundary condition
f(x, sigma_min) = x through the sigma_min offset in c_skip and c_out [CM eq. 5, iCT]; EDM's denoiser (and ECT, which
gets the boundary condition from its r = 0 target instead) uses them without the offset [EDM Table 1]. The
parameters of the network F are the same either way, so weights move between the three.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        ...


class EDMConfig(BaseModel):
    """Noise-level constants [iCT, following EDM]."""

    model_config = ConfigDict(extra="forbid")
    sigma_min: float = Field(0.002, gt=0, description="Smallest noise level; f(x, sigma_min) = x.")
    sigma_max: float = Field(80.0, gt=0, description="Largest noise level; one-step sampling starts here.")
    rho: float = Field(7.0, gt=0, description="Karras schedule curvature [EDM eq. 5].")
    sigma_data: float = Field(0.5, gt=0, description="Data standard deviation assumed by the preconditioner.")


# Preconditioning [EDM Table 1]; offset = sigma_min gives the consistency model's [CM eq. 5 / App. C; iCT sec. 2].
def c_skip(sigma: torch.Tensor, cfg: EDMConfig, offset: float | None = None) -> torch.Tensor:
    o = cfg.sigma_min if offset is None else offset
    return cfg.sigma_data**2 / ((sigma - o) ** 2 + cfg.sigma_data**2)


def c_out(sigma: torch.Tensor, cfg: EDMConfig, offset: float | None = None) -> torch.Tensor:
    o = cfg.sigma_min if offset is None else offset
    return cfg.sigma_data * (sigma - o) / torch.sqrt(sigma**2 + cfg.sigma_data**2)


def c_in(sigma: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    return 1.0 / torch.sqrt(sigma**2 + cfg.sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    # [EDM Table 1]: 0.25 * ln(sigma). The network's embedding scale is the network's business.
    return 0.25 * torch.log(sigma)


def karras_sigmas(n: int, cfg: EDMConfig) -> torch.Tensor:
    """N noise levels sigma_1 < ... < sigma_N [EDM eq. 5]; float64 for exact curricula."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
    return (lo + i / (n - 1) * (hi - lo)) ** cfg.rho


class EDMPrecond(nn.Module):
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) around any network F(x, noise_cond, class_labels).
    boundary=True: iCT's sigma_min offset (f(x, sigma_min) = x exactly); False: EDM's denoiser, as ECT uses it."""

    def __init__(self, net: nn.Module, cfg: EDMConfig, boundary: bool = True):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.offset = cfg.sigma_min if boundary else 0.0

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1)  # (B,)
        s = sigma.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1) for broadcasting over (B, C, H, W)
        dtype = next(self.net.parameters()).dtype  # bf16/fp16 under mixed precision; fp32 otherwise
        # c_noise stays fp32: adjacent levels near sigma_min are one bf16 value apart or less (docs/algorithms.md
        # section 6); the network embeds it in fp32 and casts the embedding.
        F = self.net((c_in(s, self.cfg) * x).to(dtype), c_noise(sigma), class_labels)
        return c_skip(s, self.cfg, self.offset) * x + c_out(s, self.cfg, self.offset) * F.to(torch.float32)


@torch.no_grad()
def sample(
    model: Denoiser,
    noise: torch.Tensor,
    sigmas: list[float],
    labels: torch.Tensor | None,
    sigma_min: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling [CM Alg. 1]: x = f(s_max z, s_max), then re-noise to each s and denoise."""
    ones = torch.ones(noise.shape[0], device=noise.device)
    x = model(sigmas[0] * noise, sigmas[0] * ones, labels).clamp(-1, 1)
    for s in sigmas[1:]:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x = model(x + math.sqrt(s * s - sigma_min * sigma_min) * z, s * ones, labels).clamp(-1, 1)
    return x
