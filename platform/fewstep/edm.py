"""Variance-exploding EDM parameterization used by iCT (docs/algorithms.md section 1).

x_sigma = x + sigma * z; data in [-1, 1]. The preconditioner enforces the consistency boundary condition
f(x, sigma_min) = x through the sigma_min offset in c_skip and c_out [CM eq. 5, iCT].
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class EDMConfig(BaseModel):
    """Noise-level constants [iCT, following EDM]."""

    model_config = ConfigDict(extra="forbid")
    sigma_min: float = Field(0.002, gt=0, description="Smallest noise level; f(x, sigma_min) = x.")
    sigma_max: float = Field(80.0, gt=0, description="Largest noise level; one-step sampling starts here.")
    rho: float = Field(7.0, gt=0, description="Karras schedule curvature [EDM eq. 5].")
    sigma_data: float = Field(0.5, gt=0, description="Data standard deviation assumed by the preconditioner.")


# Preconditioning with the sigma_min offset [CM eq. 5 / App. C; iCT sec. 2].
def c_skip(sigma: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    return cfg.sigma_data**2 / ((sigma - cfg.sigma_min) ** 2 + cfg.sigma_data**2)


def c_out(sigma: torch.Tensor, cfg: EDMConfig) -> torch.Tensor:
    return cfg.sigma_data * (sigma - cfg.sigma_min) / torch.sqrt(sigma**2 + cfg.sigma_data**2)


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
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) around any network F(x, noise_cond, class_labels)."""

    def __init__(self, net: nn.Module, cfg: EDMConfig):
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1)  # (B,)
        s = sigma.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1) for broadcasting over (B, C, H, W)
        dtype = next(self.net.parameters()).dtype  # bf16/fp16 under mixed precision; fp32 otherwise
        F = self.net((c_in(s, self.cfg) * x).to(dtype), c_noise(sigma).to(dtype), class_labels)
        return c_skip(s, self.cfg) * x + c_out(s, self.cfg) * F.to(torch.float32)

