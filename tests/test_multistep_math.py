"""Multistep consistency / VP diffusion math (ALGORITHMS.md section 2): fast unit tests, no training."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.diffusion import DiffusionConfig, DiffusionObjective
from fewstep.multistep import (
    MultistepConfig,
    MultistepObjective,
    draw_times,
    n_teacher,
    sample,
    sample_times,
)
from fewstep.vp import VPConfig, VPPrecond, addim, alpha_sigma, analytic_x_var, c_noise, ddim, inv_ddim, snr

VP = VPConfig()
F64 = torch.float64


def test_shift_one_is_plain_cosine_and_shift_scales_snr():
    t = torch.linspace(VP.t_min, VP.t_max, 101, dtype=F64)
    alpha, sigma = alpha_sigma(t, VP)
    torch.testing.assert_close(alpha, torch.cos(math.pi * t / 2))
    torch.testing.assert_close(sigma, torch.sin(math.pi * t / 2))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    shifted = VPConfig(shift=0.5)
    torch.testing.assert_close(snr(t, shifted), 0.25 * snr(t, VP))
    # clipped ends: sigma > 0 at t = 0 and alpha > 0 at t = 1, in float32 too
    a, s = alpha_sigma(torch.tensor([0.0, 1.0]), VP)
    assert s[0] > 0 and a[1] > 0 and torch.isfinite(c_noise(torch.tensor([0.0, 1.0]), VP)).all()


def _pair(b: int = 6):
    torch.manual_seed(0)
    t = torch.rand(b, dtype=F64) * 0.9 + 0.05
    s = t * torch.rand(b, dtype=F64)  # 0 <= s < t
    return t, s


def test_inv_ddim_inverts_ddim():
    t, s = _pair()
    x, z_t = torch.randn(6, 3, 4, 4, dtype=F64), torch.randn(6, 3, 4, 4, dtype=F64)
    z_s = ddim(x, z_t, t, s, VP)
    torch.testing.assert_close(inv_ddim(z_s, z_t, t, s, VP), x)


def test_addim_with_zero_variance_is_ddim_and_adds_variance_otherwise():
    t, s = _pair()
    x, z_t = torch.randn(6, 3, 4, 4, dtype=F64), torch.randn(6, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(addim(x, z_t, t, s, 0.0, VP), ddim(x, z_t, t, s, VP))
    torch.testing.assert_close(addim(x, z_t, t, s, torch.zeros(6, dtype=F64), VP), ddim(x, z_t, t, s, VP))
    # x_var > 0 only lengthens the eps_hat component
    eps_d = ddim(x, z_t, t, s, VP) - alpha_sigma(s, VP)[0].view(-1, 1, 1, 1) * x
    eps_a = addim(x, z_t, t, s, analytic_x_var(t, VP), VP) - alpha_sigma(s, VP)[0].view(-1, 1, 1, 1) * x
    assert torch.all(eps_a.flatten(1).norm(dim=1) > eps_d.flatten(1).norm(dim=1))


def test_analytic_x_var_at_exactly_known_cosine_points():
    """x_var = 0.1 / (2 + alpha_t^2 / sigma_t^2), cosine schedule (alpha_t = cos(pi t / 2)), by hand:
    t = 1/3: alpha = cos(pi/6) = sqrt(3)/2, sigma = 1/2, SNR 3 -> 0.1/5; t = 1/2: SNR 1 -> 0.1/3;
    t = 2/3: alpha = 1/2, sigma = sqrt(3)/2, SNR 1/3 -> 0.1/(7/3) = 3/70; t -> 1: SNR -> 0, x_var -> 0.05;
    t -> 0: SNR -> infinity, x_var -> 0."""
    t = torch.tensor([1 / 3, 0.5, 2 / 3, 1.0, 0.0], dtype=F64)
    expected = torch.tensor([0.02, 0.1 / 3, 3 / 70, 0.05, 0.0], dtype=F64)
    # t = 1 and 0 are clipped to t_max / t_min = 1 - 1e-4 / 1e-4: SNR = tan^2(pi/2 * 1e-4) ~ 2.5e-8 or its inverse
    torch.testing.assert_close(analytic_x_var(t, VP), expected, rtol=1e-12, atol=1e-8)


@pytest.mark.parametrize("sampler", ["ddim", "addim"])
def test_sampler_calls_the_network_once_per_step(sampler):
    calls: list[float] = []

    def model(z, t, y):
        calls.append(float(t[0]))
        return torch.zeros_like(z)

    noise = torch.randn(2, 1, 4, 4)
    x = sample(model, noise, 1, None, VP, sampler=sampler)
    assert calls == [1.0] and x.shape == noise.shape
    calls.clear()
    sample(model, noise, 4, None, VP, sampler=sampler)
    assert calls == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert sample_times(2) == [1.0, 0.5]


def test_n_teacher_annealing_matches_paper():
    cfg = MultistepConfig()
    got = [round(n_teacher(i, cfg)) for i in (0, 50_000, 100_000, 200_000)]
    assert got == [64, 286, 1280, 1280]


@pytest.mark.parametrize("n_seg,S", [(1, 1), (16, 1), (5, 4), (320, 4)])
def test_time_draws_stay_inside_one_segment(n_seg, S):
    g = torch.Generator().manual_seed(0)
    t, s, t_step = draw_times(20_000, n_seg, S, generator=g)
    T = n_seg * S
    assert torch.all(t_step <= s) and torch.all(s < t) and torch.all(t <= t_step + 1.0 / S + 1e-7)
    torch.testing.assert_close(t - s, torch.full_like(t, 1.0 / T))
    assert set((t_step * S).round().long().tolist()) == set(range(S))  # every segment is drawn


def _gauss_denoiser(s0: float):
    """E[x | z_t] = alpha_t s0^2 / (alpha_t^2 s0^2 + sigma_t^2) z_t for x ~ N(0, s0^2 I)."""

    def f(z, t, y):
        a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(t, VP))
        return a * s0**2 / (a**2 * s0**2 + s**2) * z

    return f


def _chain_consistency_fn(teacher, n_seg: int, S: int):
    """The exact multistep consistency function of the teacher's discrete DDIM chain on the T-grid: walk z_t
    down the grid to its segment start t_step, then f = invDDIM_{t->t_step}(z_{t_step}, z_t)."""
    T = n_seg * S

    def f(z, t, y):
        out = []
        for b in range(z.shape[0]):
            k = round(float(t[b]) * T)
            if k == 0:  # only reached as x_ref at s = t_step = 0, where DDIM_{s->s} ignores it
                out.append(z[b])
                continue
            k0 = (k - 1) // n_seg * n_seg
            zb, tb = z[b : b + 1], t[b : b + 1]
            zj = zb
            for j in range(k, k0, -1):
                tj, sj = torch.tensor([j / T], dtype=F64), torch.tensor([(j - 1) / T], dtype=F64)
                zj = ddim(teacher(zj, tj, None), zj, tj, sj, VP)
            out.append(inv_ddim(zj, zb, tb, torch.tensor([k0 / T], dtype=F64), VP)[0])
        return torch.stack(out)

    return f


@pytest.mark.parametrize("S", [1, 4])
def test_cd_loss_vanishes_for_the_exact_consistency_function_of_gaussian_data(S):
    """Why not the ideal denoiser as the model: for x ~ N(0, s0^2 I) the PF-ODE maps z_t to sqrt(v_s / v_t) z_t
    (v_t = alpha_t^2 s0^2 + sigma_t^2), while E[x | z_t] shrinks differently at every t, so E[x | z_t] is not
    constant along a trajectory and two DDIM steps t -> s -> t_step differ from one t -> t_step: the denoiser
    is consistent only as S -> infinity. (aDDIM does not make the teacher step exact either: it overshoots
    v_s where DDIM undershoots.) What is exactly true: with an exact teacher and a DDIM teacher step, the
    consistency function *of the teacher's discrete chain* has zero loss, for every S, and the loss sees the
    difference between it and the denoiser."""
    s0, n_seg = 0.5, 16 // S
    teacher = _gauss_denoiser(s0)
    cfg = MultistepConfig(name="multistep_cd", student_steps=S, n_start=16, n_end=16, teacher_sampler="ddim",
                          distance="l2")
    obj = MultistepObjective(cfg, data_dim=8)
    x = s0 * torch.randn(32, 2, 2, 2, dtype=F64)
    torch.manual_seed(1)
    loss, info = obj.loss(_chain_consistency_fn(teacher, n_seg, S), x, None, step=0, teacher=teacher)
    assert info == {"n_teacher": 16.0, "n_seg": float(n_seg)}
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    torch.manual_seed(1)
    denoiser_loss, _ = obj.loss(teacher, x, None, step=0, teacher=teacher)
    assert denoiser_loss.item() > 1e-3


@pytest.mark.parametrize("name,teacher_sampler", [("multistep_ct", "ddim"), ("multistep_cd", "addim")])
def test_loss_vanishes_for_single_point_data(name, teacher_sampler):
    """Data = one point mu: f = mu is the exact consistency function for every S (DDIM with a constant x is the
    exact ODE), the CD teacher is exact, x_var = eta ||mu - mu||^2 / D = 0, so both CT and CD losses are 0."""
    mu = torch.linspace(-1, 1, 16, dtype=F64).view(1, 1, 4, 4)

    def const(z, t, y):
        return mu.expand_as(z)

    cfg = MultistepConfig(name=name, student_steps=2, teacher_sampler=teacher_sampler)
    loss, _ = MultistepObjective(cfg, data_dim=16).loss(const, mu.repeat(64, 1, 1, 1), None, 100, teacher=const)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_x_ref_and_student_share_the_dropout_mask():
    draws: list[torch.Tensor] = []

    def noisy(z, t, y):
        draws.append(torch.rand_like(z))  # stands in for a dropout mask drawn from the global RNG
        return draws[-1]

    MultistepObjective(MultistepConfig(), data_dim=16).loss(noisy, torch.zeros(4, 1, 4, 4), None, 0)
    assert len(draws) == 2 and torch.equal(draws[0], draws[1])


def test_cd_requires_teacher_and_grid_must_fit_the_clip():
    obj = MultistepObjective(MultistepConfig(name="multistep_cd"), data_dim=16)
    with pytest.raises(ValueError, match="teacher="):
        obj.loss(lambda z, t, y: z, torch.zeros(2, 1, 4, 4), None, 0)
    fine = MultistepObjective(MultistepConfig(n_end=20_000, student_steps=1), data_dim=16)
    with pytest.raises(ValueError, match="vp.t_min"):
        fine.segments(10**6)
    with pytest.raises(ValueError, match="student_steps = 4"):
        MultistepObjective(MultistepConfig(), data_dim=16).sample(lambda z, t, y: z, torch.zeros(1, 1, 4, 4), 2, None)
    with pytest.raises(ValueError):
        MultistepConfig(bogus=1)


def test_vp_precond_is_v_prediction_and_losses_are_differentiable():
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, c, y):
            return self.w * x

    z, t = torch.randn(3, 1, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(VPPrecond(Zero(), VP)(z, t), alpha_sigma(t, VP)[0].view(-1, 1, 1, 1) * z)

    class Tiny(torch.nn.Module):  # F(x, c_noise, labels) like networks.UNet, without diffusers' import cost
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.drop = torch.nn.Dropout(0.2)

        def forward(self, x, c, y):
            return self.drop(self.conv(x)) + c.view(-1, 1, 1, 1)

    torch.manual_seed(0)
    net = VPPrecond(Tiny(), VP).train()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    objectives = (
        MultistepObjective(MultistepConfig(), 64),
        MultistepObjective(MultistepConfig(name="multistep_cd"), 64),
        DiffusionObjective(DiffusionConfig(), 64),
    )
    for obj in objectives:
        net.zero_grad()
        loss, _ = obj.loss(net, x, None, step=0, teacher=net)
        loss.backward()
        assert loss.item() > 0 and math.isfinite(loss.item())
        assert net.net.conv.weight.grad.abs().sum() > 0
    assert all(k in DiffusionObjective(DiffusionConfig(), 64).capabilities.steps for k in (1, 3, 1000))
    assert sample(net.eval(), torch.randn(2, 1, 8, 8), 2, None, VP, sampler="addim").abs().max() <= 1.0


@pytest.mark.parametrize("S", [1, 2, 8])
def test_analytic_gaussian_denoiser_as_teacher_and_model_has_zero_loss_with_one_teacher_step_per_segment(S):
    """The issue's known case, taken literally: x ~ N(0, s0^2 I), the analytic E[x | z_t] is both the teacher and
    the model. With N_seg = 1 (T = S) every draw has s = t_step, so the target invDDIM_{t->t_step}(DDIM_{t->t_step}
    (x_teacher, z_t), z_t) is x_teacher itself: zero loss for every S (the diffusion end, eq. 9). With N_seg > 1 it
    is not zero; the test above explains why and uses the exact chain consistency function instead."""
    s0 = 0.5
    denoiser = _gauss_denoiser(s0)
    cfg = MultistepConfig(name="multistep_cd", student_steps=S, n_start=S, n_end=S, teacher_sampler="ddim")
    x = s0 * torch.randn(64, 1, 4, 4, dtype=F64)
    loss, info = MultistepObjective(cfg, data_dim=16).loss(denoiser, x, None, step=0, teacher=denoiser)
    assert info["n_seg"] == 1.0 and loss.item() == pytest.approx(0.0, abs=1e-9)
    finer = MultistepConfig(name="multistep_cd", student_steps=S, n_start=4 * S, n_end=4 * S, teacher_sampler="ddim")
    loss, _ = MultistepObjective(finer, data_dim=16).loss(denoiser, x, None, step=0, teacher=denoiser)
    assert loss.item() > 1e-6
