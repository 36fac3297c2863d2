"""Post-hoc EMA (EDM2 sec. 3, App. C): tracking, closed-form profiles, reconstruction, safetensors snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fewstep import posthoc_ema as ph
from fewstep.posthoc_ema import (
    PowerFunctionEMA,
    Snapshot,
    gamma_from_sigma_rel,
    load_snapshot,
    power_function_beta,
    power_function_weights,
    power_profile_dot,
    reconstruct,
    save_snapshot,
    sigma_rel_from_gamma,
    solve_posthoc_coefficients,
)

STEPS = 200
EVERY = 20


def _train(seed: int = 0):
    """A toy nn.Linear trained by SGD on a random regression (plus gradient noise) for STEPS steps, tracked by
    a PowerFunctionEMA; returns the tracker, the snapshots saved every EVERY steps and the parameter history."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    target = torch.randn(6, 3, generator=g)
    tracker = PowerFunctionEMA(model)
    history: list[dict[str, torch.Tensor]] = []
    snapshots: list[Snapshot] = []
    for step in range(1, STEPS + 1):
        x = torch.randn(16, 6, generator=g)
        loss = ((model(x) - x @ target) ** 2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():  # plain SGD, lr 0.05, on the gradient plus noise
            for p, grad in zip(model.parameters(), grads, strict=True):
                p.sub_(0.05 * (grad + torch.randn(p.shape, generator=g)))
        tracker.update(model, step)
        history.append({n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()})
        if step % EVERY == 0:
            snapshots.extend(tracker.snapshot())
    return tracker, snapshots, history


@pytest.fixture(scope="module")
def trained():
    return _train()


def _exact(history: list[dict[str, torch.Tensor]], sigma_rel: float, t: int) -> dict[str, torch.Tensor]:
    """The power-function EMA at step t from the profile definition: sum_tau w(tau) theta_tau."""
    w = power_function_weights(gamma_from_sigma_rel(sigma_rel), t)
    return {n: sum(float(w[i]) * history[i][n] for i in range(t)) for n in history[0]}


def _max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def test_tracked_ema_equals_closed_form_profile_on_history(trained):
    tracker, _, history = trained
    for ema, sigma in zip(tracker.emas, tracker.sigma_rels, strict=True):
        exact = _exact(history, sigma, STEPS)
        assert _max_err(ema, exact) < 2e-5
        # Not trivially close: the EMA is far from the last parameters and from a uniform average.
        assert _max_err(exact, history[-1]) > 1e-2
        uniform = {n: sum(h[n] for h in history) / STEPS for n in history[0]}
        assert _max_err(exact, uniform) > 1e-2
        assert ema["weight"].dtype == torch.float32
    # The two tracked lengths differ, and the profile weights integrate to one.
    assert _max_err(tracker.emas[0], tracker.emas[1]) > 1e-2
    assert power_function_weights(tracker.gammas[0], STEPS).sum() == pytest.approx(1.0, abs=1e-12)


def test_beta_and_sparse_updates_match_profile():
    gamma = gamma_from_sigma_rel(0.1)
    assert power_function_beta(gamma, 1) == 0.0
    assert power_function_beta(gamma, 10) == pytest.approx(0.9 ** (gamma + 1))
    # Updating every 4 steps (dt = 4) still follows the profile with theta constant over each interval.
    model = torch.nn.Linear(2, 1)
    tracker = PowerFunctionEMA(model, sigma_rels=[0.1])
    history = []
    for step in range(1, 41):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        if step % 4 == 0:
            tracker.update(model, step)
        history.append(model.weight.detach().double().clone())
    w = power_function_weights(gamma, 40)
    block = [sum(w[i - 3 : i + 1]) for i in range(3, 40, 4)]  # weight of each 4-step block
    exact = sum(b * history[i] for b, i in zip(block, range(3, 40, 4), strict=True))
    assert torch.allclose(tracker.emas[0]["weight"].double(), exact, atol=1e-5)
    with pytest.raises(ValueError):
        tracker.update(model, 40)


def test_reconstruction_of_tracked_and_untracked_emas(trained):
    tracker, snapshots, history = trained
    # The tracked sigma_rel = 0.05 EMA at the last step, reconstructed from both EMAs' snapshots.
    rec, c = reconstruct(snapshots, 0.05, STEPS)
    assert _max_err(rec, tracker.emas[0]) < 1e-4
    # An untracked length in between: closer to its exact value than either tracked EMA.
    exact = _exact(history, 0.075, STEPS)
    rec, c = reconstruct(snapshots, 0.075)
    assert c.shape == (len(snapshots),)
    assert _max_err(rec, exact) < 0.1 * min(_max_err(tracker.emas[0], exact), _max_err(tracker.emas[1], exact))
    # And at an earlier snapshot step, against the two tracked EMAs at that step.
    exact = _exact(history, 0.075, 160)
    rec, _ = reconstruct(snapshots, 0.075, 160)
    tracked = [_exact(history, s, 160) for s in tracker.sigma_rels]
    assert _max_err(rec, exact) < 0.1 * min(_max_err(t, exact) for t in tracked)


def test_coefficients_sum_to_one_and_fit_profile():
    steps = [t for t in range(20, 201, 20) for _ in range(2)]
    gammas = [gamma_from_sigma_rel(s) for _ in range(10) for s in (0.05, 0.10)]
    # Least squares does not impose sum(c) = 1: it follows from fitting a unit-mass profile well. Tight within
    # the tracked range at late snapshot steps, looser early, off the snapshot grid or outside [0.05, 0.10].
    cases = [
        (0.05, 200, 1e-6),
        (0.075, 200, 2e-3),
        (0.06, 180, 2e-3),
        (0.09, 100, 5e-3),
        (0.1, 150, 2e-2),
        (0.04, 170, 2e-2),
        (0.13, 200, 2e-2),
    ]
    for target_sigma, target_step, tol in cases:
        c = solve_posthoc_coefficients(steps, gammas, target_step, target_sigma)
        assert c.shape == (20,) and c.dtype == np.float64
        assert c.sum() == pytest.approx(1.0, abs=tol), (target_sigma, target_step, c.sum())
    # Tracked target: the least-squares solution is that snapshot alone.
    c = solve_posthoc_coefficients(steps, gammas, 200, 0.05)
    assert np.allclose(c, np.eye(20)[18], atol=1e-6)


def test_profile_inner_product_closed_form_matches_quadrature():
    nodes, weights = np.polynomial.legendre.leggauss(200)  # Gauss-Legendre on [-1, 1]

    def profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
        return (gamma + 1) * tau**gamma / t ** (gamma + 1)

    for t_a, g_a, t_b, g_b in [(100, 6.94, 200, 16.97), (200, 16.97, 100, 6.94), (150, 3.0, 150, 8.5)]:
        half = min(t_a, t_b) / 2  # the product vanishes past the shorter profile
        tau = half * (nodes + 1)
        numeric = half * np.sum(weights * profile(tau, t_a, g_a) * profile(tau, t_b, g_b))
        assert power_profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-9)
    # Finite at image-counted times where t^(gamma + 1) alone would overflow.
    assert math.isfinite(float(power_profile_dot(1e9, 16.97, 2e9, 16.97)))


