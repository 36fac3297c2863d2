"""Sampling from a trained model: the same code serves in-training evaluation, the CLI and the registry."""

from __future__ import annotations

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


class Generator:
    """A denoiser plus the config that says how to sample it."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model = model.eval()
        self.cfg = cfg
        self.objective = build_objective(cfg)

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
        return cls(model.to(device), cfg)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        (path / CONFIG).write_text(to_yaml(self.cfg))
        return path

    @property
    def conditional(self) -> bool:
        return self.cfg.network.num_classes > 0

    def check_labels(self, labels: np.ndarray) -> None:
        k = self.cfg.network.num_classes
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise ValueError(f"class_label {int(bad[0])} is out of range: this model knows classes 0..{k - 1}")

    def check_sampler(self, sampler: str | None) -> str:
        """The sampler to use: the objective's default for None, else one this objective can run."""
        allowed = self.objective.samplers
        if sampler is None or sampler == "":
            return self.objective.default_sampler
        if sampler not in allowed:
            raise ValueError(
                f"sampler={sampler!r} is not available for this {self.cfg.objective.name} model: choose one of "
                f"{', '.join(allowed)}"
            )
        return sampler

    @torch.no_grad()
    def generate(
        self,
        n: int,
        num_steps: int = 1,
        seed: int = 0,
        labels: np.ndarray | None = None,
        batch: int = 256,
        sampler: str | None = None,
    ) -> np.ndarray:
        """n images as (n, H, W, C) uint8. Class-conditional models need `labels` (n,) ints. `sampler`: one of
        the objective's `samplers` (ddim | addim for VP models, ict for iCT); None = the objective's default."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        sampler = self.check_sampler(sampler)
        if self.conditional:
            if labels is None:
                raise ValueError("this model is class-conditional: give class_label for every image")
            labels = np.array(labels, dtype=np.int64).reshape(-1)  # a writable copy for torch
            if labels.shape[0] != n:
                raise ValueError(f"got {labels.shape[0]} class labels for {n} images")
            self.check_labels(labels)
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(int(seed))
        c, s = self.cfg.data.channels, self.cfg.data.image_size
        out = []
        for start in range(0, n, batch):
            m = min(batch, n - start)
            noise = torch.randn((m, c, s, s), generator=gen, device=device)
            y = torch.as_tensor(labels[start : start + m], device=device) if self.conditional else None
            x = self.objective.sample(self.model, noise, num_steps, y, generator=gen, sampler=sampler)
            out.append(to_uint8(x))
        return np.concatenate(out)

    def grid_labels(self, n: int) -> np.ndarray | None:
        """Labels for an evaluation grid: row-major, cycling through the classes."""
        return np.arange(n) % self.cfg.network.num_classes if self.conditional else None
