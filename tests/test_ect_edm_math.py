"""The VE family's diffusion end (EDM) and Easy Consistency Tuning, on worked numbers and exact cases."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.config import load_config
from fewstep.ect import ECTConfig, ECTObjective, ect_weight, gap_r
from fewstep.edm import EDMConfig, EDMPrecond, c_out, c_skip
from fewstep.edm_diffusion import edm_weight, sample, sampling_sigmas

EDM = EDMConfig()


def test_gap_r_is_the_staged_formula():
    # n(1) = 1 + 8 sigmoid(-1) = 3.1515...: at stage 0 the gap covers all of t (r = 0, the target is the data)
    assert gap_r(torch.tensor([1.0]), 0, q=2, k=8, b=1).item() == 0.0
    # t = 10, stage 3: n = 1 + 8 sigmoid(-10), r = 10 (1 - n / 16)
    n = 1 + 8 / (1 + math.exp(10))
    assert gap_r(torch.tensor([10.0]), 3, q=2, k=8, b=1).item() == pytest.approx(10 * (1 - n / 16), rel=1e-6)
    # k = 0: r = t (1 - q^-(stage+1)); the gap halves with every stage
    t = torch.tensor([0.5, 2.0, 40.0])
    for stage in range(4):
        torch.testing.assert_close(gap_r(t, stage, q=2, k=0, b=1), t * (1 - 0.5 ** (stage + 1)))
    assert torch.all(gap_r(t, 5, 2, 8, 1) < t)


def test_weights_are_the_papers():
    assert ect_weight(torch.tensor(2.0), 0.5).item() == pytest.approx(1 / 4 + 4)
    # EDM's lambda at sigma = sigma_data: 2 sigma_data^2 / sigma_data^4 = 8 for sigma_data = 0.5
    assert edm_weight(torch.tensor(0.5), 0.5).item() == pytest.approx(8.0)


def test_edm_preconditioning_has_no_offset_and_is_the_identity_at_zero_noise():
    s = torch.tensor([0.0, EDM.sigma_min, 1.0])
    torch.testing.assert_close(c_skip(s, EDM, 0.0), 0.25 / (s**2 + 0.25))
    torch.testing.assert_close(c_out(s, EDM, 0.0), 0.5 * s / torch.sqrt(s**2 + 0.25))
    assert c_skip(s, EDM, 0.0)[0].item() == 1.0 and c_out(s, EDM, 0.0)[0].item() == 0.0


class Fixed(torch.nn.Module):
    """A denoiser that ignores its input: the same prediction at every noise level."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, sigma, labels):
        return self.out.expand_as(x)


def ect(**over) -> ECTObjective:
    return ECTObjective(ECTConfig(**over), data_dim=64, total_steps=80)


def test_ect_target_is_the_data_where_r_is_zero():
    x, z = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    model = Fixed(torch.full((1, 1, 8, 8), 7.0))
    target = ect().target(model, x, z, torch.tensor([0.0, 0.3, 0.0]), None)
    torch.testing.assert_close(target[0], x[0])
    torch.testing.assert_close(target[2], x[2])
    assert torch.all(target[1] == 7.0)


def test_ect_loss_of_identical_predictions_is_zero_and_of_different_ones_is_not():
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    o = ect(stages=1, stage_steps=1)  # stage 40 at step 40: r ~ t > 0 everywhere
    loss, info = o.loss(Fixed(torch.zeros(1, 1, 8, 8)), x, None, step=40)
    assert loss.item() == 0.0 and info["stage"] == 40.0 and info["r_zero_frac"] == 0.0
    # at stage 0 most r are 0: the target is x, a constant prediction is far from it
    loss0, info0 = o.loss(Fixed(torch.zeros(1, 1, 8, 8)), x, None, step=0)
    assert loss0.item() > 0 and info0["r_zero_frac"] > 0.5


def test_ect_stages_follow_the_run_length():
    assert ect(stages=8).d == 10 and ect(stages=8).stage(79) == 7
    assert ect(stage_steps=25).stage(50) == 2


def test_heun_sampler_solves_the_probability_flow_ode_of_gaussian_data_to_second_order():
    # data ~ N(0, s^2 I): the ideal denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2), and the ODE maps
    # x(sigma_max) to x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2)
    s = 0.5
    ideal = lambda x, sigma, labels: x * s**2 / (s**2 + sigma.view(-1, 1, 1, 1).double() ** 2)  # noqa: E731
    noise = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = EDM.sigma_max * noise * s / math.sqrt(s**2 + EDM.sigma_max**2)
    inside = exact.abs() < 0.9  # away from the final clamp to [-1, 1]

    def error(n: int, heun: bool) -> float:
        got = sample(ideal, noise, sampling_sigmas(n, EDM), None, heun=heun)
        return ((got - exact)[inside].abs() / exact[inside].abs()).max().item()

    sigmas = sampling_sigmas(64, EDM)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0.0
    assert error(128, True) < 2e-3
    assert error(64, True) / error(128, True) > 3.5  # Heun: 2nd order
    assert 1.7 < error(64, False) / error(128, False) < 2.3  # Euler: 1st order
    # one step is one denoising from sigma_max
    one = sample(ideal, noise, sampling_sigmas(1, EDM), None)
    torch.testing.assert_close(one, ideal(EDM.sigma_max * noise, torch.tensor([80.0]), None).clamp(-1, 1))


def test_ect_and_edm_share_the_network_so_weights_move_between_them():
    tiny = ["network.channels=[8, 16]", "network.attention=[false, false]", "network.attention_head_dim=8"]
    from fewstep.objectives import build_model

    edm = build_model(load_config(None, None, [*tiny, "objective.name=edm"]))
    ect_model = build_model(load_config(None, None, [*tiny, "objective.name=ect"]))
    assert isinstance(edm, EDMPrecond) and edm.offset == 0.0 and ect_model.offset == 0.0
    ect_model.load_state_dict(edm.state_dict())  # strict: the same keys and shapes
