"""Engine configuration without a cluster: batch arithmetic across worker counts, precision and offload
validation, activation checkpointing, the divergence guard's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.config import ConfigError, OptimConfig, build_config
from fewstep.distributed import deepspeed_config, enable_activation_checkpointing
from fewstep.faults import DivergenceGuard
from fewstep.objectives import build_model
from fewstep.optim import lr_schedule


def cfg_with(**engine):
    tree = {
        "network": {"channels": [8, 16], "attention": [False, False], "attention_head_dim": 8},
        "optim": {"batch_size": 64},
        "engine": engine,
    }
    return build_config(tree)


@pytest.mark.parametrize("workers, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_global_batch_is_micro_x_accum_x_workers_for_any_worker_count(workers, accum):
    cfg = cfg_with(num_workers=workers, micro_batch=8)
    ds = deepspeed_config(cfg, workers)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 8 * accum * workers == cfg.optim.batch_size == 64


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_without_micro_batch_each_worker_takes_its_share_and_does_not_accumulate(workers):
    ds = deepspeed_config(cfg_with(num_workers=workers), workers)
    assert ds["train_micro_batch_size_per_gpu"] * workers == 64 and ds["gradient_accumulation_steps"] == 1


def test_batch_that_does_not_split_over_the_workers_names_the_fields():
    with pytest.raises(ConfigError, match=r"optim.batch_size=64 .* engine.micro_batch=8 x engine.num_workers=3"):
        cfg_with(num_workers=3, micro_batch=8)
    with pytest.raises(ValueError, match="engine.num_workers=2 but Ray started 4 workers"):
        deepspeed_config(cfg_with(num_workers=2), 4)


def test_fp16_is_refused_on_cpu_and_configures_loss_scaling_on_gpu():
    with pytest.raises(ConfigError, match=r"engine.precision=fp16 needs engine.use_gpu=true"):
        cfg_with(precision="fp16")
    cfg = cfg_with(precision="fp16", use_gpu=True, fp16={"initial_scale_power": 12, "loss_scale_window": 200})
    fp16 = deepspeed_config(cfg, 2)["fp16"]
    assert fp16 == {
        "enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 200,
        "hysteresis": 2, "min_loss_scale": 1.0,
    }
    with pytest.raises(ConfigError, match=r"engine.fp16.initial_scale_power"):
        cfg_with(precision="fp16", use_gpu=True, fp16={"initial_scale_power": 99})


def test_offload_needs_the_right_zero_stage_and_reaches_deepspeed():
    with pytest.raises(ConfigError, match="engine.offload_optimizer needs engine.zero_stage >= 1"):
        cfg_with(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ConfigError, match="engine.offload_params needs engine.zero_stage = 3"):
        cfg_with(zero_stage=2, offload_params=True)
    cfg = cfg_with(zero_stage=3, offload_optimizer=True, offload_params=True, zero3_persist_below=0)
    zero = deepspeed_config(cfg, 2)["zero_optimization"]
    assert zero == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                    "stage3_param_persistence_threshold": 0}


def test_activation_checkpointing_recomputes_without_changing_gradients():
    cfg = cfg_with()
    torch.manual_seed(0)
    plain = build_model(cfg)
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(ckpt)
    assert ckpt.net.unet.is_gradient_checkpointing and not plain.net.unet.is_gradient_checkpointing
    x, sigma = torch.randn(2, 1, 32, 32), torch.tensor([0.5, 2.0])
    labels = torch.tensor([1, 2])
    saved = {}
    for tag, m in (("plain", plain), ("ckpt", ckpt)):
        m.train()
        saved[tag] = 0

        def pack(t, tag=tag):  # activations autograd keeps for backward (outside checkpointed blocks)
            saved[tag] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(x, sigma, labels).square().mean()
        loss.backward()
    assert saved["ckpt"] < 0.5 * saved["plain"]  # the blocks' activations are recomputed in backward instead
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_divergence_guard_counts_and_trips_after_k_in_a_row():
    g = DivergenceGuard(max_bad=2, world_size=1, skipped=5)
    assert not g.bad(torch.tensor(1.0))
    assert g.bad(torch.tensor(math.nan)) and not g.diverged
    assert not g.bad(torch.tensor(2.0)) and g.in_a_row == 0  # a good loss resets the streak
    assert g.bad(torch.tensor(math.inf)) and g.bad(torch.tensor(-math.inf)) and g.diverged
    assert g.skipped == 8  # 5 restored + 3 here
    assert "engine.max_bad_steps=2" in g.message(step=7, last_checkpoint=5)


def test_a_job_driver_does_not_import_the_network_library():
    """Start-up: reading a config or importing the engine on the job driver leaves diffusers (and the transformers
    it pulls in, ~2-4 s on 2 cores) to the processes that build a network."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, pipelines.train, fewstep.config, fewstep.engine; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{root / 'platform'}:{root}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    # building a net still loads it (a fresh process: this one may have imported diffusers long before)
    code = ("import sys, fewstep.config, fewstep.objectives; before = 'diffusers' in sys.modules; "
            "cfg = fewstep.config.build_config({'network': {'channels': [8, 16], 'attention': [False, False], "
            "'attention_head_dim': 8}}); fewstep.objectives.build_model(cfg); "
            "print(before, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{root / 'platform'}:{root}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False True"


def test_lr_warms_up_holds_then_decays_linearly_to_zero_at_the_last_step():
    def lrs(**kw) -> list[float]:
        cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=20, **kw)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched, out = lr_schedule(opt, cfg), []
        for _ in range(cfg.total_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    constant = lrs()
    assert constant[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]) and constant[-1] == 1.0  # iCT: constant
    decayed = lrs(decay_fraction=0.5)  # the last 10 of 20 steps
    assert decayed[:10] == constant[:10]  # warm-up and the stable phase are unchanged
    assert decayed[10:] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])  # (total - step) / decay
