"""Every iCT formula against the paper's worked numbers (ALGORITHMS.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.distances import default_huber_c, l2, pseudo_huber
from fewstep.edm import EDMConfig, EDMPrecond, c_in, c_out, c_skip, karras_sigmas
from fewstep.ict import ICTConfig, ICTObjective, curriculum_n, level_probabilities, sample

EDM = EDMConfig()


def test_curriculum_doubles_every_50k_for_400k_iterations():
    got = [curriculum_n(k, 400_000) for k in range(0, 400_000, 50_000)]
    assert got == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert curriculum_n(49_999, 400_000) == 11 and curriculum_n(50_000, 400_000) == 21
    assert curriculum_n(10**7, 400_000) == 1281  # capped at s1 + 1


def test_curriculum_respects_custom_cap_and_pace():
    # s1 / s0 = 16 -> 5 stages over K = 1000 -> K' = 200
    assert [curriculum_n(k, 1000, 10, 160) for k in (0, 199, 200, 800, 999)] == [11, 11, 21, 161, 161]


def test_huber_c_matches_paper():
    assert default_huber_c(3072) == pytest.approx(0.0299, abs=5e-5)
    assert default_huber_c(12288) == pytest.approx(0.0599, abs=5e-5)


def test_boundary_condition_coefficients():
    s = torch.tensor(EDM.sigma_min)
    assert c_skip(s, EDM).item() == pytest.approx(1.0)
    assert c_out(s, EDM).item() == pytest.approx(0.0)
    # c_in has its square root: 1 / sqrt(sigma^2 + sigma_data^2)
    assert c_in(torch.tensor(1.0), EDM).item() == pytest.approx(1 / math.sqrt(1 + 0.25))


def test_precond_is_identity_at_sigma_min_whatever_the_network():
    class Junk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x, c, y):
            return self.w * torch.ones_like(x) * 100

    f = EDMPrecond(Junk(), EDM)
    x = torch.randn(4, 1, 8, 8)
    out = f(x, torch.full((4,), EDM.sigma_min), None)
    torch.testing.assert_close(out, x)


def test_karras_sigmas_endpoints_and_monotone():
    s = karras_sigmas(11, EDM)
    assert s[0].item() == pytest.approx(0.002) and s[-1].item() == pytest.approx(80.0)
    assert torch.all(s[1:] > s[:-1])


def test_level_probabilities_sum_to_one_and_peak_near_exp_pmean():
    s = karras_sigmas(1281, EDM)
    p = level_probabilities(s, -1.1, 2.0)
    assert p.shape == (1280,)
    assert p.sum().item() == pytest.approx(1.0)
    assert torch.all(p >= 0)
    # mass per unit log-sigma peaks near exp(P_mean) = 0.333
    density = p / torch.log(s[1:] / s[:-1])
    peak = s[int(density.argmax())].item()
    assert math.exp(-1.1) / 1.2 < peak < math.exp(-1.1) * 1.2


def test_pseudo_huber_zero_on_identical_inputs_and_like_l2_far_away():
    x = torch.randn(3, 1, 32, 32)
    assert torch.all(pseudo_huber(x, x, 0.03) == 0)
    y = x + 10.0
    ratio = pseudo_huber(x, y, 0.03) / l2(x, y)
    assert torch.allclose(ratio, torch.ones(3), atol=1e-3)
    # it is a norm over the whole sample, not element-wise: doubling D scales like sqrt(D)
    one = pseudo_huber(torch.zeros(1, 100), torch.ones(1, 100), 0.0)
    assert one.item() == pytest.approx(10.0)


def test_ict_loss_uses_student_as_teacher_with_same_dropout_mask():
    """With dropout, teacher and student share the mask: a model that is exactly consistent except for
    dropout noise gives zero loss only if both passes drew the same mask."""

    class DropoutIdentity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, sigma, y):
            # consistent "denoiser" for a dataset with a single point at 0, plus dropout noise that does
            # not depend on the input level
            return self.drop(torch.ones_like(x)) + 0 * self.p

    obj = ICTObjective(ICTConfig(), data_dim=64, total_steps=1000)
    m = DropoutIdentity().train()
    loss, info = obj.loss(m, torch.zeros(8, 1, 8, 8), None, step=0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert info["n_levels"] == 11


def test_ict_loss_is_positive_and_differentiable_for_a_real_model():
    from fewstep.networks import NetworkConfig, UNet

    torch.manual_seed(0)
    net = EDMPrecond(UNet(NetworkConfig(
        image_size=8, channels=[8, 8], attention=[False, False], attention_head_dim=8
    )), EDM)
    obj = ICTObjective(ICTConfig(), data_dim=64, total_steps=1000)
    loss, _ = obj.loss(net, torch.rand(4, 1, 8, 8) * 2 - 1, None, step=0)
    loss.backward()
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_sampler_step_counts_and_errors():
    calls = []

    def model(x, sigma, y):
        calls.append(float(sigma[0]))
        return torch.zeros_like(x)

    obj = ICTObjective(ICTConfig(sigma_mid=[0.821]), data_dim=64, total_steps=10)
    noise = torch.randn(2, 1, 8, 8)
    sample(model, noise, obj.sample_sigmas(1), None, 0.002)
    assert calls == [80.0]
    calls.clear()
    sample(model, noise, obj.sample_sigmas(2), None, 0.002)
    assert calls == pytest.approx([80.0, 0.821])
    with pytest.raises(ValueError, match="num_steps=3"):
        obj.sample_sigmas(3)


def test_zero_init_starts_every_residual_branch_and_the_output_at_zero_so_f_is_c_skip_x():
    """network.zero_init (ADM's zero_module): F = 0 at initialisation, so f(x, sigma) = c_skip(sigma) x exactly,
    and one optimizer step moves it (the zeroed layers still receive gradients)."""
    from fewstep.networks import NetworkConfig, UNet

    cfg = dict(image_size=8, channels=[8, 8], attention=[False, True], attention_head_dim=8, num_classes=3)
    torch.manual_seed(0)
    plain = UNet(NetworkConfig(**cfg))
    zeroed = UNet(NetworkConfig(**cfg, zero_init=True))
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    noise_cond = torch.full((4,), 0.25 * math.log(2.0))
    assert plain(x, noise_cond, labels).abs().max() > 0
    assert zeroed(x, noise_cond, labels).abs().max() == 0
    f = EDMPrecond(zeroed, EDM)
    sigma = torch.full((4,), 2.0)
    assert torch.allclose(f(x, sigma, labels), c_skip(sigma, EDM).view(-1, 1, 1, 1) * x)

    opt = torch.optim.Adam(zeroed.parameters(), lr=1e-2)
    zeroed(x, noise_cond, labels).sub(1.0).pow(2).mean().backward()
    opt.step()
    assert zeroed(x, noise_cond, labels).abs().max() > 0


def test_zero_init_applies_to_the_text_unet_too():
    from fewstep.networks import NetworkConfig, TextUNet

    cfg = NetworkConfig(image_size=8, channels=[8, 8], attention=[False, True], attention_head_dim=8, zero_init=True)
    net = TextUNet(cfg, text_dim=16)
    cond = {"states": torch.randn(2, 3, 16), "mask": torch.ones(2, 3, dtype=torch.bool), "pooled": torch.randn(2, 16)}
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2), cond).abs().max() == 0
