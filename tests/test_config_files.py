"""Config files: `base:` inheritance, the one dotted-key setter, and the presets built on shared bases."""

from __future__ import annotations

import pytest
import yaml

from fewstep.config import ConfigError, apply_override, load_config, read_config_file, set_dotted
from pipelines.presets import PRESET_DIR, available, preset_path


def write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_file_deep_merges_over_its_base_chain(tmp_path):
    write(tmp_path / "root.yaml", {"optim": {"lr": 0.1, "batch_size": 64}, "seed": 1})
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", {"base": "../root.yaml", "optim": {"lr": 0.2}})
    leaf = write(tmp_path / "sub" / "leaf.yaml", {"base": "mid.yaml", "seed": 3})
    assert read_config_file(leaf) == {"optim": {"lr": 0.2, "batch_size": 64}, "seed": 3}


def test_missing_and_looping_bases_name_the_file(tmp_path):
    a = write(tmp_path / "a.yaml", {"base": "b.yaml"})
    with pytest.raises(ConfigError, match=r"a.yaml: base 'b.yaml' not found"):
        read_config_file(a)
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="inheritance loops"):
        read_config_file(a)


def test_set_dotted_creates_sections_and_refuses_to_descend_into_a_value():
    tree = {"optim": {"lr": 1}}
    set_dotted(tree, "optim.ema.decay", 0.9)
    assert tree == {"optim": {"lr": 1, "ema": {"decay": 0.9}}}
    with pytest.raises(ConfigError, match=r"optim.lr.x: 'lr' is not a section"):
        set_dotted(tree, "optim.lr.x", 2)
    apply_override(tree, "optim.lr=[1, 2]")
    assert tree["optim"]["lr"] == [1, 2]
    with pytest.raises(ConfigError, match=r"--set optim.lr: the value '\[1, 2' is not valid YAML"):
        apply_override(tree, "optim.lr=[1, 2")


def test_shared_bases_are_not_presets_and_every_fashion_preset_uses_one():
    bases = sorted(p.name for p in PRESET_DIR.glob("_*.yaml"))
    assert bases == ["_fashion-t2i.yaml", "_fashion.yaml", "_imagenet64.yaml"]
    assert not any(name.startswith("_") for name in available())
    with pytest.raises(ConfigError, match="unknown preset '_fashion'"):
        preset_path("_fashion")
    for name in available():
        if name.startswith("fashion-"):
            assert "base" in yaml.safe_load(preset_path(name).read_text()), name


def test_fashion_presets_share_data_and_network_except_where_they_say_otherwise():
    cfgs = {n: load_config(preset_path(n)) for n in available() if n.startswith("fashion-")}
    image = {n: c for n, c in cfgs.items() if not c.text.enabled}
    text = {n: c for n, c in cfgs.items() if c.text.enabled}
    assert len(image) >= 4 and len(text) >= 2
    for group in (image, text):
        first = next(iter(group.values()))
        for name, c in group.items():
            assert c.data == first.data, name
            net = c.network.model_dump(exclude={"noise_embedding_scale"})
            assert net == first.network.model_dump(exclude={"noise_embedding_scale"}), name
    # the distillation pairs must keep identical networks (the student starts from the teacher's weights)
    assert cfgs["fashion-mcd"].network == cfgs["fashion-diffusion"].network
    assert cfgs["fashion-t2i-mcd"].network == cfgs["fashion-t2i-diffusion"].network
