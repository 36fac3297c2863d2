"""Where a run's weights come from: `objective.init_from`, the model a run starts from, and the lineage it leaves.

Every paper run starts from a pretrained diffusion model [MCM sec. 5 / App. A.1; ECT sec. 3-4]. `init_from` names it:
a registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a model directory, or `teacher` (the run's own
distillation teacher). The driver pins it to a version and checks it against the run's config before any worker
starts (`resolve`); every rank then loads the same pinned weights into the student (`load_into`). The run and the
model version it registers carry the parent as tags (`record`), so the registry shows which model came from which.
"""

from __future__ import annotations

import logging
import tempfile

from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch import nn

from fewstep import modelref
from fewstep import teacher as teachers
from fewstep.config import ConfigError, TrainConfig
from fewstep.generator import WEIGHTS

log = logging.getLogger("fewstep")
FIELD = "objective.init_from"
PARENT_TAG = "fewstep.parent"  # the pinned parent model: models:/NAME/VERSION or a directory
PARENT_RUN_TAG = "fewstep.parent_run_id"  # the MLflow run that trained it (registry parents)
TEACHER_TAG = "fewstep.teacher"
# Network fields that do not change the parameters: the student may train with its own dropout.
_NO_WEIGHTS = {"dropout"}


def check_compatible(cfg: TrainConfig, parent: TrainConfig, ref: str) -> None:
    """The parent's weights must fit the student: same image shape and conditioning, same network, the same
    parameterization family (VP weights into VP objectives, EDM/VE weights into iCT/ECT). ConfigError names the
    field otherwise."""
    from fewstep.objectives import capabilities

    mine, theirs = capabilities(cfg), capabilities(parent)
    if mine.family != theirs.family:
        raise ConfigError(
            f"{FIELD}={ref!r} is a {parent.objective.name} model ({theirs.family.upper()} family): objective.name="
            f"{cfg.objective.name} is {mine.family.upper()}; start it from a {mine.family.upper()} model"
        )
    for f in ("image_size", "channels", "num_classes"):
        if getattr(parent.data, f) != getattr(cfg.data, f):
            raise ConfigError(f"data.{f}={getattr(cfg.data, f)} but {FIELD}={ref!r} has {getattr(parent.data, f)}")
    student, theirs_net = cfg.network.model_dump(), parent.network.model_dump()
    diff = [k for k in student if k not in _NO_WEIGHTS and student[k] != theirs_net[k]]
    if diff:
        raise ConfigError(
            f"{FIELD}={ref!r} has another network: "
            + ", ".join(f"network.{k}={student[k]} (parent: {theirs_net[k]})" for k in diff)
            + f": match it, or set {FIELD}=null to train from scratch"
        )
    text_fields = ("enabled", "encoder", "dim", "max_length")
    diff = [k for k in text_fields if getattr(parent.text, k) != getattr(cfg.text, k)]
    if diff:
        raise ConfigError(f"{FIELD}={ref!r} has other text conditioning: "
                          + ", ".join(f"text.{k}={getattr(cfg.text, k)} (parent: {getattr(parent.text, k)})"
                                      for k in diff))
    # the preconditioner's data scale is part of what the weights learned
    for section in ("edm", "vp"):
        a, b = getattr(cfg.objective, section, None), getattr(parent.objective, section, None)
        key = "sigma_data" if section == "edm" else "shift"
        if a is not None and b is not None and getattr(a, key) != getattr(b, key):
            raise ConfigError(f"objective.{section}.{key}={getattr(a, key)} but {FIELD}={ref!r} was trained with "
                              f"{getattr(b, key)}")


def resolve(cfg: TrainConfig, uri: str, teacher_ref: str | None) -> str | None:
    """objective.init_from pinned (models:/NAME/VERSION or an absolute directory) and checked; None = from scratch.
    `teacher_ref`: the run's pinned teacher, for init_from: teacher."""
    ref = cfg.objective.init_from
    if not ref:
        return None
    if ref == "teacher":
        if not teacher_ref:
            raise ConfigError(f"{FIELD}=teacher, but objective.name={cfg.objective.name} has no objective.teacher")
        pinned = teacher_ref
    else:
        pinned = teachers.pin(ref, uri, field=FIELD)
    check_compatible(cfg, teachers.teacher_config(pinned, uri, field=FIELD), ref)
    log.info("init_from %s -> %s", ref, pinned)
    return pinned


def load_into(model: nn.Module, ref: str, tracking_uri: str) -> None:
    """The parent's (EMA) weights into the student, network for network (the preconditioners hold no parameters)."""
    with tempfile.TemporaryDirectory() as d:
        path = teachers.model_dir(ref, tracking_uri, d, field=FIELD)
        state = load_file(str(path / WEIGHTS))
    mine = model.state_dict()
    state = {k: v.to(mine[k].dtype) if k in mine else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{FIELD}={ref!r}: its weights do not fit the network (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")


def record(client: MlflowClient, run_id: str, tag: str, pinned: str) -> str:
    """Tag the run with its parent (or teacher); a resumed run keeps the one it started with even if the alias has
    moved since. A registry parent also links to the run that trained it."""
    first = client.get_run(run_id).data.tags.get(tag)
    if first and first != pinned:
        log.warning("resuming with the run's original %s %s (the alias now points at %s)", tag, first, pinned)
    pinned = first or pinned
    client.set_tag(run_id, tag, pinned)
    if tag == PARENT_TAG and modelref.is_registry_uri(pinned):
        r = modelref.parse(pinned)
        client.set_tag(run_id, PARENT_RUN_TAG, client.get_model_version(r.name, r.version).run_id)
    return pinned


def describe(client: MlflowClient, name: str, version: str) -> list[str]:
    """The chain models:/NAME/VERSION <- parent <- grandparent ..., from the versions' tags (cycles stop it)."""
    chain, seen = [f"models:/{name}/{version}"], set()
    while len(chain) < 16:
        mv = client.get_model_version(name, version)
        parent = mv.tags.get(PARENT_TAG)
        teacher = mv.tags.get(TEACHER_TAG)
        if teacher and teacher != parent:
            chain[-1] += f" (distilled from {teacher})"
        if not parent or parent in seen:
            break
        seen.add(parent)
        chain.append(parent)
        if not modelref.is_registry_uri(parent):
            break
        r = modelref.parse(parent)
        name, version = r.name, str(r.version)
    return chain


def summary(ref: str) -> str | None:
    """'lineage: models:/A/3 <- models:/B/1 ...' for a registered model reference; None for anything else."""
    found = modelref.version_of(ref)
    if found is None:
        return None
    chain = describe(modelref.client(), *found)
    return "lineage: " + " <- ".join(chain) + (" (trained from scratch)" if len(chain) == 1 else "")
