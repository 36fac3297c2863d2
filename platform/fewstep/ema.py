"""The evaluation EMA of a run (rank 0, on the training device, over the fp32 master weights): `ema.mode=classic`,
torch's AveragedModel of decay `ema.decay`, or `ema.mode=posthoc`, EDM2's power-function EMAs with snapshots.

Both expose `module` (the model that in-training evaluation samples and the checkpoint exports) and
`update_parameters(params)`, which fewstep.train_step calls after every optimizer step. The post-hoc EMA
also writes a snapshot of every tracked EMA every `ema.snapshot_every` steps and at the end; each checkpoint holds
all snapshots so far plus the trackers' state (`posthoc_ema/`, safetensors only), so they survive a resume and
pipelines.posthoc_ema reads them from the run's latest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fewstep.optim import ema_update
from fewstep.posthoc_ema import PowerFunctionEMA, Snapshot, load_snapshot, save_snapshot

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

POSTHOC_DIR = "posthoc_ema"  # inside a checkpoint directory
SNAPSHOTS = "snapshots"  # POSTHOC_DIR/SNAPSHOTS/step_<t>_ema<k>.safetensors
STATE = "state.safetensors"  # POSTHOC_DIR/STATE: the trackers at the checkpoint's step


class PosthocEMA:
    """Power-function EMAs of the lengths `ema.sigma_rels` [EDM2 sec. 3.1]. `module` is the first one: its
    parameters are that tracker's tensors (no copy). `staging`: where snapshots wait for the next checkpoint."""

    def __init__(self, cfg: TrainConfig, module: nn.Module, staging: Path | None = None):
        self.every = cfg.ema.snapshot_interval(cfg.optim.total_steps)
        self.total_steps = cfg.optim.total_steps
        self.module = module.requires_grad_(False)
        self.tracker = PowerFunctionEMA(module, cfg.ema.sigma_rels)
        served = self.tracker.emas[0]
        for name, p in module.named_parameters():  # the served EMA is the module's own storage
            p.data.copy_(served[name])
            served[name] = p.data
        self.staging = Path(tempfile.mkdtemp(prefix="posthoc_ema_", dir=staging))
        weakref.finalize(self, shutil.rmtree, str(self.staging), True)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters()]

    def update_parameters(self, params) -> None:
        """Fold in `params.parameters()` (in the module's order) after optimizer step `params.step`."""
        step = int(params.step)
        self.tracker.update_tensors(dict(zip(self.names, params.parameters(), strict=True)), step)
        if step % self.every == 0 or step == self.total_steps:
            for k, snap in enumerate(self.tracker.snapshot()):
                save_snapshot(self.staging / snapshot_name(step, k), _to_cpu(snap))

    def save(self, d: Path, step: int) -> None:
        """Into checkpoint directory d: the trackers' state and every snapshot up to `step` (hard links)."""
        out = d / POSTHOC_DIR / SNAPSHOTS
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.tracker.state_dict().items()},
                  str(d / POSTHOC_DIR / STATE))
        for f in sorted(self.staging.glob("*.safetensors")):
            if snapshot_step(f) <= step:
                _link_or_copy(f, out / f.name)

    def restore(self, d: Path) -> int:
        """The trackers and snapshots of checkpoint d; returns the trackers' step."""
        if not (d / POSTHOC_DIR / STATE).is_file():
            raise ValueError(f"checkpoint {d} has no {POSTHOC_DIR}/{STATE}: it was written with ema.mode=classic; "
                             "resume it with the ema.mode it was trained with")
        state = load_file(str(d / POSTHOC_DIR / STATE), device=str(self.module_device))
        self.tracker.load_state_dict(state)
        for f in sorted((d / POSTHOC_DIR / SNAPSHOTS).glob("*.safetensors")):
            _link_or_copy(f, self.staging / f.name)
        return self.tracker.step

    @property
    def module_device(self) -> torch.device:
        return next(self.module.parameters()).device


def build_ema(cfg: TrainConfig, device: torch.device, staging: Path | None = None) -> AveragedModel | PosthocEMA:
    """rank 0's evaluation EMA for `cfg.ema.mode`, on `device`."""
    from fewstep.objectives import build_model

    if cfg.ema.mode == "posthoc":
        return PosthocEMA(cfg, build_model(cfg).to(device), staging)
    return AveragedModel(build_model(cfg), multi_avg_fn=ema_update(cfg.ema.decay)).to(device)


def snapshot_name(step: int, k: int) -> str:
    return f"step_{step:09d}_ema{k}.safetensors"


def snapshot_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def checkpoint_snapshots(checkpoint_dir: Path) -> list[Snapshot]:
    """Every snapshot a checkpoint holds (ValueError naming the directory when it has none)."""
    files = sorted((Path(checkpoint_dir) / POSTHOC_DIR / SNAPSHOTS).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint_dir} holds no post-hoc EMA snapshots ({POSTHOC_DIR}/{SNAPSHOTS}/): was the "
                         "run trained with ema.mode=posthoc?")
    return [load_snapshot(f) for f in files]


def _to_cpu(snap: Snapshot) -> Snapshot:
    return Snapshot(snap.step, snap.gamma, {k: v.detach().cpu() for k, v in snap.tensors.items()})


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
