"""Improved Consistency Training, Song & Dhariwal, ICLR 2024 (docs/algorithms.md section 1).

The teacher is the student itself under stop-gradient (no EMA teacher), evaluated with the same noise z
and the same dropout mask; the EMA copy exists only for evaluation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fewstep.distances import default_huber_c, get_distance
from fewstep.edm import Denoiser, EDMConfig, EDMPrecond, karras_sigmas, sample
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, register


class ICTConfig(ObjectiveConfig):
    """iCT objective and sampler settings; defaults are the paper's [iCT sec. 3]."""

    name: Literal["ict"] = "ict"
    edm: EDMConfig = Field(default_factory=EDMConfig)
    s0: int = Field(10, ge=1, description="Initial discretization steps of the curriculum [iCT sec. 3.4].")
    s1: int = Field(1280, ge=1, description="Final (cap) discretization steps of the curriculum.")
    curriculum_steps: int | None = Field(
        None, ge=1, description="K in N(k): iterations the curriculum spans; None = the run's total steps."
    )
    p_mean: float = Field(-1.1, description="Lognormal noise-level sampling mean [iCT sec. 3.5].")
    p_std: float = Field(2.0, gt=0, description="Lognormal noise-level sampling std [iCT sec. 3.5].")
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = Field(
        None, ge=0, description="Pseudo-Huber c; None = 0.00054 * sqrt(D) [iCT sec. 3.3]."
    )
    sigma_mid: list[float] = Field(
        default_factory=lambda: [0.821],
        description="Intermediate sigmas of multistep sampling [CM Alg. 1]; 0.821 is iCT's CIFAR-10 value.",
    )


# Discretization curriculum, exponential doubling [iCT sec. 3.4].
def curriculum_n(k: int, total_k: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 * 2^floor(k / K'), s1) + 1,  K' = floor(K / (log2(floor(s1 / s0)) + 1))."""
    k_prime = max(1, math.floor(total_k / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


# Discrete lognormal distribution over levels i = 1..N-1 [iCT sec. 3.5].
def level_probabilities(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) ∝ erf((ln s_{i+1} - P_mean)/(√2 P_std)) - erf((ln s_i - P_mean)/(√2 P_std)); (N-1,), sums to 1."""
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


@register("ict")
class ICTObjective(Objective):
    """One iCT training step: loss = E[lambda(sigma_i) d(f(x + s_{i+1} z, s_{i+1}), sg f(x + s_i z, s_i))]."""

    config = ICTConfig

    def __init__(self, cfg: ICTConfig, data_dim: int, total_steps: int):
        super().__init__(cfg, data_dim, total_steps)
        self.total_k = cfg.curriculum_steps or total_steps
        self.distance = get_distance(cfg.distance)
        self.c = cfg.huber_c if cfg.huber_c is not None else default_huber_c(data_dim)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def n_levels(self, step: int) -> int:
        # Every rank evaluates this from the global step: no rank-0-only curriculum (docs/algorithms.md pitfalls).
        return curriculum_n(step, self.total_k, self.cfg.s0, self.cfg.s1)

    def _levels(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != n:
            sigmas = karras_sigmas(n, self.cfg.edm)
            self._cache = (n, sigmas, level_probabilities(sigmas, self.cfg.p_mean, self.cfg.p_std))
        return self._cache[1], self._cache[2]

    @classmethod
    def precondition(cls, net: nn.Module, cfg: ICTConfig) -> nn.Module:
        return EDMPrecond(net, cfg.edm)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            steps=StepCounts(1, 1 + len(self.cfg.sigma_mid)), samplers=("ict",), default_sampler="ict", family="ve",
            steps_reason=f"objective.sigma_mid = {self.cfg.sigma_mid} gives the sigmas of steps 2 and on",
        )

    def loss(
        self, model: Denoiser, x: torch.Tensor, labels: torch.Tensor | None, step: int, teacher: None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # 1. the curriculum's noise levels at this iteration
        n = self.n_levels(step)
        sigmas, probs = self._levels(n)
        # 2. draw i ~ discrete lognormal, and one z shared by student and teacher
        i = torch.multinomial(probs, x.shape[0], replacement=True)  # (B,), 0-based: sigma_i = sigmas[i]
        sigma_i = sigmas[i].to(device=x.device, dtype=torch.float32)
        sigma_next = sigmas[i + 1].to(device=x.device, dtype=torch.float32)
        z = torch.randn_like(x)
        # 3. teacher = stop-gradient student at the smaller level, same dropout mask (RNG forked and replayed)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with torch.no_grad():
                target = model(x + sigma_i.view(-1, 1, 1, 1) * z, sigma_i, labels).detach()
        # 4. student at the larger level
        pred = model(x + sigma_next.view(-1, 1, 1, 1) * z, sigma_next, labels)
        # 5. lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) [iCT sec. 3.2], Pseudo-Huber distance
        weight = 1.0 / (sigma_next - sigma_i)
        loss = (weight * self.distance(pred.float(), target.float(), self.c)).mean()
        return loss, {"n_levels": float(n)}

    def sample_sigmas(self, num_steps: int) -> list[float]:
        """Sigmas visited by the multistep sampler: sigma_max, then the configured sigma_mid values."""
        self.capabilities.steps.check(num_steps, self.capabilities.steps_reason)
        return [self.cfg.edm.sigma_max, *self.cfg.sigma_mid][:num_steps]

    def sample(
        self, model: Denoiser, noise: torch.Tensor, num_steps: int, labels: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.capabilities.check_sampler(sampler, "ict")  # [CM Alg. 1] with iCT's sigma_mid chain
        return sample(model, noise, self.sample_sigmas(num_steps), labels, self.cfg.edm.sigma_min, generator)