def test_sigma_rel_gamma_round_trip_and_paper_values():
    # EDM2 sec. 3.1: sigma_rel 0.05 / 0.10 correspond to gamma of about 16.97 / 6.94 (our cubic agrees).
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma in [0.01, 0.05, 0.075, 0.1, 0.2, 0.28]:
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma)) == pytest.approx(sigma, rel=1e-10)
    for gamma in [0.0, 1.0, 6.94, 16.97, 100.0]:
        assert gamma_from_sigma_rel(sigma_rel_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-8)
    # The definition: the standard deviation of p(tau) ∝ tau^gamma on [0, 1].
    gamma = 6.94
    mean = (gamma + 1) / (gamma + 2)
    second = (gamma + 1) / (gamma + 3)
    assert sigma_rel_from_gamma(gamma) == pytest.approx(math.sqrt(second - mean**2), rel=1e-12)
    with pytest.raises(ValueError):
        gamma_from_sigma_rel(0.3)


def test_snapshot_safetensors_round_trip_and_resume(trained, tmp_path, monkeypatch):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    tracker, snapshots, _ = trained
    snap = snapshots[-2]
    path = tmp_path / "ema.safetensors"
    save_snapshot(path, snap)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"step": str(STEPS), "gamma": repr(snap.gamma)}
    loaded = load_snapshot(path)
    assert loaded.step == STEPS and loaded.gamma == snap.gamma
    assert loaded.sigma_rel == pytest.approx(0.05)
    assert loaded.tensors.keys() == snap.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], snap.tensors[k]) for k in snap.tensors)
    # The tracker's state is flat tensors too: resume through a safetensors file.
    from safetensors.torch import load_file, save_file

    save_file(tracker.state_dict(), str(tmp_path / "state.safetensors"))
    resumed = PowerFunctionEMA(torch.nn.Linear(6, 3))
    resumed.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert resumed.step == STEPS
    assert _max_err(resumed.emas[1], tracker.emas[1]) == 0.0
    with pytest.raises(ValueError):
        PowerFunctionEMA(torch.nn.Linear(6, 3), sigma_rels=[0.2]).load_state_dict(tracker.state_dict())
    assert "torch.load" not in open(ph.__file__).read()


