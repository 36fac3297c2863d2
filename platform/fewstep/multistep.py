"""Multistep Consistency Models, Heek, Hoogeboom & Salimans 2024 (docs/algorithms.md section 2).

[0, 1] is split into S segments; within each, f(z_t, t) is the x for which one DDIM step from t lands where the
teacher's ODE reaches the segment start t_step. S = 1 is a consistency model; S -> infinity is a diffusion model
(with one teacher step per segment the target below is exactly x: see diffusion.py). CT uses the data as the
teacher's x-prediction, CD a pretrained diffusion model; both are the same walk through [MCM Alg. 1].
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import nn

from fewstep.distances import default_huber_c, get_distance
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, register
from fewstep.vp import VPConfig, VPPrecond, addim, alpha_sigma, analytic_x_var, ddim, inv_ddim, snr

SAMPLERS = ("ddim", "addim")  # [MCM Alg. 2] and its aDDIM variant [MCM Alg. 3]


class XPredictor(Protocol):
    """f(z_t, t, labels) -> x_hat, e.g. a VPPrecond; t is (B,) in [0, 1]."""

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        ...


class MultistepConfig(ObjectiveConfig):
    """MCM objective and sampler settings; defaults are the paper's ImageNet ones [MCM App. A.1]."""

    name: Literal["multistep_ct", "multistep_cd"] = "multistep_ct"
    vp: VPConfig = Field(default_factory=VPConfig)
    student_steps: int = Field(
        4, ge=1, description="S, the sampling step budget the model is trained for; 1 = a consistency model."
    )
    n_start: int = Field(64, ge=1, description="Teacher steps over [0, 1] at iteration 0 [MCM App. A.1].")
    n_end: int = Field(1280, ge=1, description="Teacher steps after annealing (text-to-image: 256 = n_start).")
    anneal_steps: int = Field(100_000, ge=1, description="Iterations over which n_start -> n_end, log-linearly.")
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = Field(
        1e-4, ge=0,
        description="Pseudo-Huber c on the whole-sample norm, the paper's 'Huber epsilon' (1e-4 ImageNet, 1 "
        "text-to-image); 1e-4 makes it the plain L2 norm away from 0. None = iCT's 0.00054 sqrt(D).",
    )
    eta: float = Field(0.75, ge=0, description="CD x_var = eta ||x_teacher - x||^2 / D [MCM Alg. 1].")
    teacher_sampler: Literal["addim", "ddim"] = Field(
        "addim", description="Teacher step t -> s. aDDIM beats DDIM at 4+ steps [MCM Table 4]; CT: both are DDIM."
    )
    x_var: Literal["trained", "analytic"] = Field(
        "trained",
        description="CD teacher-step variance: 'trained' = eta ||x_teacher - x||^2 / D from the training pair "
        "[MCM Alg. 1]; 'analytic' = 0.1 / (2 + SNR(t)) [MCM Alg. 3]. CT always uses 0 (its teacher is x).",
    )
    sampler: Literal["ddim", "addim"] = Field(
        "ddim", description="Default sampler [MCM Alg. 2]; 'addim' uses the analytic x_var. Serving may override."
    )
    teacher: str | None = Field(
        None,
        description="multistep_cd only: the diffusion teacher, a registry URI `models:/NAME@ALIAS` (or "
        "`models:/NAME/VERSION`, resolved with tracking.uri) or a local model directory (weights.safetensors + "
        "config.yaml). Frozen, eval mode, loaded on every worker.",
    )
    guidance: float = Field(
        1.0, ge=0,
        description="multistep_cd of a text-to-image teacher: classifier-free guidance w of the teacher's "
        "x-prediction, x_teacher = x_uncond + w (x_cond - x_uncond) (fewstep.text.Guided); 1 = unguided. The "
        "paper's 'guidance 0.5 / 3', if in the (1 + w') x_c - w' x_u convention of Ho & Salimans eq. 6 (assumed), "
        "is w = 1.5 / 4 here.",
    )
    @property
    def teacher_ref(self) -> str | None:
        return self.teacher

    @model_validator(mode="after")
    def _cd_starts_from_its_teacher(self) -> MultistepConfig:
        # every CD run of the paper starts from the teacher's weights: the default unless init_from is given
        if self.name == "multistep_cd" and "init_from" not in self.model_fields_set:
            self.init_from = "teacher"
        return self

    def check_with(self, cfg) -> None:
        if self.name == "multistep_cd" and not self.teacher:
            raise ValueError("objective.teacher is required for objective.name=multistep_cd: a registry URI "
                             "models:/NAME@ALIAS or a model directory")
        if self.name == "multistep_ct" and self.teacher:
            raise ValueError("objective.teacher is set, but objective.name=multistep_ct has no teacher: multistep_cd?")
        if self.guidance != 1.0 and not cfg.text.enabled:
            raise ValueError("objective.guidance is classifier-free guidance of a text teacher: it needs text.enabled")


