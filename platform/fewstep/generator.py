"""Sampling from a trained model: the same code serves in-training evaluation, the CLI and the registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from fewstep.config import TrainConfig, build_config, to_yaml
from fewstep.images import to_uint8
from fewstep.objectives import build_model, build_objective

WEIGHTS = "weights.safetensors"  # the EMA weights: what sampling and the registry serve
STUDENT_WEIGHTS = "student.safetensors"  # the trained (non-EMA) weights, consolidated to fp32 from ZeRO
CONFIG = "config.yaml"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block (no dropout); every submodule's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class Generator:
    """A denoiser plus the config that says how to sample it. Sampling runs the model in eval mode and leaves the
    model's own train/eval mode as it found it (the training loop samples its EMA model mid-run)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, text_encoder: nn.Module | None = None):
        self.model = model
        self.cfg = cfg
        self.objective = build_objective(cfg)
        self.capabilities = self.objective.capabilities
        self._text_encoder = text_encoder  # text-to-image: the frozen encoder, built on first use if not given

    @property
    def text(self) -> bool:
        return self.cfg.text.enabled

    def text_encoder(self) -> nn.Module:
        if self._text_encoder is None:
            from fewstep.text import TextEncoder

            self._text_encoder = TextEncoder(self.cfg.text, next(self.model.parameters()).device)
        return self._text_encoder

    def prompts(self, labels) -> list[str]:
        """Text-to-image: prompts as given, or integer labels i -> text.eval_prompts[i]."""
        items = list(np.asarray(labels).reshape(-1).tolist()) if not isinstance(labels, list | tuple) else labels
        if items and not isinstance(items[0], str):
            known = self.cfg.text.eval_prompts
            if not known:
                raise ValueError("this text-to-image model needs prompts (text.eval_prompts is empty)")
            items = [known[int(i) % len(known)] for i in items]
        return [str(p) for p in items]

    def check_guidance(self, guidance: float | None) -> float:
        """The sampling guidance w: text-to-image models whose objective samples with guidance (a distilled student
        has its teacher's baked in)."""
        guided = self.text and self.capabilities.guidance
        if guidance is None:
            return self.cfg.text.guidance if guided else 1.0
        if not guided:
            raise ValueError(
                f"guidance={guidance} applies to text-to-image models whose objective samples with guidance; this "
                f"is a {'text-to-image ' if self.text else ''}{self.cfg.objective.name} model, which takes none"
            )
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        return float(guidance)

    @classmethod
    def from_dir(cls, path: str | Path, device: str = "cpu", weights: str = WEIGHTS) -> Generator:
        """Load `weights.safetensors` (or `weights=STUDENT_WEIGHTS`) + `config.yaml`: no pickle, no DeepSpeed."""
        path = Path(path)
        for name in (weights, CONFIG):
            if not (path / name).is_file():
                raise FileNotFoundError(f"model directory {path} has no {name}")
        cfg = build_config(yaml.safe_load((path / CONFIG).read_text()), source=str(path / CONFIG))
        model = build_model(cfg)
        model.load_state_dict(load_file(str(path / weights), device=device))
        return cls(model.to(device).eval(), cfg)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        (path / CONFIG).write_text(to_yaml(self.cfg))
        return path

    @property
    def conditional(self) -> bool:
        """Class-conditional or text-to-image: needs a label or a prompt per image."""
        return self.cfg.network.num_classes > 0 or self.cfg.text.enabled

    def check_labels(self, labels: np.ndarray) -> None:
        k = self.cfg.network.num_classes
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise ValueError(f"class_label {int(bad[0])} is out of range: this model knows classes 0..{k - 1}")

    def check_sampler(self, sampler: str | None) -> str:
        """The sampler to use: the objective's default for None, else one this objective can run."""
        return self.capabilities.check_sampler(sampler, self.cfg.objective.name)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        num_steps: int = 1,
        seed: int = 0,
        labels: np.ndarray | None = None,
        batch: int = 256,
        sampler: str | None = None,
        guidance: float | None = None,
    ) -> np.ndarray:
        """n images as (n, H, W, C) uint8. Class-conditional models need `labels` (n,) ints, text-to-image models
        n prompts (or ints: text.eval_prompts[i]). `sampler`: one of the objective's `samplers` (ddim | addim
        for VP models, ict for iCT); None = the objective's default. `guidance`: text-to-image diffusion only."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        sampler = self.check_sampler(sampler)
        w = self.check_guidance(guidance)
        if self.text:
            if labels is None:
                raise ValueError("this model is text-to-image: give a prompt for every image")
            labels = self.prompts(labels)
            if len(labels) != n:
                raise ValueError(f"got {len(labels)} prompts for {n} images")
        elif self.conditional:
            if labels is None:
                raise ValueError("this model is class-conditional: give class_label for every image")
            labels = np.array(labels, dtype=np.int64).reshape(-1)  # a writable copy for torch
            if labels.shape[0] != n:
                raise ValueError(f"got {labels.shape[0]} class labels for {n} images")
            self.check_labels(labels)
        gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(int(seed))
        model = self.model
        if self.text and w != 1.0:
            from fewstep.text import Guided

            model = Guided(self.model, self.text_encoder(), w)
        out = []
        with eval_mode(self.model):
            for start in range(0, n, batch):
                out.append(self._batch(model, labels, start, min(batch, n - start), num_steps, gen, sampler))
        return np.concatenate(out)

    def _batch(self, model, labels, start: int, m: int, num_steps: int, gen: torch.Generator, sampler: str):
        device = next(self.model.parameters()).device
        c, s = self.cfg.data.channels, self.cfg.data.image_size
        noise = torch.randn((m, c, s, s), generator=gen, device=device)
        if self.text:
            y = self.text_encoder()(labels[start : start + m])
        else:
            y = torch.as_tensor(labels[start : start + m], device=device) if self.conditional else None
        return to_uint8(self.objective.sample(model, noise, num_steps, y, sampler=sampler, generator=gen))

    def grid_labels(self, n: int) -> np.ndarray | None:
        """Labels for an evaluation grid: row-major, cycling through the classes (text: text.eval_prompts)."""
        if self.text:
            return self.prompts(np.arange(n)) if self.cfg.text.eval_prompts else [""] * n
        return np.arange(n) % self.cfg.network.num_classes if self.conditional else None
