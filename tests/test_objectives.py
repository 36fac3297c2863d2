"""One knob selects the objective: config -> model -> loss -> sampler -> export, for every objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.config import ConfigError, load_config
from fewstep.generator import Generator
from fewstep.objectives import build_model, build_objective

TINY = [
    "network.num_classes=10",
    "network.channels=[8, 16]",
    "network.attention=[false, false]",
    "network.attention_head_dim=8",
]


def tiny(*sets: str):
    return load_config(None, None, [*TINY, *sets])


@pytest.mark.parametrize(
    "name, ok_steps, bad_steps",
    [("ict", [1, 2], 3), ("multistep_ct", [4], 2), ("diffusion", [1, 3, 8], None), ("edm", [1, 2, 5], None),
     ("ect", [1, 2], 3)],
)
def test_each_objective_trains_a_step_and_samples_its_step_counts(name, ok_steps, bad_steps, tmp_path):
    cfg = tiny(f"objective.name={name}", *(["objective.student_steps=4"] if name == "multistep_ct" else []))
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = build_objective(cfg)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    loss, info = objective.loss(model, x, torch.tensor([0, 1, 2, 3]), step=0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    gen = Generator(model, cfg)
    for k in ok_steps:
        images = gen.generate(3, num_steps=k, labels=np.array([0, 5, 9]))
        assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
    if bad_steps is not None:
        with pytest.raises(ValueError, match=f"num_steps={bad_steps}"):
            gen.generate(1, num_steps=bad_steps, labels=np.array([0]))
    # the export round-trips bit for bit, with no DeepSpeed and no pickle
    back = Generator.from_dir(gen.save(tmp_path / name))
    assert type(back.objective) is type(objective)
    np.testing.assert_array_equal(
        back.generate(2, num_steps=ok_steps[0], seed=3, labels=np.array([1, 2])),
        gen.generate(2, num_steps=ok_steps[0], seed=3, labels=np.array([1, 2])),
    )


def test_bad_labels_and_unknown_objective_are_clear_errors():
    gen = Generator(build_model(tiny()), tiny())
    with pytest.raises(ValueError, match="class_label 10 is out of range"):
        gen.generate(1, labels=np.array([10]))
    with pytest.raises(ConfigError, match="objective"):
        tiny("objective.name=gan")
    with pytest.raises(ConfigError, match="objective.teacher is required"):
        tiny("objective.name=multistep_cd")