# Teacher-step annealing [MCM App. A.1]: N(i) = exp(log n_start + clip(i / anneal_steps, 0, 1)(log n_end - log n_start))
def n_teacher(i: int, cfg: MultistepConfig) -> float:
    frac = min(max(i / cfg.anneal_steps, 0.0), 1.0)
    return math.exp(math.log(cfg.n_start) + frac * (math.log(cfg.n_end) - math.log(cfg.n_start)))


# Time draws of [MCM Alg. 1]: step ~ U{0..S-1}, n ~ U{1..N_seg}, t_step = step/S, t = t_step + n/T, s = t - 1/T
def draw_times(
    batch: int,
    n_seg: int,
    student_steps: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, s, t_step), each (B,), with t_step <= s < t <= t_step + 1/S. Built from integer grid indices k/T so
    that t_step, s and t are exactly points of one T-grid (t_step = s when n = 1)."""
    T = n_seg * student_steps
    step = torch.randint(0, student_steps, (batch,), generator=generator).to(device)  # (B,)
    n = torch.randint(1, n_seg + 1, (batch,), generator=generator).to(device)  # (B,)
    k = (step * n_seg + n).to(torch.float64)  # grid index of t
    return (k / T).to(dtype), ((k - 1) / T).to(dtype), ((step * n_seg).to(torch.float64) / T).to(dtype)


@register("multistep_ct", "multistep_cd")
class MultistepObjective(Objective):
    """One MCM training step [MCM Alg. 1]: L = w(t) d(x_hat, invDDIM_{t->t_step}(z_ref, z_t)), w = SNR(t) + 1."""

    config = MultistepConfig

    def __init__(self, cfg: MultistepConfig, data_dim: int, total_steps: int | None = None):
        super().__init__(cfg, data_dim, total_steps)
        self.distill = cfg.name == "multistep_cd"
        self.distance = get_distance(cfg.distance)
        self.c = cfg.huber_c if cfg.huber_c is not None else default_huber_c(data_dim)

    @classmethod
    def precondition(cls, net: nn.Module, cfg: MultistepConfig) -> nn.Module:
        return VPPrecond(net, cfg.vp)

    @property
    def capabilities(self) -> Capabilities:
        S = self.cfg.student_steps
        return Capabilities(
            steps=StepCounts(S, S), samplers=SAMPLERS, default_sampler=self.cfg.sampler, family="vp",
            teacher="required" if self.distill else "none",
            steps_reason=f"it was trained for objective.student_steps = {S} steps",
        )

    def prepare_teacher(self, teacher: nn.Module, text_encoder: nn.Module | None) -> nn.Module:
        """Text-to-image CD distills the guided teacher x_uncond + w (x_cond - x_uncond)."""
        if text_encoder is None:
            return teacher
        from fewstep.text import Guided

        return Guided(teacher, text_encoder, self.cfg.guidance)

    def segments(self, step: int) -> tuple[int, int]:
        """(N_seg, T): N_seg = round(N_teacher(i) / S) >= 1 teacher steps per segment, T = N_seg S in total.
        Every rank computes this from the global step (no rank-0-only curriculum)."""
        S, vp = self.cfg.student_steps, self.cfg.vp
        n_seg = max(1, round(n_teacher(step, self.cfg) / S))
        T = n_seg * S
        # The schedule clips t to [t_min, t_max]; neighbouring grid points must stay distinct after clipping,
        # or invDDIM's denominator alpha_s - alpha_t sigma_s / sigma_t is 0.
        if 1.0 / T <= max(vp.t_min, 1.0 - vp.t_max):
            raise ValueError(
                f"teacher grid 1/T = 1/{T} is finer than the schedule clip (vp.t_min={vp.t_min}, "
                f"vp.t_max={vp.t_max}): lower vp.t_min / raise vp.t_max or lower n_end"
            )
        return n_seg, T

    def teacher_predictions(self, teacher: XPredictor | None, z_t: torch.Tensor, t: torch.Tensor,
                            labels: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_teacher, the conditional x_teacher): the data itself for CT; for a guided teacher (fewstep.text.Guided)
        the guided and the conditional predictions; otherwise the teacher's prediction twice."""
        if not self.distill:
            return x, x
        both = getattr(teacher, "with_conditional", None)
        x_teacher, x_cond = both(z_t, t, labels) if both else (teacher(z_t, t, labels),) * 2
        return x_teacher.to(x.dtype), x_cond.to(x.dtype)

    def teacher_x_var(self, x_teacher: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample (B,) variance of the teacher's x-prediction, for the aDDIM teacher step."""
        if not self.distill:  # CT: the "teacher" is the data point itself, exact
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.cfg.x_var == "analytic":
            return analytic_x_var(t, self.cfg.vp)
        # [MCM Alg. 1] x_var = eta ||x_teacher - x||^2 / D
        return self.cfg.eta * (x_teacher - x).flatten(1).square().mean(dim=1)

    def loss(
        self,
        model: XPredictor,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        teacher: XPredictor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.distill and teacher is None:
            raise ValueError("objective multistep_cd distills a diffusion teacher: pass teacher=")
        vp, S = self.cfg.vp, self.cfg.student_steps
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)  # (B, C, H, W)
        # 1. teacher steps at this iteration, split into S segments of N_seg steps [MCM App. A.1, Alg. 1]
        n_seg, T = self.segments(step)
        # 2. step ~ U{0..S-1}, n ~ U{1..N_seg}; t_step = step/S, t = t_step + n/T, s = t - 1/T
        t, s, t_step = draw_times(x.shape[0], n_seg, S, device=x.device, dtype=dtype)  # (B,) each
        # 3. z_t = alpha_t x + sigma_t eps [MCM sec. 2]
        alpha_t, sigma_t = alpha_sigma(t, vp)
        eps = torch.randn_like(x)
        z_t = alpha_t.view(-1, 1, 1, 1) * x + sigma_t.view(-1, 1, 1, 1) * eps
        with torch.no_grad():
            # 4. the teacher's x-prediction: the data (CT) or the diffusion teacher (CD); a guided teacher also
            #    gives its conditional prediction, from which x_var is computed [MCM App. A.1: "guidance zero"]
            x_teacher, x_cond = self.teacher_predictions(teacher, z_t, t, labels, x)
            # 5. x_var (CT: 0, so the aDDIM step below is DDIM)
            x_var = self.teacher_x_var(x_cond.to(dtype), x, t)
            # 6. one teacher step t -> s: z_s = aDDIM_{t->s}(x_teacher, z_t, x_var) [MCM Alg. 3]
            if self.cfg.teacher_sampler == "addim":
                z_s = addim(x_teacher, z_t, t, s, x_var, vp)
            else:
                z_s = ddim(x_teacher, z_t, t, s, vp)
            # 7. x_ref = stopgrad f(z_s, s); same dropout mask as step 10 (RNG forked here, replayed there)
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                x_ref = model(z_s, s, labels).to(dtype)
            # 8. z_ref = DDIM_{s->t_step}(x_ref, z_s) [MCM eq. 4]; identity when s = t_step (n = 1)
            z_ref = ddim(x_ref, z_s, s, t_step, vp)
            # 9. target: the x whose DDIM step t -> t_step lands on z_ref [MCM eq. 5]
            x_target = inv_ddim(z_ref, z_t, t, t_step, vp)
        # 10. student x_hat = f(z_t, t)
        x_hat = model(z_t, t, labels).to(dtype)
        # 11. L = w(t) d(x_hat, x_target), w(t) = SNR(t) + 1 [MCM Alg. 1]
        w = snr(t, vp) + 1.0  # (B,)
        loss = (w * self.distance(x_hat, x_target, self.c)).mean()
        return loss, {"n_teacher": float(T), "n_seg": float(n_seg)}

    def sample(
        self, model: XPredictor, noise: torch.Tensor, num_steps: int, labels: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        caps = self.capabilities
        caps.steps.check(num_steps, caps.steps_reason)  # an MCM is trained for exactly S steps
        return sample(model, noise, num_steps, labels, self.cfg.vp, sampler=caps.check_sampler(sampler, self.cfg.name))


def sample_times(num_steps: int) -> list[float]:
    """t = 1, (S-1)/S, ..., 1/S [MCM Alg. 2]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [(num_steps - k) / num_steps for k in range(num_steps)]


@torch.no_grad()
def sample(
    model: XPredictor,
    noise: torch.Tensor,
    num_steps: int,
    labels: torch.Tensor | None,
    cfg: VPConfig,
    sampler: Literal["ddim", "addim"] = "ddim",
    x_var: float | Literal["analytic"] = "analytic",
    clip: bool = True,
) -> torch.Tensor:
    """Multistep sampling [MCM Alg. 2]: z_1 = noise; for t = 1, ..., 1/S: x_hat = f(z_t, t), z_s = DDIM_{t->s}
    (or aDDIM with x_var: 'analytic' = 0.1 / (2 + SNR(t)), or a constant); returns the last x_hat (S calls).
    clip: clamp each x_hat to the data range [-1, 1] before stepping, as image samplers do."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not a VP sampler: choose one of {', '.join(SAMPLERS)}")
    z_t = noise  # (B, C, H, W); alpha(t_max) ~ 1e-4, so z_1 ~ N(0, I)
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)  # (B,)
    times = sample_times(num_steps)
    x_hat = noise
    for i, t_val in enumerate(times):
        t, s = t_val * ones, (t_val - 1.0 / num_steps) * ones
        x_hat = model(z_t, t, labels).to(noise.dtype)
        if clip:
            x_hat = x_hat.clamp(-1, 1)
        if i == len(times) - 1:
            break  # the sample is the final x_hat
        if sampler == "addim":
            var = analytic_x_var(t, cfg) if x_var == "analytic" else x_var
            z_t = addim(x_hat, z_t, t, s, var, cfg)
        else:
            z_t = ddim(x_hat, z_t, t, s, cfg)
    return x_hat
