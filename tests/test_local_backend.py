"""The local backend: the same loop and train_step in one process, no Ray, no DeepSpeed. A toy objective registered
from this file trains through it untouched by any other module; a fixed-seed run on real data must learn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import Field
from torch import nn

from fewstep.config import load_config
from fewstep.engine import run, train
from fewstep.objectives import Capabilities, Objective, ObjectiveConfig, StepCounts, names, register
from pipelines.presets import preset_path


class ToyConfig(ObjectiveConfig):
    name: Literal["toy_denoise"] = "toy_denoise"
    sigma: float = Field(0.5, gt=0, description="The one noise level the toy model denoises.")


class Identity(nn.Module):
    """f(x, sigma) = x + F(x): a residual denoiser, no preconditioning."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, sigma, labels=None):
        return x + self.net(x, torch.log(sigma.reshape(-1)), labels)


@register("toy_denoise")
class ToyObjective(Objective):
    """Denoise at one fixed sigma: L = ||f(x + sigma z, sigma) - x||^2."""

    config = ToyConfig

    @classmethod
    def precondition(cls, net, cfg):
        return Identity(net)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(steps=StepCounts(1, 1), samplers=("toy",), default_sampler="toy", family="ve")

    def loss(self, model, x, cond, step, teacher=None):
        sigma = torch.full((x.shape[0],), self.cfg.sigma)
        pred = model(x + self.cfg.sigma * torch.randn_like(x), sigma, cond)
        return (pred - x).square().mean(), {"toy_sigma": self.cfg.sigma}

    def sample(self, model, noise, num_steps, cond, sampler=None, generator=None):
        self.capabilities.steps.check(num_steps)
        return model(noise, torch.full((noise.shape[0],), self.cfg.sigma), cond).clamp(-1, 1)


def local_config(shards, tmp_path, preset="fashion-ict", **sets):
    base = {
        "data.shards": str(shards), "data.test_shards": None,
        "network.channels": [8, 16], "network.attention": [False, False], "network.attention_head_dim": 8,
        "optim.batch_size": 16, "optim.total_steps": 2, "optim.warmup_steps": 1,
        "engine.backend": "local", "engine.num_workers": 1, "engine.checkpoint_every": 2, "engine.log_every": 1,
        "engine.storage_path": str(tmp_path / "runs"),
        "eval.every": 2, "eval.grid_size": 2, "eval.steps": [1],
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "local",
        "tracking.registered_model": None,
        **sets,
    }
    return load_config(preset_path(preset), None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_a_toy_objective_registered_here_trains_two_steps_through_the_local_backend(shards, tmp_path):
    assert "toy_denoise" in names()
    cfg = local_config(shards, tmp_path, objective={"name": "toy_denoise", "sigma": 0.3})
    assert isinstance(cfg.objective, ToyConfig) and cfg.objective.sigma == 0.3
    s = train(cfg, run_name="toy", output_dir=tmp_path / "out")
    assert s.steps == 2 and s.samples_png.is_file()
    client = MlflowClient(cfg.tracking.uri)
    assert [m.step for m in client.get_metric_history(s.run_id, "loss")] == [1, 2]
    assert client.get_metric_history(s.run_id, "toy_sigma")[-1].value == 0.3
    from fewstep.generator import Generator

    gen = Generator.from_dir(tmp_path / "out" / "toy" / "model")  # the export names the toy objective
    assert gen.objective.name == "toy_denoise" and gen.generate(2, labels=[0, 1]).shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="num_steps=2 is not available"):
        gen.generate(1, num_steps=2, labels=[0])


