"""Numerics that silently change results on GPUs (docs/algorithms.md section 7), exercised on CPU: the noise level
reaches the network's time embedding in fp32 under bf16, and a guided teacher's aDDIM variance comes from its
conditional prediction."""

from __future__ import annotations

import pytest
import torch

from fewstep.config import load_config
from fewstep.edm import c_noise as ve_c_noise
from fewstep.edm import karras_sigmas
from fewstep.multistep import MultistepConfig, MultistepObjective
from fewstep.objectives import build_model
from fewstep.vp import VPConfig
from fewstep.vp import c_noise as vp_c_noise

TINY = ["network.channels=[8, 16]", "network.attention=[false, false]", "network.attention_head_dim=8"]
SCALE = 1000.0  # network.noise_embedding_scale (the default)


def time_embedding_inputs(model, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the sinusoidal time embedding received, its output as the bf16 network sees it) for each level."""
    seen = []
    hook = model.net.unet.time_proj.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    with torch.no_grad():
        model(torch.zeros(len(levels), 1, 32, 32), levels, None)
    hook.remove()
    inputs, emb = seen[0]
    return inputs, emb.to(torch.bfloat16)


def first_bf16_collision(values: torch.Tensor) -> int:
    """Index i of the first neighbours values[i], values[i+1] that are equal once rounded to bf16."""
    same = (values.to(torch.bfloat16)[1:] == values.to(torch.bfloat16)[:-1]).nonzero()
    assert len(same), "no neighbours collide in bf16: the test would not show anything"
    return int(same[0])


@pytest.mark.parametrize("name", ["ict", "ect", "edm"])
def test_adjacent_ve_levels_near_sigma_min_stay_distinct_in_a_bf16_network(name):
    # iCT's finest curriculum (1281 levels): its neighbours near sigma_min are one bf16 step apart or less
    sigmas = karras_sigmas(1281, load_config(None, None, TINY).objective.edm).float()
    i = first_bf16_collision(ve_c_noise(sigmas) * SCALE)
    pair = sigmas[i : i + 2]
    model = build_model(load_config(None, None, [*TINY, f"objective.name={name}"]))
    model.net.to(torch.bfloat16)
    inputs, emb = time_embedding_inputs(model, pair)
    assert inputs.dtype == torch.float32 and inputs[0] != inputs[1]
    assert not torch.equal(emb[0], emb[1])


@pytest.mark.parametrize("name", ["multistep_ct", "diffusion"])
def test_adjacent_mcm_grid_points_stay_distinct_in_a_bf16_network(name):
    vp = VPConfig()
    t = torch.arange(1, 1280, dtype=torch.float64) / 1280  # the annealed teacher grid, n_end = 1280
    i = first_bf16_collision(vp_c_noise(t, vp).float() * SCALE)
    pair = t[i : i + 2].float()
    model = build_model(load_config(None, None, [*TINY, f"objective.name={name}"]))
    model.net.to(torch.bfloat16)
    inputs, emb = time_embedding_inputs(model, pair)
    assert inputs.dtype == torch.float32 and inputs[0] != inputs[1]
    assert not torch.equal(emb[0], emb[1])


class GuidedLike(torch.nn.Module):
    """A teacher with classifier-free guidance: a guided and a conditional x-prediction (as fewstep.text.Guided)."""

    def __init__(self, guided: float, conditional: float):
        super().__init__()
        self.guided, self.conditional = guided, conditional

    def with_conditional(self, z_t, t, cond):
        return torch.full_like(z_t, self.guided), torch.full_like(z_t, self.conditional)

    def forward(self, z_t, t, cond):
        return self.with_conditional(z_t, t, cond)[0]


def test_addim_variance_of_a_guided_teacher_comes_from_its_conditional_prediction():
    cd = MultistepObjective(MultistepConfig(name="multistep_cd", teacher="x", student_steps=2, n_start=8, n_end=8),
                            data_dim=64)
    student = lambda z, t, y: torch.zeros_like(z)  # noqa: E731
    x = torch.rand(8, 1, 8, 8) * 2 - 1

    def loss(teacher) -> float:
        torch.manual_seed(0)
        return cd.loss(student, x, None, step=0, teacher=teacher)[0].item()

    # the same guided prediction, different conditional ones: x_var (and so the aDDIM step) differs
    assert loss(GuidedLike(0.5, 0.5)) != loss(GuidedLike(0.5, -0.5))
    # an unguided teacher is its own conditional prediction
    assert loss(GuidedLike(0.5, 0.5)) == loss(lambda z, t, y: torch.full_like(z, 0.5))
    x_teacher, x_cond = cd.teacher_predictions(GuidedLike(0.3, 0.7), torch.zeros(2, 1, 8, 8), torch.ones(2), None, x)
    assert x_teacher.unique().item() == pytest.approx(0.3) and x_cond.unique().item() == pytest.approx(0.7)
