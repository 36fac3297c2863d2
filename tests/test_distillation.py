"""multistep_cd without the cluster: teacher loading (safetensors + config.yaml), compatibility errors that name
the field, init-from-teacher, and the sampler choice that serving exposes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_objectives import tiny

from fewstep import lineage
from fewstep import teacher as teachers
from fewstep.config import ConfigError
from fewstep.generator import Generator
from fewstep.objectives import build_model, build_objective


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny("objective.name=diffusion", "network.dropout=0.1")
    return Generator(build_model(cfg), cfg).save(tmp_path_factory.mktemp("teacher") / "model")


def cd(teacher: str, *sets: str):
    return tiny("objective.name=multistep_cd", f"objective.teacher={teacher}", "objective.student_steps=2", *sets)


def test_teacher_loads_frozen_from_a_directory_and_initialises_the_student(teacher_dir):
    # a Ray Train checkpoint directory holds the export under model/: both spellings resolve
    assert teachers.pin(str(teacher_dir.parent), "unused") == str(teacher_dir.parent.resolve())
    teacher = teachers.load(str(teacher_dir.parent), "unused")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # its owner switching modes must not turn dropout on
    assert not teacher.model.training
    cfg = cd(str(teacher_dir))
    teachers.check_compatible(cfg, teachers.teacher_config(str(teacher_dir), "unused"))
    student = build_model(cfg)
    lineage.load_into(student, str(teacher_dir.parent), "unused")
    for (k, a), b in zip(student.state_dict().items(), teacher.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # the CD loss runs with it, gradients reach the student only
    x, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    loss, info = build_objective(cfg).loss(student, x, y, step=0, teacher=teacher)
    loss.backward()
    assert torch.isfinite(loss) and info["n_seg"] == 32.0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_mismatch_is_a_config_error_naming_the_field(teacher_dir, tmp_path):
    tcfg = teachers.teacher_config(str(teacher_dir), "unused")
    with pytest.raises(ConfigError, match=r"init_from='teacher' has another network: network.channels=\[8, 32\]"):
        lineage.check_compatible(cd(str(teacher_dir), "network.channels=[8, 32]"), tcfg, "teacher")
    # a different width is fine for the teacher itself (the student then starts from scratch)
    teachers.check_compatible(cd(str(teacher_dir), "network.channels=[8, 32]", "objective.init_from=null"), tcfg)
    with pytest.raises(ConfigError, match="objective.vp.shift"):
        teachers.check_compatible(cd(str(teacher_dir), "objective.vp.shift=0.5"), tcfg)
    ict = tiny()
    Generator(build_model(ict), ict).save(tmp_path / "ict")
    wrong_family = r"is a ict model \(consistency, VE family\): objective.name=multistep_cd distills a VP diffusion"
    with pytest.raises(ConfigError, match=wrong_family):
        teachers.check_compatible(cd(str(tmp_path / "ict")), teachers.teacher_config(str(tmp_path / "ict"), ""))
    with pytest.raises(ConfigError, match="objective.teacher='/nonexistent'"):
        teachers.model_dir("/nonexistent", "unused", tmp_path)
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        teachers.pin("models:/only-a-name", "unused")
    with pytest.raises(ConfigError, match="objective.teacher is set, but objective.name=multistep_ct"):
        tiny("objective.name=multistep_ct", "objective.teacher=models:/x@y")


def test_sampler_choice_per_objective(teacher_dir):
    diffusion = Generator.from_dir(teacher_dir)
    labels = np.array([1, 2])
    ddim = diffusion.generate(2, num_steps=4, labels=labels, sampler="ddim")
    addim = diffusion.generate(2, num_steps=4, labels=labels, sampler="addim")
    np.testing.assert_array_equal(diffusion.generate(2, num_steps=4, labels=labels), ddim)  # default: ddim
    assert not np.array_equal(ddim, addim)  # aDDIM widens the eps_hat step
    with pytest.raises(ValueError, match=r"sampler='ict' is not available for this diffusion model: .*ddim, addim"):
        diffusion.generate(1, num_steps=2, labels=labels[:1], sampler="ict")
    ict = Generator(build_model(tiny()), tiny())
    assert ict.check_sampler(None) == "ict"
    with pytest.raises(ValueError, match="sampler='addim' is not available for this ict model: choose one of ict"):
        ict.generate(1, labels=labels[:1], sampler="addim")
    mct = tiny("objective.name=multistep_ct", "objective.sampler=addim")
    assert Generator(build_model(mct), mct).check_sampler(None) == "addim"
