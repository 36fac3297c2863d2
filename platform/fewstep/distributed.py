"""DeepSpeed wiring: the engine config, ZeRO-3 parameter gathering, and the
consolidation of a ZeRO checkpoint into one fp32 state_dict."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the typed config: global batch = micro x accum x world, so the
    global batch (optim.batch_size) stays fixed when the worker count changes and accumulation absorbs it."""
    e = cfg.engine
    micro = e.micro_batch or cfg.optim.batch_size // e.num_workers
    if world_size != e.num_workers:
        raise ValueError(f"engine.num_workers={e.num_workers} but Ray started {world_size} workers")
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if e.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = e.zero3_persist_below
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": e.grad_accum(cfg.optim.batch_size),
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", **e.fp16.model_dump()},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,  # a torch optimizer (RAdam) under ZeRO
        # ZeRO-Offload refuses client optimizers unless told; RAdam has no DeepSpeedCPUAdam counterpart.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward for every diffusers model inside `model` (the UNet's blocks)."""
    found = [m for m in model.modules() if hasattr(m, "enable_gradient_checkpointing")]
    if not found:
        raise ValueError("engine.activation_checkpointing: the model has no diffusers module to checkpoint")
    for m in found:
        m.enable_gradient_checkpointing()


def consolidated_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """One fp32 state_dict from a DeepSpeed checkpoint that every rank wrote into `checkpoint_dir/tag`.

    ZeRO 1-3 (and bf16 at stage 0) keep fp32 master weights partitioned across the ranks' optimizer files:
    DeepSpeed's zero_to_fp32 merges them. Plain fp32 at stage 0 has no partitions; its module state is the
    fp32 master itself. Reads DeepSpeed's own pickles: only for checkpoints this platform wrote."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = Path(checkpoint_dir) / tag
    if any(d.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        state = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters inside the block on every rank (ZeRO-3 partitions them); a collective call."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
