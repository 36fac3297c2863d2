"""Post-hoc EMA with power-function averaging profiles.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, CVPR 2024), sec. 3
and App. C. During training, K power-function EMAs of the parameters are tracked and saved as snapshots; after
training, the EMA of any length (sigma_rel) at any step is reconstructed as a least-squares combination of the
snapshots, using the closed-form inner products of the averaging profiles.

Time t counts optimizer steps from 1: the EMA at step t averages the parameters theta_1..theta_t (theta_s being
the parameters after step s), each treated as constant on (s - 1, s]. With that convention the tracked EMA
equals the continuous profile applied to the parameter history exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_SIGMA_RELS: tuple[float, ...] = (0.05, 0.10)
MAX_SIGMA_REL = math.sqrt(1 / 12)  # the uniform average (gamma = 0)


# EDM2 App. C.2, eq. 123: relative standard deviation of p(tau) ∝ tau^gamma on [0, t].
def sigma_rel_from_gamma(gamma: float) -> float:
    """The profile's standard deviation divided by its length t."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


# EDM2 App. C.2, eq. 126 / Alg. 2: sigma_rel^-2 (g + 1) = (g + 2)^2 (g + 3), i.e. the cubic
# g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2) = 0; gamma is its largest real root.
def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile whose relative standard deviation is sigma_rel."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:  # gamma >= 0
        raise ValueError(f"sigma_rel must be in (0, sqrt(1/12)], got {sigma_rel}")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


# EDM2 sec. 3.1 / App. C.2, eq. 127: beta_t = (1 - dt / t)^(gamma + 1); dt = 1 when t counts steps.
def power_function_beta(gamma: float, t: float, dt: float = 1.0) -> float:
    """Decay of the power-function EMA at time t (0 at t = dt: the first update copies the parameters)."""
    if t < dt:
        raise ValueError(f"t must be >= dt, got t={t}, dt={dt}")
    return (1.0 - dt / t) ** (gamma + 1.0)


# EDM2 sec. 3.1 / App. C.2, eq. 121: p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 < tau <= t; integrated over
# (tau - 1, tau] it gives the weight of step tau's parameters in the EMA at step t.
def power_function_weights(gamma: float, t: int) -> np.ndarray:
    """Weights w[tau - 1] of theta_1..theta_t in the power-function EMA at step t (they sum to 1)."""
    tau = np.arange(0, t + 1, dtype=np.float64) / t
    return np.diff(tau ** (gamma + 1.0))


