"""The run configuration: one typed tree assembled from each component's own config.

Load order: preset YAML -> optional user YAML (deep-merged) -> `--set dotted.key=value` overrides. A YAML file
may start from another with `base: OTHER.yaml` (relative to itself); its own keys are deep-merged over the base.
Validation errors name the dotted field that is wrong.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep import objectives
from fewstep.cli import UserError
from fewstep.data.config import DataConfig
from fewstep.evaluation import EvalConfig
from fewstep.faults import DebugConfig
from fewstep.networks import NetworkConfig
from fewstep.optim import EMAConfig, OptimConfig
from fewstep.text import TextConfig
from fewstep.tracking import TrackingConfig

__all__ = ["ConfigError", "EMAConfig", "EngineConfig", "EvalConfig", "OptimConfig", "TrackingConfig", "TrainConfig",
           "build_config", "load_config", "read_config_file", "set_dotted"]


class FP16Config(BaseModel):
    """DeepSpeed fp16 loss scaling (used when engine.precision=fp16): the loss is multiplied by a scale before
    backward so small gradients survive fp16; overflowing steps are skipped and the scale lowered."""

    model_config = ConfigDict(extra="forbid")
    loss_scale: float = Field(0.0, ge=0, description="Static loss scale; 0 = dynamic loss scaling.")
    initial_scale_power: int = Field(16, ge=0, le=32, description="Dynamic scaling starts at 2^this.")
    loss_scale_window: int = Field(1000, ge=1, description="Overflow-free steps before the scale is raised.")
    hysteresis: int = Field(2, ge=1, description="Overflows tolerated before the scale is lowered.")
    min_loss_scale: float = Field(1.0, gt=0, description="The dynamic scale never drops below this.")


class EngineConfig(BaseModel):
    """How the single-device model is trained: Ray Train workers running DeepSpeed, or one local process."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["deepspeed", "local"] = Field(
        "deepspeed",
        description="deepspeed: Ray Train workers, each a DeepSpeed engine (ZeRO, precision, offload). local: this "
        "process alone, a plain torch optimizer, the same training step (benchmarks, quick experiments).",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; CPU uses gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves in Ray.")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 runs on CPU and GPU; fp16 (with loss scaling, engine.fp16) needs GPUs."
    )
    fp16: FP16Config = Field(default_factory=FP16Config)
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer states and the optimizer step live on CPU (zero_stage >= 1)."
    )
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters live on CPU (zero_stage = 3).")
    zero3_persist_below: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters with fewer elements than this whole on every rank "
        "(DeepSpeed's stage3_param_persistence_threshold; its default). Small models: lower it, or nothing is sharded."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute UNet block activations in backward: less memory, ~30% more compute."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Non-finite losses are skipped; this many in a row stop the run (divergence)."
    )
    micro_batch: int | None = Field(
        None, ge=1, description="Per-worker micro-batch; None = global batch / workers (no accumulation)."
    )
    checkpoint_every: int = Field(1000, ge=1, description="Save and report a checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint.")
    storage_path: str = Field("~/fewstep_runs", description="Ray Train storage (local path or URI).")
    log_every: int = Field(10, ge=1, description="Rank 0 logs metrics every N steps.")
    ray_address: str | None = Field(
        None, min_length=1,
        description="The Ray cluster to train on (`--address`): `local` = a private cluster on this machine (token "
        "auth, every Ray process on 127.0.0.1 only); `auto` = the cluster `ray start` runs on this machine; "
        "`HOST:PORT` or `ray://HOST:PORT` = that cluster. None = $RAY_ADDRESS when set (as under `ray job "
        "submit`), else `local`. A joined cluster must run this fewstep version on every node.",
    )
    debug: DebugConfig = Field(default_factory=DebugConfig, description="TEST-ONLY fault injection.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend == "local":
            unsupported = {"num_workers": self.num_workers != 1, "use_gpu": self.use_gpu,
                           "precision": self.precision != "fp32", "offload_optimizer": self.offload_optimizer,
                           "offload_params": self.offload_params, "max_failures": self.max_failures != 0}
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                fields = ", ".join(f"engine.{k}" for k in bad)
                raise ValueError(f"engine.backend=local runs one fp32 process on the CPU: {fields} need "
                                 "engine.backend=deepspeed")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1 (ZeRO-Offload)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage = 3 (parameters are partitioned)")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "engine.precision=fp16 needs engine.use_gpu=true: DeepSpeed's CPU accelerator has no fp16 "
                "support; use engine.precision=bf16 on CPU"
            )
        return self

    def grad_accum(self, global_batch: int) -> int:
        micro = self.micro_batch or global_batch // self.num_workers
        if micro * self.num_workers == 0 or global_batch % (micro * self.num_workers):
            raise ValueError(
                f"optim.batch_size={global_batch} is not divisible by engine.micro_batch={micro} x "
                f"engine.num_workers={self.num_workers}"
            )
        return global_batch // (micro * self.num_workers)


