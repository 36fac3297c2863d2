"""Faults inside a training run: the divergence guard (non-finite losses), and the test-only hooks that inject
faults on purpose (a NaN loss, a SIGKILLed worker, slow steps) so that tests can exercise recovery for real."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field


class DebugConfig(BaseModel):
    """TEST-ONLY fault injection. Leave at the defaults in real runs: every field here breaks a run on purpose."""

    model_config = ConfigDict(extra="forbid")
    nan_batches: list[int] = Field(
        default_factory=list,
        description="Micro-batches (1-based, counted from the start of each worker process, skipped ones "
        "included) whose loss rank 0 replaces by NaN: exercises the divergence guard.",
    )
    kill_step: int | None = Field(
        None, ge=1, description="SIGKILL worker `kill_rank` right after optimizer step N, once per run."
    )
    kill_rank: int = Field(1, ge=0, description="The rank that `kill_step` kills.")
    kill_delay_s: float = Field(
        3.0,
        ge=0,
        description="Wait before the kill: Ray Train polls workers every 2 s, and a checkpoint reported less "
        "than one poll before a worker dies can be lost.",
    )
    step_sleep_s: float = Field(
        0.0, ge=0, description="Sleep after every optimizer step, so a test can act on a node or driver mid-run."
    )


class DivergenceError(RuntimeError):
    """K non-finite losses in a row: the run stopped; its last good checkpoint is kept."""


class DivergenceGuard:
    """Skips micro-batches whose loss is NaN/inf on ANY rank (all ranks must skip together, or DeepSpeed's
    gradient all-reduce would pair different micro-batches and hang), counts them, and says when
    `max_bad` came in a row."""

    def __init__(self, max_bad: int, world_size: int, skipped: int = 0):
        self.max_bad = max_bad
        self.world_size = world_size
        self.skipped = skipped  # over the whole run (restored from the checkpoint)
        self.in_a_row = 0

    def bad(self, loss: torch.Tensor) -> bool:
        """True when this micro-batch must be skipped on every rank; a collective call."""
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # gloo: a CPU tensor works for every backend here
        if flag.item() == 0.0:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        return True

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= self.max_bad

    def message(self, step: int, last_checkpoint: int) -> str:
        return (
            f"training diverged at step {step}: {self.in_a_row} non-finite losses in a row "
            f"(engine.max_bad_steps={self.max_bad}); stopped without saving, the last good checkpoint is "
            f"step {last_checkpoint}"
        )


class DebugHooks:
    """Applies a DebugConfig inside one worker. `marker_dir` holds the once-per-run kill marker."""

    def __init__(self, cfg: DebugConfig, rank: int, marker_dir: Path, run_id: str):
        self.cfg = cfg
        self.rank = rank
        self.kill_marker = marker_dir / f".debug-killed-{run_id}"
        self.batches = 0

    def corrupt(self, loss: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        if self.rank == 0 and self.batches in self.cfg.nan_batches:
            return loss * math.nan
        return loss

    def after_step(self, step: int) -> None:
        if self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)
        c = self.cfg
        if c.kill_step == step and c.kill_rank == self.rank and not self.kill_marker.exists():
            time.sleep(c.kill_delay_s)
            self.kill_marker.parent.mkdir(parents=True, exist_ok=True)
            self.kill_marker.write_text(str(step))
            print(f"debug: SIGKILL rank {self.rank} (pid {os.getpid()}) after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