def test_a_diverged_local_run_says_so_and_is_marked_failed(shards, tmp_path):
    cfg = local_config(shards, tmp_path, **{"optim.total_steps": 4, "engine.max_bad_steps": 2,
                                            "engine.debug": {"nan_batches": [3, 4]}})
    r = run(cfg, "diverges")
    assert r.status == "diverged" and "2 non-finite losses in a row" in r.message
    assert r.checkpoint is not None and r.checkpoint.name == "checkpoint_000000002"  # the last good one
    run_ = MlflowClient(cfg.tracking.uri).get_run(r.run_id)
    assert run_.info.status == "FAILED" and run_.data.tags["fewstep.status"] == "diverged"


def test_local_run_resumes_from_its_checkpoint_bitwise(tmp_path):
    """4 steps straight vs 2 + 2 with a restart: the same student weights (the local backend's checkpoint holds
    the weights, optimizer, lr schedule, RNG and data position). One shard of 32 = 2 steps of 16 and no shuffle
    buffer: the checkpoint falls on an epoch boundary, so the data order is the same by construction."""
    import itertools

    from safetensors.torch import load_file

    from fewstep.data.shards import write_shards
    from fewstep.data.sources import fashion_mnist

    shards = tmp_path / "one"
    write_shards(itertools.islice(fashion_mnist("test"), 32), shards, samples_per_shard=32)

    def student(d: Path):
        return load_file(str(d / "local" / "student.safetensors"))

    sets = {"optim.total_steps": 4, "engine.checkpoint_every": 2, "optim.decay_fraction": 0.0, "data.shuffle_buffer": 0,
            "objective.curriculum_steps": 4}  # the stop shortens total_steps: keep N(k) and the lr of the long run
    straight = run(local_config(shards, tmp_path / "a", **sets), "straight")
    stopped = run(local_config(shards, tmp_path / "b", **{**sets, "optim.total_steps": 2}), "resumed")
    assert stopped.status == "finished" and stopped.metrics["step"] == 2
    resumed = run(local_config(shards, tmp_path / "b", **sets), "resumed")
    assert resumed.metrics["step"] == 4
    a, b = student(straight.checkpoint), student(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """scikit-learn's 8x8 digits (real data, shipped with the package) as tar shards."""
    from fewstep.data.shards import write_shards
    from fewstep.data.sources import digits_source

    src = digits_source("train")
    out = tmp_path_factory.mktemp("digits") / "train"
    write_shards(src.load(src.items), out, samples_per_shard=360)
    return out


# Measured with this exact config (seed 0, 150 steps of 32 on the 1437 training digits, 2 threads): the mean loss
# of the last 25 steps is 0.515 of the first 25 steps'. The bound leaves room for kernel differences between
# machines, not for a broken objective, step or optimizer (those stay near 1.0 or go non-finite).
LOSS_RATIO_BOUND = 0.6


def test_quality_regression_diffusion_on_digits_learns(digits_shards, tmp_path):
    cfg = local_config(
        digits_shards, tmp_path, preset="fashion-diffusion",
        **{"data.image_size": 8, "data.num_classes": 10, "network.image_size": 8, "network.channels": [32, 32],
           "network.attention": [False, False], "network.attention_head_dim": 8, "network.num_classes": 10,
           "network.dropout": 0.0, "optim.batch_size": 32, "optim.total_steps": 150, "optim.lr": 2e-3,
           "optim.warmup_steps": 10, "optim.decay_fraction": 0.0, "engine.checkpoint_every": 150,
           "eval.every": 150, "eval.steps": [4], "eval.fid_every": 0, "engine.threads_per_worker": 2, "seed": 0},
    )
    r = run(cfg, "digits")
    assert r.status == "finished"
    loss = [m.value for m in sorted(MlflowClient(cfg.tracking.uri).get_metric_history(r.run_id, "loss"),
                                    key=lambda m: m.step)]
    assert len(loss) == 150 and all(math.isfinite(v) for v in loss)
    ratio = np.mean(loss[-25:]) / np.mean(loss[:25])
    print(f"digits diffusion: loss ratio last/first 25 steps = {ratio:.3f}")
    assert ratio < LOSS_RATIO_BOUND
