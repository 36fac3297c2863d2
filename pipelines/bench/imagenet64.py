"""`python -m pipelines.bench imagenet64 [--quick]`: what one training step of the full-size ImageNet-64 presets
costs, measured here, and what a full run would cost on GPUs under a stated throughput assumption.

Measured in one run on this CPU (one thread): FLOPs of one training step per image (the objective's real loss
and backward on the full ADM-size network, counted by torch.utils.flop_counter.FlopCounterMode: matmuls and
convolutions, forward + backward + the objective's no-grad passes), and seconds per step at batch 1 and 2.
Scaled: FLOPs/step x batch x steps of each preset / (GPUs x an assumed sustained throughput per GPU).

The assumption, printed with the numbers: `--mfu` (default 0.35) of the dense bf16 peak (A100 312 TFLOP/s,
H100 SXM 989 TFLOP/s); UNets at 64x64 with attention at 32x32 rarely sustain more. FlopCounterMode counts
matmul/conv FLOPs only (norms, activations and the optimizer are left out), which makes the estimate a floor.
`--quick` uses a reduced-width net to check that the benchmark runs (numbers meaningless).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fewstep.config import TrainConfig, load_config
from fewstep.networks import count_parameters
from fewstep.objectives import build_model, build_objective, capabilities
from pipelines.presets import preset_path

PRESETS = ("imagenet64-ict", "imagenet64-mct", "imagenet64-mcd")
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}  # dense bf16 tensor-core peak, FLOP/s (NVIDIA data sheets)
QUICK_NET = ["network.channels=[16, 32, 48, 64]", "network.attention_head_dim=16", "network.norm_groups=8"]


def preset_config(name: str, quick: bool) -> TrainConfig:
    # The teacher is a stand-in of the same architecture: only its cost matters here, not its weights.
    sets = ["objective.teacher=bench"] if name.endswith("mcd") else []
    return load_config(preset_path(name), None, sets + (QUICK_NET if quick else []))


def step_compute(cfg: TrainConfig, model, teacher, batch: int, step: int) -> None:
    """One training step's compute at `batch` images: the objective's loss and backward (the optimizer's
    elementwise update is left out: it is O(params), not O(params x pixels))."""
    x = torch.rand(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    labels = torch.randint(0, cfg.data.num_classes, (batch,))
    extra = {"teacher": teacher} if teacher is not None else {}
    loss, _ = build_objective(cfg).loss(model, x, labels, step=step, **extra)
    loss.backward()
    model.zero_grad(set_to_none=True)


def flops_per_image(cfg: TrainConfig, model, teacher) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step_compute(cfg, model, teacher, batch=1, step=0)
    return float(counter.get_total_flops())


def seconds_per_step(cfg: TrainConfig, model, teacher, batch: int, steps: int) -> float:
    step_compute(cfg, model, teacher, batch, step=0)  # warm-up (allocator, lazy inits)
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        step_compute(cfg, model, teacher, batch, step=k)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench imagenet64", description=__doc__)
    p.add_argument("--quick", action="store_true", help="reduced-width net: checks that it runs")
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch size (the fastest is kept)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed sustained fraction of the bf16 peak")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    rows = []
    for name in PRESETS:
        cfg = preset_config(name, args.quick)
        model = build_model(cfg).train()
        teacher = build_model(cfg).eval().requires_grad_(False) if capabilities(cfg).teacher == "required" else None
        flops = flops_per_image(cfg, model, teacher)
        rows.append((name, cfg, flops))
        print(f"{name}: {count_parameters(model) / 1e6:.1f}M params, {flops / 1e9:.1f} GFLOP per image per "
              f"training step ({cfg.objective.name}{', + frozen teacher' if teacher is not None else ''})")
        if name == PRESETS[0]:  # wall time on this CPU: one preset is enough to calibrate FLOP/s
            for batch in (1, 2):
                s = seconds_per_step(cfg, model, teacher, batch, args.steps)
                print(f"  CPU, 1 thread, batch {batch}: {s:.2f} s/step = {batch * flops / s / 1e9:.1f} GFLOP/s "
                      f"achieved")

    print(f"\nfull runs, assuming {args.mfu:.0%} of the dense bf16 peak is sustained "
          f"({', '.join(f'{g} {args.mfu * f / 1e12:.0f} TFLOP/s' for g, f in PEAK_BF16.items())}):")
    for name, cfg, flops in rows:
        b, n, w = cfg.optim.batch_size, cfg.optim.total_steps, cfg.engine.num_workers
        total = flops * b * n
        est = ", ".join(
            f"{g}: {total / (args.mfu * peak) / 3600:,.0f} GPU-h = {total / (args.mfu * peak * w) / 3600:,.1f} h "
            f"on {w}" for g, peak in PEAK_BF16.items()
        )
        print(f"  {name}: batch {b} x {n:,} steps = {b * n / 1e9:.2f}B images, {total:.2e} FLOP; {est}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
