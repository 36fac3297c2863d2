"""Every shipped preset resolves (as `pipelines.train` loads it; `--dry-run` would also check its shards and models,
which are not here), builds its objective and, at reduced width, its model; one loss step runs and every step count
the preset evaluates is one its objective can sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from fewstep.config import build_config, load_config, to_yaml
from fewstep.generator import Generator
from fewstep.objectives import build_model, build_objective, capabilities
from pipelines.presets import available, preset_path


@pytest.mark.parametrize("name", available())
def test_preset_resolves_and_builds(name):
    tree = yaml.safe_load(to_yaml(load_config(preset_path(name))))
    cfg = build_config(tree, source=f"preset {name}")
    assert cfg.name == name and cfg.tracking.registered_model
    objective = build_objective(cfg)
    if cfg.objective.name == "multistep_cd":
        assert cfg.objective.teacher.startswith("models:/") and cfg.objective.init_from == "teacher"
    if name.startswith("imagenet64-m"):  # the paper's settings [MCM App. A.1]
        o = cfg.objective
        assert (cfg.optim.total_steps, cfg.optim.batch_size) == (200_000, 2048) and cfg.network.dropout > 0
        assert (o.n_start, o.n_end, o.anneal_steps) == (64, 1280, 100_000)
        assert round(objective.segments(0)[1]) == 64 and objective.segments(10**6)[1] == 1280

    # reduced width, same depth / resolution / classes / objective
    levels = len(cfg.network.channels)
    tree["network"].update(channels=[8] * levels, attention_head_dim=8, norm_groups=4, layers_per_block=1)
    small = build_config(tree, source=f"preset {name} (reduced width)")
    torch.manual_seed(0)
    model = build_model(small)
    k = small.data.num_classes
    x = torch.rand(2, small.data.channels, small.data.image_size, small.data.image_size) * 2 - 1
    labels = torch.tensor([0, k - 1]) if small.network.num_classes else None
    if small.text.enabled:  # text-to-image presets: the frozen encoder's conditioning instead of class labels
        from fewstep.text import TextEncoder

        labels = TextEncoder(small.text)(["a photo of a bag", ""])
    extra = {"teacher": build_model(small).eval()} if capabilities(small).teacher == "required" else {}
    loss, _ = build_objective(small).loss(model, x, labels, step=0, **extra)
    loss.backward()
    assert torch.isfinite(loss)
    # every step count the preset samples is one its objective accepts; sample the fewest for real (diffusion: 1)
    caps = capabilities(small)
    wanted = sorted({*small.eval.steps, *(small.eval.fid_steps or [])})
    assert all(k in caps.steps for k in wanted), (wanted, str(caps.steps))
    fewest = caps.steps.lo
    prompt = ["a photo of a bag"] if small.text.enabled else np.array([1]) if labels is not None else None
    img = Generator(model, small).generate(1, num_steps=fewest, labels=prompt)
    assert img.shape == (1, small.data.image_size, small.data.image_size, small.data.channels)