class ServingConfig(BaseModel):
    """The registered model behind `mlflow models serve` (read from the model's config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    max_images: int = Field(
        256, ge=1, description="Most images one prediction request may ask for (rows of its input); a larger "
        "request is refused with HTTP 400 naming this limit.",
    )


class TrainConfig(BaseModel):
    """Everything a training run needs; saved with every run and logged to MLflow."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("fewstep", description="Run name (Ray Train run directory and MLflow run name).")
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    objective: objectives.ObjectiveConfig = Field(
        default_factory=lambda: objectives.objective_class("ict").config(),
        description="The training objective, selected by objective.name (fewstep.objectives registry).",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    text: TextConfig = Field(default_factory=TextConfig, description="Text-to-image conditioning (fewstep.text).")
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.network.in_channels != self.data.channels:
            raise ValueError(
                f"network.in_channels={self.network.in_channels} != data.channels={self.data.channels}"
            )
        if self.network.image_size != self.data.image_size:
            raise ValueError(
                f"network.image_size={self.network.image_size} != data.image_size={self.data.image_size}"
            )
        if self.network.num_classes not in (0, self.data.num_classes):
            raise ValueError(
                f"network.num_classes={self.network.num_classes} must be 0 (unconditional) or "
                f"data.num_classes={self.data.num_classes}"
            )
        self.engine.grad_accum(self.optim.batch_size)
        if self.text.enabled and self.network.num_classes:
            raise ValueError("text.enabled needs network.num_classes=0: a text-to-image model is conditioned on text")
        self.objective.check_with(self)
        if self.eval.fid_every and not self.data.test_shards:
            raise ValueError(f"eval.fid_every={self.eval.fid_every} needs data.test_shards (the FID reference)")
        return self

    @property
    def data_dim(self) -> int:
        return self.data.channels * self.data.image_size**2


def _objective_union() -> Any:
    """The registered objective configs as one union discriminated by `name`."""
    classes = tuple(objectives.config_classes())
    return Annotated[Union[classes], Field(discriminator="name")] if len(classes) > 1 else classes[0]  # noqa: UP007


def _rebuild_objective_field() -> None:
    TrainConfig.model_fields["objective"].annotation = _objective_union()
    TrainConfig.model_rebuild(force=True)


_rebuild_objective_field()
objectives.on_register(_rebuild_objective_field)  # an objective registered later (a plugin, a test) is known too


class ConfigError(UserError, ValueError):
    """A configuration that cannot be loaded; the message names the file or field."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c", creating sections on the way."""
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` in place; the value is parsed as YAML (numbers, lists, booleans, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({e.problem or e})") from None
    set_dotted(tree, key, value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tree with `base: OTHER.yaml` inheritance: the base (a path relative to this file, itself
    possibly with a base) is read first and this file deep-merged over it."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base:` inheritance loops: {' -> '.join(str(p) for p in (*_seen, path))}")
    tree = read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} not found (looked for {base_path})")
    return deep_merge(read_config_file(base_path, (*_seen, path)), tree)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config classes an annotation can hold (X, X | None, a union of objective configs)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _section(loc: tuple) -> tuple[str, type[BaseModel] | None, tuple]:
    """The dotted name and config class of the section an error location points into, and the location without
    the objective union's tag (pydantic reports objective.ict.huber_c for objective.huber_c)."""
    cls: type[BaseModel] | None = TrainConfig
    path: list = []
    parts = list(loc[:-1])
    while parts and cls is not None:
        part = parts.pop(0)
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        path.append(part)
        classes = _models_in(field.annotation) if field else []
        if len(classes) > 1 and parts:  # a discriminated union: the next part is the tag (objective.name)
            tag = parts.pop(0)
            classes = [c for c in classes if tag in get_args(c.model_fields["name"].annotation)]
        cls = classes[0] if len(classes) == 1 else None
    return ".".join(map(str, path)), cls, (*path, *parts, loc[-1]) if loc else ()


def _describe(err: dict) -> str:
    """One validation error as `dotted.key: what is wrong (got X)`, with the valid fields of a section for an
    unknown key."""
    section, cls, loc = _section(tuple(err["loc"]))
    key = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden" and cls is not None:
        valid = list(cls.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {'.'.join(filter(None, [section, close[0]]))}? " if close else ""
        return f"{key}: unknown field; {hint}valid fields of {section or 'the config'}: {', '.join(valid)}"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"{key}.name: unknown objective {ctx.get('tag')!r}; choose one of {ctx.get('expected_tags')}"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the fields
        return msg
    got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
    return f"{key}: {msg}{got}"


def build_config(tree: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        if len(lines) == 1:
            raise ConfigError(f"invalid {source}: {lines[0]}") from None
        raise ConfigError(f"invalid {source}:\n" + "\n".join(f"  {line}" for line in lines)) from None


def load_config(
    preset_file: str | Path | None = None, config_file: str | Path | None = None, overrides: list[str] = ()
) -> TrainConfig:
    tree: dict[str, Any] = read_config_file(preset_file) if preset_file else {}
    if config_file:
        tree = deep_merge(tree, read_config_file(config_file))
    for o in overrides:
        apply_override(tree, o)
    srcs = [str(s) for s in (preset_file, config_file) if s] + [f"--set {o}" for o in overrides]
    return build_config(tree, source=" + ".join(srcs) or "config")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
