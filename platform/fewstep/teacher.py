"""The frozen diffusion teacher of multistep consistency distillation [MCM Alg. 1, CD].

`objective.teacher` names it: a registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) resolved with the
run's tracking URI, or a local model directory. Either way the weights are read from `weights.safetensors` +
`config.yaml` (the export fewstep.generator writes and the registry's `artifacts/model` holds), never unpickled.

The driver pins an alias to its version once (`pin`) and checks the teacher against the student config
(`check_compatible`) before any worker starts; every worker then loads the pinned teacher itself (`load`): it is
small, so it is replicated in eval mode without DeepSpeed, and an alias moved mid-run cannot change it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

from fewstep import modelref
from fewstep.config import ConfigError, TrainConfig, build_config
from fewstep.generator import CONFIG, WEIGHTS, Generator


def pin(ref: str, tracking_uri: str, field: str = "objective.teacher") -> str:
    """The version an alias points at now (`models:/NAME/VERSION`), or a directory's absolute path."""
    try:
        return modelref.pin(ref, tracking_uri)
    except modelref.ModelRefError as e:
        raise ConfigError(f"{field}={e}") from None


def model_dir(ref: str, tracking_uri: str, dst: str | Path, only_config: bool = False,
              field: str = "objective.teacher") -> Path:
    """A directory holding the model's weights.safetensors + config.yaml (downloaded for a registry URI)."""
    if modelref.is_registry_uri(ref):
        import mlflow.artifacts

        r = modelref.parse(pin(ref, tracking_uri, field))
        source = modelref.client(tracking_uri).get_model_version_download_uri(r.name, r.version)  # models:/m-<id>
        path = f"{source.rstrip('/')}/artifacts/model" + (f"/{CONFIG}" if only_config else "")
        got = Path(mlflow.artifacts.download_artifacts(path, dst_path=str(dst), tracking_uri=tracking_uri))
        return got.parent if only_config else got
    path = Path(ref).expanduser()
    # accept the export itself, a Ray Train checkpoint (model/), or a downloaded MLflow model (artifacts/model/)
    for candidate in (path, path / "model", path / "artifacts" / "model"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    raise ConfigError(
        f"{field}={ref!r}: not a registry URI and no {WEIGHTS} + {CONFIG} in it, its model/ or artifacts/model/"
    )


def teacher_config(ref: str, tracking_uri: str, field: str = "objective.teacher") -> TrainConfig:
    with tempfile.TemporaryDirectory() as d:
        path = model_dir(ref, tracking_uri, d, only_config=True, field=field) / CONFIG
        return build_config(yaml.safe_load(path.read_text()), source=f"{field} {ref} {CONFIG}")


def check_compatible(cfg: TrainConfig, teacher: TrainConfig) -> None:
    """The teacher must be a diffusion model of the student's family, data and schedule (its network may differ:
    `objective.init_from` checks the network when the student starts from it). Raises ConfigError naming the
    field."""
    from fewstep.objectives import capabilities

    o, ref = cfg.objective, cfg.objective.teacher_ref
    mine, theirs = capabilities(cfg), capabilities(teacher)
    if theirs.role != "diffusion" or theirs.family != mine.family:
        raise ConfigError(
            f"objective.teacher={ref!r} is a {teacher.objective.name} model ({theirs.role}, {theirs.family.upper()} "
            f"family): objective.name={o.name} distills a {mine.family.upper()} diffusion model"
        )
    for f in ("image_size", "channels"):
        if getattr(teacher.data, f) != getattr(cfg.data, f):
            raise ConfigError(
                f"data.{f}={getattr(cfg.data, f)} but objective.teacher={ref!r} has {getattr(teacher.data, f)}"
            )
    if teacher.network.num_classes not in (0, cfg.network.num_classes):
        raise ConfigError(
            f"objective.teacher={ref!r} is conditional on {teacher.network.num_classes} classes but "
            f"network.num_classes={cfg.network.num_classes}"
        )
    # A text teacher reads the same encoder's states: the student's encoder settings must be its own.
    theirs, mine = teacher.text.model_dump(), cfg.text.model_dump()
    diff = [k for k in ("enabled", "encoder", "dim", "max_length") if theirs[k] != mine[k]]
    if diff:
        raise ConfigError(
            f"objective.teacher={ref!r} has other text conditioning: "
            + ", ".join(f"text.{k}={mine[k]} (teacher: {theirs[k]})" for k in diff)
        )
    if getattr(o, "guidance", 1.0) != 1.0 and teacher.text.caption_dropout == 0:
        raise ConfigError(
            f"objective.guidance={o.guidance} needs a teacher trained with caption dropout (its "
            "text.caption_dropout is 0: it never learned the unconditional prediction)"
        )
    # The teacher reads t through its own schedule: a different one would predict x at another noise level.
    if teacher.objective.vp != o.vp:
        diff = [k for k, v in o.vp.model_dump().items() if getattr(teacher.objective.vp, k) != v]
        raise ConfigError(
            f"objective.vp differs from the teacher's ({', '.join(f'objective.vp.{k}' for k in diff)}): "
            f"teacher {teacher.objective.vp.model_dump()} vs {o.vp.model_dump()}"
        )


class FrozenTeacher(nn.Module):
    """x_teacher = teacher(z_t, t, labels): eval mode (no dropout), no gradients; an unconditional teacher
    ignores the labels."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.model = generator.model.eval().requires_grad_(False)
        self.conditional = generator.conditional
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # stays in eval mode whatever its owner does

    @torch.no_grad()
    def forward(self, z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.model(z_t, t, labels if self.conditional else None)


def load(ref: str, tracking_uri: str, device: torch.device | str = "cpu") -> FrozenTeacher:
    """The frozen teacher, on `device`; weights from safetensors only."""
    with tempfile.TemporaryDirectory() as d:
        return FrozenTeacher(Generator.from_dir(model_dir(ref, tracking_uri, d), device=str(device)))