# EDM2 App. C.3, eq. 151 / Alg. 3: <p_a, p_b> = integral over [0, min(t_a, t_b)] of the product of the profiles
#   = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * min^(g_a + g_b + 1) / (t_a^(g_a + 1) t_b^(g_b + 1)),
# written as (min / max)^(g of the longer profile) / max to stay finite for large t.
def power_profile_dot(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """Inner products of power-function profiles (t_a, gamma_a) and (t_b, gamma_b), broadcasting."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_longer = np.where(t_a < t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (t_min / t_max) ** g_longer / t_max


# EDM2 App. C.3, Alg. 3: least squares over the snapshots' profiles, A c = b with A_ij = <p_i, p_j>,
# b_i = <p_i, p_target>.
def solve_posthoc_coefficients(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_sigma_rel: float
) -> np.ndarray:
    """Coefficients c (float64, one per snapshot) such that sum_i c_i p_i best matches the target profile."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if t.shape != g.shape or t.ndim != 1 or t.size == 0:
        raise ValueError("steps and gammas must be non-empty 1-D sequences of equal length")
    g_target = gamma_from_sigma_rel(target_sigma_rel)
    A = power_profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = power_profile_dot(t, g, float(target_step), g_target)
    c, *_ = np.linalg.lstsq(A, b, rcond=None)
    return c


@dataclass
class Snapshot:
    """One power-function EMA (exponent gamma) of the parameters at a training step, as plain tensors."""

    step: int
    gamma: float
    tensors: dict[str, torch.Tensor]

    @property
    def sigma_rel(self) -> float:
        return sigma_rel_from_gamma(self.gamma)


def save_snapshot(path: str | Path, snapshot: Snapshot) -> None:
    """Write a snapshot as one safetensors file; step and gamma go in its metadata."""
    metadata = {"step": str(int(snapshot.step)), "gamma": repr(float(snapshot.gamma))}
    tensors = {k: v.detach().contiguous() for k, v in snapshot.tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot written by `save_snapshot` (safetensors only, nothing unpickled)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "step" not in metadata or "gamma" not in metadata:
        raise ValueError(f"{path}: not a post-hoc EMA snapshot (metadata lacks step/gamma)")
    return Snapshot(step=int(metadata["step"]), gamma=float(metadata["gamma"]), tensors=load_file(str(path)))


class PowerFunctionEMA:
    """K power-function EMAs of a module's parameters, kept in fp32 (EDM2 sec. 3.1)."""

    def __init__(self, module: torch.nn.Module, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.step = 0
        self.emas: list[dict[str, torch.Tensor]] = [
            {n: p.detach().to(torch.float32).clone() for n, p in module.named_parameters()} for _ in self.gammas
        ]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Fold in the parameters after optimizer step `step` (counted from 1, increasing)."""
        self.update_tensors(dict(module.named_parameters()), step)

    @torch.no_grad()
    def update_tensors(self, params: dict[str, torch.Tensor], step: int) -> None:
        """`update` from the parameters by name (e.g. the fp32 masters a backend hands over)."""
        if step <= self.step:
            raise ValueError(f"step must increase: got {step} after {self.step}")
        # Updates every k steps: theta is taken constant over (t - k, t], so beta = (1 - k / t)^(gamma + 1).
        dt = step - self.step
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            beta = power_function_beta(gamma, step, dt)
            for name, avg in ema.items():
                avg.lerp_(params[name].detach().to(torch.float32), 1.0 - beta)
        self.step = step

    def snapshot(self) -> list[Snapshot]:
        """The current EMAs (copies), one Snapshot per tracked sigma_rel, keyed by parameter name."""
        return [
            Snapshot(self.step, gamma, {n: t.clone() for n, t in ema.items()})
            for gamma, ema in zip(self.gammas, self.emas, strict=True)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-writable): 'step', 'gammas', and 'ema{k}.{param}' for each EMA k."""
        state = {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "gammas": torch.tensor(self.gammas, dtype=torch.float64),
        }
        for k, ema in enumerate(self.emas):
            state.update({f"ema{k}.{n}": t.clone() for n, t in ema.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        gammas = state["gammas"].tolist()
        if len(gammas) != len(self.gammas) or not np.allclose(gammas, self.gammas, rtol=1e-9):
            raise ValueError(f"state tracks gammas {gammas}, this tracker {list(self.gammas)}")
        for k, ema in enumerate(self.emas):
            for name, avg in ema.items():
                avg.copy_(state[f"ema{k}.{name}"])
        self.step = int(state["step"])


def reconstruct(
    snapshots: Sequence[Snapshot], target_sigma_rel: float, target_step: int | None = None
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The post-hoc EMA (target_sigma_rel at target_step, default the latest snapshot's step) as
    sum_i c_i theta_i over the snapshots (EDM2 sec. 3.2); returns the tensors (fp32) and the coefficients c."""
    if not snapshots:
        raise ValueError("no snapshots")
    step = max(s.step for s in snapshots) if target_step is None else target_step
    c = solve_posthoc_coefficients([s.step for s in snapshots], [s.gamma for s in snapshots], step, target_sigma_rel)
    out: dict[str, torch.Tensor] = {}
    for name in snapshots[0].tensors:
        acc = sum(float(ci) * s.tensors[name].to(torch.float64) for ci, s in zip(c, snapshots, strict=True))
        out[name] = acc.to(torch.float32)
    return out, c
