"""Every objective trains through a real DeepSpeed engine (ZeRO-2, one gloo rank in this process) in bf16 on CPU,
and its loss follows the fp32 run within a stated tolerance; the evaluation EMA averages the fp32 master weights,
not their bf16 copies."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import free_port
from torch.optim.swa_utils import AveragedModel

from fewstep.backends import build_backend
from fewstep.config import load_config
from fewstep.faults import DivergenceGuard
from fewstep.generator import Generator
from fewstep.objectives import build_model, build_objective
from fewstep.optim import ema_update
from fewstep.teacher import FrozenTeacher
from fewstep.train_step import train_step

pytestmark = pytest.mark.integration
TINY = ["network.channels=[8, 16]", "network.attention=[false, false]", "network.attention_head_dim=8",
        "network.num_classes=10", "optim.batch_size=8", "optim.lr=0.0005", "optim.warmup_steps=1",
        "engine.num_workers=1", "engine.zero_stage=2", "ema.decay=0.0"]  # EMA = the last weights
STEPS = 4
# bf16 keeps 8 bits of mantissa: one forward pass differs from fp32 by ~1% relative; 4 steps of training stay close
REL_TOL = 0.05
OBJECTIVES = {
    "ict": [], "ect": [], "edm": [], "diffusion": [],
    "multistep_ct": ["objective.student_steps=2", "objective.n_start=8", "objective.n_end=8"],
    "multistep_cd": ["objective.student_steps=2", "objective.n_start=8", "objective.n_end=8",
                     "objective.teacher=in-memory", "objective.init_from=null"],
}


@pytest.fixture(scope="module")
def one_rank():
    """torch.distributed with a single gloo rank: what DeepSpeed needs to build an engine outside Ray Train."""
    import deepspeed
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run(name: str, precision: str, teacher) -> tuple[list[float], AveragedModel, object]:
    cfg = load_config(None, None, [*TINY, f"objective.name={name}", f"engine.precision={precision}",
                                   *OBJECTIVES[name]])
    torch.manual_seed(0)
    backend = build_backend(cfg, build_model(cfg), world=1)
    ema = AveragedModel(build_model(cfg), multi_avg_fn=ema_update(cfg.ema.decay))
    objective, guard = build_objective(cfg), DivergenceGuard(3, 1)
    data = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        x = torch.rand(8, 1, 32, 32, generator=data) * 2 - 1
        y = torch.randint(0, 10, (8,), generator=data)
        torch.manual_seed(100 + step)  # the same noise draws in both precisions
        out = train_step(backend, objective, x, y, step, guard, teacher=teacher, ema=ema)
        assert out.stepped and not out.skipped
        losses.append(out.loss)
    return losses, ema, backend


@pytest.fixture(scope="module")
def teacher():
    cfg = load_config(None, None, [*TINY, "objective.name=diffusion"])
    torch.manual_seed(7)
    return FrozenTeacher(Generator(build_model(cfg), cfg))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_bf16_training_follows_fp32_and_its_ema_averages_the_fp32_masters(name, one_rank, teacher):
    t = teacher if name == "multistep_cd" else None
    fp32, _, _ = run(name, "fp32", t)
    bf16, ema, backend = run(name, "bf16", t)
    for step, (a, b) in enumerate(zip(fp32, bf16, strict=True)):
        assert abs(b - a) <= REL_TOL * abs(a), f"{name} step {step + 1}: bf16 loss {b} vs fp32 {a}"
    # the engine computes in bf16; the EMA (decay 0: the last weights) is its fp32 masters, not their bf16 copies
    from deepspeed.utils import safe_get_full_fp32_param

    assert next(backend.module.parameters()).dtype == torch.bfloat16
    masters = torch.cat([safe_get_full_fp32_param(p).flatten() for p in backend.module.parameters()])
    ema_params = torch.cat([p.flatten() for p in ema.module.parameters()])
    assert ema_params.dtype == torch.float32 and torch.equal(ema_params, masters)
    assert not torch.equal(ema_params, ema_params.bfloat16().float())
