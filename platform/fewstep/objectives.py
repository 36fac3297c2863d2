"""The objective interface: one protocol every training objective implements, and the registry that maps
`objective.name` to it.

An objective is one module (ict.py, multistep.py, diffusion.py, ...) holding a config class (a pydantic model with
a literal `name`) and an `Objective` subclass decorated with `@register("name")`. It owns everything that depends
on which objective runs: its preconditioner around the network, its loss (EDM's `loss_fn(net, images, labels)`
signature), its sampler and what the trained model can do (`Capabilities`). Nothing outside an objective's own
module asks for its name: the engine, the generator, serving, tracking and sweeps read the capabilities.
The config union `TrainConfig.objective` is rebuilt from the registry whenever an objective registers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

Family = Literal["ve", "vp"]  # variance-exploding (EDM sigma) or variance-preserving (t in [0, 1]) parameterization
Role = Literal["consistency", "diffusion"]  # a diffusion model samples at any step count and can be a teacher


class ObjectiveConfig(BaseModel):
    """Base of every objective's config: a literal `name` selects the objective."""

    model_config = ConfigDict(extra="forbid")
    name: str
    init_from: str | None = Field(
        None,
        description="Start the student from a trained model's (EMA) weights, as every paper run does: a registry "
        "URI `models:/NAME@ALIAS` or `models:/NAME/VERSION` (resolved with tracking.uri and pinned to its version), "
        "a model directory, or `teacher` (the distillation teacher). Checked before any worker starts: same image "
        "shape, conditioning, network and parameterization family. null = random initialisation.",
    )

    @property
    def teacher_ref(self) -> str | None:
        """The frozen teacher this objective distills (a registry URI or a model directory); None = no teacher."""
        return None

    def check_with(self, cfg: TrainConfig) -> None:
        """Cross-section checks against the whole run config (raise ValueError naming the fields)."""


@dataclass(frozen=True)
class StepCounts:
    """The sampling step counts a trained model honours: lo..hi inclusive; hi None = any count >= lo."""

    lo: int = 1
    hi: int | None = None

    def __contains__(self, k: int) -> bool:
        return self.lo <= k and (self.hi is None or k <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return "any" if self.lo == 1 else f"{self.lo}+"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"

    def check(self, k: int, why: str = "") -> None:
        """Raise ValueError naming k and what is available (and `why`, the objective's reason)."""
        if k not in self:
            raise ValueError(f"num_steps={k} is not available for this model: it samples in {self} steps"
                             + (f" ({why})" if why else ""))

    def upto(self, max_steps: int, open_ended: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> list[int]:
        """Step counts to evaluate, at most max_steps: every count of a bounded range, powers of two otherwise;
        never empty (the fewest available when none fits)."""
        if self.hi is None:
            picked = [k for k in open_ended if k in self and k <= max_steps]
        else:
            picked = [k for k in range(self.lo, self.hi + 1) if k <= max_steps]
        return picked or [self.lo]

    def default(self, preferred: list[int]) -> int:
        """The served default: a single count itself, else the largest preferred count available."""
        if self.lo == self.hi:
            return self.lo
        return max((k for k in preferred if k in self), default=self.lo)


@dataclass(frozen=True)
class Capabilities:
    """What a trained model of this objective can do, as types rather than names."""

    steps: StepCounts
    samplers: tuple[str, ...]
    default_sampler: str
    family: Family
    role: Role = "consistency"
    teacher: Literal["none", "required"] = "none"  # a frozen teacher model inside the loss
    guidance: bool = False  # sampling-time classifier-free guidance (text-to-image)
    steps_reason: str = ""  # why the step counts are what they are (shown in errors)

    def check_sampler(self, sampler: str | None, what: str) -> str:
        """The sampler to run: the default for None/'', else one of `samplers` (ValueError naming the choices)."""
        if not sampler:
            return self.default_sampler
        if sampler not in self.samplers:
            raise ValueError(f"sampler={sampler!r} is not available for this {what} model: choose one of "
                             f"{', '.join(self.samplers)}")
        return sampler


class Objective(ABC):
    """One training objective: loss of a micro-batch, sampler, preconditioner, capabilities.

    `model` below is the preconditioned denoiser (or a DeepSpeed engine around it): called as
    model(x_noisy, noise_level, cond) with a (B,) noise level in the objective's family (sigma or t)."""

    name: ClassVar[str]  # set by @register
    config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, cfg: ObjectiveConfig, data_dim: int, total_steps: int):
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def precondition(cls, net: nn.Module, cfg: ObjectiveConfig) -> nn.Module:
        """The denoiser f around the raw network F (its parameterization: EDM/VE or VP)."""

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def loss(
        self, model: Callable, x: torch.Tensor, cond: torch.Tensor | None, step: int, teacher: Callable | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, info metrics) of one micro-batch x (B, C, H, W) in [-1, 1] at global step `step`."""

    @abstractmethod
    def sample(
        self, model: Callable, noise: torch.Tensor, num_steps: int, cond: torch.Tensor | None,
        sampler: str | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from standard-normal noise in num_steps model calls."""

    def prepare_teacher(self, teacher: nn.Module, text_encoder: nn.Module | None) -> nn.Module:
        """The teacher as the loss calls it (e.g. wrapped in classifier-free guidance); default: as loaded."""
        return teacher


_REGISTRY: dict[str, type[Objective]] = {}
_LISTENERS: list[Callable[[], None]] = []


def register(*names: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: `@register("ict")` makes objective.name=ict select this class; its config class is the
    `config` class attribute. Registering again under a taken name replaces it (tests, notebooks)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if not (isinstance(getattr(cls, "config", None), type) and issubclass(cls.config, ObjectiveConfig)):
            raise TypeError(f"{cls.__name__}.config must be an ObjectiveConfig subclass")
        for n in names:
            _REGISTRY[n] = cls
        cls.name = names[0]
        for notify in _LISTENERS:
            notify()
        return cls

    return deco


def on_register(callback: Callable[[], None]) -> None:
    """Call `callback` after every registration (fewstep.config rebuilds TrainConfig's objective union)."""
    _LISTENERS.append(callback)


def names() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(names())
        raise ValueError(f"objective.name={name!r} is not a registered objective: one of {known}") from None


def config_classes() -> list[type[ObjectiveConfig]]:
    """Every registered config class, once each (a class may serve several names)."""
    return list(dict.fromkeys(c.config for c in _REGISTRY.values()))


def build_objective(cfg: TrainConfig) -> Objective:
    return objective_class(cfg.objective.name)(cfg.objective, data_dim=cfg.data_dim, total_steps=cfg.optim.total_steps)


def capabilities(cfg: TrainConfig) -> Capabilities:
    return build_objective(cfg).capabilities


def build_model(cfg: TrainConfig) -> nn.Module:
    """The single-device denoiser: network F inside its objective's preconditioner."""
    from fewstep.networks import TextUNet, UNet

    net = TextUNet(cfg.network, cfg.text.dim) if cfg.text.enabled else UNet(cfg.network)
    return objective_class(cfg.objective.name).precondition(net, cfg.objective)


def _load_builtin() -> None:
    # The built-in objectives register themselves on import; imported here so that `TrainConfig` knows them.
    from fewstep import diffusion, ect, edm_diffusion, ict, multistep  # noqa: F401


_load_builtin()