# --- the post-hoc EMA in training: ema.mode=posthoc through the real train_step on the local backend ---------

def _posthoc_config(tmp_path, **sets):
    import json

    from fewstep.config import load_config
    from pipelines.presets import preset_path

    base = {"network.channels": [8, 16], "network.attention": [False, False], "network.attention_head_dim": 8,
            "optim.batch_size": 4, "optim.total_steps": 16, "optim.warmup_steps": 1, "optim.lr": 1e-2,
            "engine.backend": "local", "engine.num_workers": 1, "engine.storage_path": str(tmp_path),
            "data.test_shards": None, "ema.mode": "posthoc", "ema.snapshot_every": 4, **sets}
    return load_config(preset_path("fashion-ict"), None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_ema_config_validates_posthoc_fields(tmp_path):
    from fewstep.config import ConfigError

    cfg = _posthoc_config(tmp_path)
    assert cfg.ema.sigma_rels == [0.05, 0.10] and cfg.ema.snapshot_interval(16) == 4
    assert _posthoc_config(tmp_path, **{"ema.snapshot_every": None}).ema.snapshot_interval(100) == 6
    with pytest.raises(ConfigError, match=r"ema.sigma_rels.*\(0, 0.2887\]"):
        _posthoc_config(tmp_path, **{"ema.sigma_rels": [0.05, 0.3]})
    with pytest.raises(ConfigError, match="ema.mode"):
        _posthoc_config(tmp_path, **{"ema.mode": "karras"})


def test_posthoc_ema_tracked_through_train_step_matches_profile_and_snapshots(tmp_path):
    """16 real optimizer steps of a tiny iCT UNet (LocalBackend, train_step): each tracked EMA equals the closed-form
    power-function profile applied to the recorded parameter history; the snapshots every 4 steps (written to
    staging, then into a checkpoint directory with the trackers' state) reconstruct the tracked EMA; a fresh
    tracker restored from that checkpoint holds the same EMAs and snapshots."""
    cfg = _posthoc_config(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loop does (engine.threads_per_worker); a tiny net loses to thread overhead
    try:
        _track_and_check(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _track_and_check(cfg, tmp_path):
    from fewstep.backends import build_backend
    from fewstep.ema import PosthocEMA, build_ema, checkpoint_snapshots
    from fewstep.faults import DivergenceGuard
    from fewstep.objectives import build_model, build_objective
    from fewstep.train_step import train_step

    torch.manual_seed(0)
    backend = build_backend(cfg, build_model(cfg), 1)
    objective, guard = build_objective(cfg), DivergenceGuard(3, 1)
    ema = build_ema(cfg, torch.device("cpu"), tmp_path)
    assert isinstance(ema, PosthocEMA) and ema.every == 4
    history = []
    g = torch.Generator().manual_seed(1)
    for step in range(cfg.optim.total_steps):
        x = torch.rand((4, 1, 32, 32), generator=g) * 2 - 1
        y = torch.randint(0, 10, (4,), generator=g)
        out = train_step(backend, objective, x, y, step, guard, ema=ema)
        assert out.stepped
        history.append({n: p.detach().double().clone() for n, p in backend.module.named_parameters()})
    t = cfg.optim.total_steps
    assert ema.tracker.step == t
    for k, sigma in enumerate(cfg.ema.sigma_rels):
        exact = _exact(history, sigma, t)
        assert _max_err(ema.tracker.emas[k], exact) < 1e-5
        assert _max_err(exact, history[-1]) > 1e-3  # an average, not the last weights
    # the served module is the first tracked EMA itself
    assert _max_err(dict(ema.module.named_parameters()), ema.tracker.emas[0]) == 0.0

    ckpt = tmp_path / "checkpoint_a"
    ema.save(ckpt, t)
    snaps = checkpoint_snapshots(ckpt)
    assert sorted({s.step for s in snaps}) == list(range(4, t + 1, 4)) and len(snaps) == 2 * (t // 4)
    rec, c = reconstruct(snaps, 0.05, t)
    assert _max_err(rec, ema.tracker.emas[0]) < 1e-4
    assert c.sum() == pytest.approx(1.0, abs=1e-6)
    rec, _ = reconstruct(snaps, 0.10, t)
    assert _max_err(rec, ema.tracker.emas[1]) < 1e-4

    resumed = build_ema(cfg, torch.device("cpu"), tmp_path)
    assert resumed.restore(ckpt) == t
    assert _max_err(dict(resumed.module.named_parameters()), ema.tracker.emas[0]) == 0.0
    saved = {f.name for f in (ckpt / "posthoc_ema" / "snapshots").iterdir()}
    assert {f.name for f in resumed.staging.iterdir()} == saved  # carried into the resumed run's checkpoints
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        checkpoint_snapshots(tmp_path / "nothing")
