"""Search spaces as YAML (tune/spaces/*.yaml): dotted fields of fewstep's TrainConfig -> a distribution.

    sweep: {search: optuna, num_samples: 8}          # SweepConfig below (optional)
    all:                                             # params for every objective (optional)
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    ict:                                             # params only when the preset's objective.name is ict
      objective.huber_c: {loguniform: [0.1, 10], times: ict_huber_c}
      objective.distance: {choice: [pseudo_huber, l2]}

A spec is exactly one of `choice: [..]`, `uniform: [lo, hi]`, `loguniform: [lo, hi]`, `randint: [lo, hi]`
(hi exclusive); `times: ict_huber_c` multiplies the draw by 0.00054 sqrt(D) [iCT sec. 3.3] of the preset's data.
Every key is checked against the preset's resolved config (an error names the space file and the key), and
every choice and both bounds are validated as a real config, so a bad range fails before any trial starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep import objectives
from fewstep.config import ConfigError, TrainConfig, build_config, read_yaml
from fewstep.distances import default_huber_c
from fewstep.sweeps import apply

SPACE_DIR = Path(__file__).parent / "spaces"
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SCALES = {"ict_huber_c": lambda cfg: default_huber_c(cfg.data_dim)}


class SweepConfig(BaseModel):
    """How a sweep searches and schedules; a space file's `sweep:` section, then `--set sweep.KEY=VALUE`."""

    model_config = ConfigDict(extra="forbid")
    search: Literal["random", "optuna"] = Field("random", description="Tune's random search or Optuna's TPE.")
    num_samples: int = Field(4, ge=1, description="Trials (--samples).")
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA stops trials whose metric lags.")
    metric: str = Field("fid_best", description="Reported at every checkpoint: fid_best (min over step counts), "
                        "fid_steps_<k>, or loss (not comparable across distances/c).")
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1, description="ASHA: reports (checkpoints) before a trial can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the top 1/rf at each rung.")
    max_concurrent: int = Field(0, ge=0, description="Trials at once; 0 = what the cluster's CPUs allow.")
    budgets: dict[str, int] = Field(
        default_factory=lambda: {"fast": 1, "balanced": 4, "quality": 8},
        description="Registry alias -> max sampling steps: the alias points at the best model within it.",
    )
    storage_path: str = Field("~/fewstep_sweeps", description="Tune experiment storage (restore looks here).")
    rank: Literal["final", "posthoc"] = Field(
        "final", description="final: rank trials on the FID of their exported EMA. posthoc (needs ema.mode=posthoc): "
        "on the best post-hoc EMA per step count, reconstructed after each trial at the lengths posthoc_sigma_rels.")
    posthoc_sigma_rels: list[float] = Field(
        default_factory=lambda: [0.02, 0.05, 0.1, 0.2], min_length=1,
        description="sweep.rank=posthoc: the EMA lengths each finished trial is evaluated at.")


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: list[Any] | None = None
    grid: list[Any] | None = Field(None, description="Every value once (Tune's grid_search; num_samples repeats it).")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    times: Literal["ict_huber_c"] | None = None

    @model_validator(mode="after")
    def _one(self) -> ParamSpec:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that must each make a valid config: every choice, both bounds."""
        value = getattr(self, self.kind)
        if self.kind in ("choice", "grid"):
            return list(value)
        return [value[0], value[1] - 1 if self.kind == "randint" else value[1]]  # randint: hi is exclusive


class Space(BaseModel):
    """A loaded space: its sweep settings and the params that apply to one preset's objective."""

    path: str
    sweep: SweepConfig
    params: dict[str, ParamSpec]
    scale: dict[str, float]  # key -> factor applied to the draw (`times`)

    def tune_space(self) -> dict[str, Any]:
        from ray import tune

        make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": tune.uniform,
                "loguniform": tune.loguniform, "randint": tune.randint}
        return {k: make[s.kind](*([getattr(s, s.kind)] if s.kind in ("choice", "grid") else getattr(s, s.kind)))
                for k, s in self.params.items()}


def space_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return SPACE_DIR / f"{name_or_path}.yaml"


def check_field(cfg: TrainConfig, key: str, where: str) -> None:
    """`key` must name a leaf field of the resolved config (the preset's objective type for objective.*)."""
    node: Any = cfg
    parts = key.split(".")
    for i, p in enumerate(parts):
        fields = type(node).model_fields if isinstance(node, BaseModel) else None
        if fields is None or p not in fields:
            section = ".".join(parts[:i]) or "<root>"
            known = ", ".join(sorted(fields)) if fields else "none (not a section)"
            raise ConfigError(
                f"{where}: {key!r} is not a field of the config ({section} of objective {cfg.objective.name} has: "
                f"{known})"
            )
        node = getattr(node, p)
    if isinstance(node, BaseModel):
        raise ConfigError(f"{where}: {key!r} is a section, not a field; name one of its fields")


def load_space(path: str | Path, base: TrainConfig, overrides: list[str] = ()) -> Space:
    """Read a space file and validate it against `base` (the preset's resolved config)."""
    path = space_path(str(path))
    raw = read_yaml(path)
    where = str(path)
    unknown = set(raw) - {"sweep", "all", *objectives.names()}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}; expected sweep, all, or objective "
                          f"names ({', '.join(objectives.names())})")
    sweep_tree = dict(raw.get("sweep") or {})
    import yaml

    for o in overrides:
        key, _, value = o.partition("=")
        sweep_tree[key.removeprefix("sweep.")] = yaml.safe_load(value)
    try:
        sweep = SweepConfig.model_validate(sweep_tree)
    except ValidationError as e:
        raise ConfigError(f"{where}: sweep.{e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    if sweep.rank == "posthoc" and base.ema.mode != "posthoc":
        raise ConfigError(f"{where}: sweep.rank=posthoc needs trials that track post-hoc EMAs: --set ema.mode=posthoc")
    merged = {**(raw.get("all") or {}), **(raw.get(base.objective.name) or {})}
    if not merged:
        raise ConfigError(f"{where}: no params for objective {base.objective.name} (sections: {sorted(raw)})")
    params, scale = {}, {}
    base_tree = base.model_dump(mode="json")
    for key, spec in merged.items():
        check_field(base, key, where)
        try:
            params[key] = ParamSpec.model_validate(spec)
        except ValidationError as e:
            raise ConfigError(f"{where}: {key}: {e.errors()[0]['msg']}") from None
        if sweep.search == "optuna" and params[key].grid is not None:
            raise ConfigError(f"{where}: {key}: grid needs sweep.search=random (Optuna samples, it does not grid)")
        if sweep.search == "optuna" and params[key].choice and any(
            isinstance(v, (list, dict)) for v in params[key].choice
        ):
            raise ConfigError(f"{where}: {key}: Optuna takes only scalar choices; use sweep.search=random")
        if params[key].times:
            scale[key] = SCALES[params[key].times](base)
        for value in params[key].candidates():  # each choice / bound must build a valid config on its own
            try:
                build_config(apply(base_tree, {key: value}, scale), source=f"{where}: {key}={value!r}")
            except ConfigError as e:
                raise ConfigError(str(e)) from None
    return Space(path=where, sweep=sweep, params=params, scale=scale)
