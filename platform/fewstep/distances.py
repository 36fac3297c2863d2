"""Per-sample distances between image batches, one registry (no per-objective if/elif copies)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Distance = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def l2(x: torch.Tensor, y: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """||x - y||_2 over all non-batch dimensions; returns (B,)."""
    return (x - y).flatten(1).norm(dim=1)


def l2_squared(x: torch.Tensor, y: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """||x - y||_2^2 over all non-batch dimensions; returns (B,). With w = SNR + 1 = 1 / sigma^2 on an
    x-prediction error this is the v-prediction MSE ||v - v_hat||^2 of a diffusion model."""
    return (x - y).flatten(1).square().sum(dim=1)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||x - y||_2^2 + c^2) - c on the whole sample, not element-wise [iCT sec. 3.3]; returns (B,)."""
    sq = (x - y).flatten(1).square().sum(dim=1)
    return torch.sqrt(sq + c * c) - c


DISTANCES: dict[str, Distance] = {"l2": l2, "l2_squared": l2_squared, "pseudo_huber": pseudo_huber}


def default_huber_c(dim: int) -> float:
    """c = 0.00054 * sqrt(D) [iCT sec. 3.3]: 0.0299 for CIFAR-10 (D = 3072)."""
    return 0.00054 * math.sqrt(dim)


def get_distance(name: str) -> Distance:
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; choose one of {sorted(DISTANCES)}") from None
