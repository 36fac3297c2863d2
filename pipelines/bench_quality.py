"""Tune the CPU demo preset for sample quality: a plain single-process iCT loop on a wall-clock budget.

Not a test and not the training pipeline: one process, no Ray/DeepSpeed, `--threads 2` to emulate the demo's
2 workers x 1 thread (the distributed run adds its own overhead on top). It uses fewstep's own network,
preconditioner, objective, sampler, optimizer/LR schedule and EMA, then reports 1- and 2-step FID of the EMA
model (N samples, uniform classes) against the first `--ref-n` Fashion-MNIST test images, padded to 32x32.

    python -m pipelines.bench_quality --minutes 6 --channels 16 32 64 --lr 1e-3 --s1 80 --out outputs/bq/run1

Results land in --out: ema.pt (EMA state_dict), samples.npz, samples.png (rows = classes; 1-step block left,
2-step block right), result.json (rewritten after each FID).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fewstep import fid
from fewstep.config import OptimConfig
from fewstep.distributed import build_optimizer, lr_schedule
from fewstep.edm import EDMConfig, EDMPrecond
from fewstep.ict import ICTConfig, ICTObjective, sample
from fewstep.images import grid, save_png, to_uint8
from fewstep.networks import NetworkConfig, UNet, count_parameters

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REF_CACHE = Path("outputs/bench_quality")


def load_fashion(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 32, 32) float in [-1, 1] (28x28 padded with -1) and (N,) int64 labels, from the idx.gz files."""
    stem = "train" if split == "train" else "t10k"
    raw = gzip.open(FMNIST / f"{stem}-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.frombuffer(gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32)
    return x, torch.from_numpy(labels.astype(np.int64))


def ref_stats(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inception stats of the first n test images, as the model sees them (32x32, pad 0 = -1), cached."""
    raw = gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))  # (n, 32, 32, 1)
    return fid.reference_stats(images, REF_CACHE / f"fid_ref_fmnist_test{n}_pad32.npz")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", type=Path, required=True, help="Output folder (result.json, samples.png).")
    a("--minutes", type=float, default=6.0, help="Wall-clock training budget.")
    a("--max-steps", type=int, default=None, help="Stop after this many steps even if time is left.")
    a("--threads", type=int, default=2, help="torch intra-op threads (2 = the demo's 2 workers x 1 thread).")
    a("--seed", type=int, default=0)
    # network
    a("--channels", type=int, nargs="+", default=[16, 32, 64])
    a("--attention", type=int, nargs="+", default=None, help="0/1 per level; default: last level only.")
    a("--mid-attention", type=int, default=1)
    a("--layers", type=int, default=1, help="Residual blocks per level.")
    a("--norm-groups", type=int, default=8)
    a("--head-dim", type=int, default=32)
    a("--dropout", type=float, default=0.0)
    a("--scale-shift", type=int, default=0, help="network.scale_shift_norm (ADM adaptive GroupNorm)")
    a("--resblock-updown", type=int, default=0, help="network.resblock_updown")
    a("--zero-init", type=int, default=0, help="network.zero_init (ADM zero-initialised residual outputs)")
    a("--noise-scale", type=float, default=1000.0, help="network.noise_embedding_scale")
    # optimizer
    a("--optim", choices=["adam", "radam", "adamw"], default="adam")
    a("--lr", type=float, default=5e-4)
    a("--beta2", type=float, default=0.999)
    a("--warmup", type=int, default=50)
    a("--decay-frac", type=float, default=0.0, help="Linear lr decay to 0 over this last fraction (needs --max-steps).")
    a("--batch", type=int, default=64)
    a("--ema", type=float, nargs="+", default=[0.99], help="EMA decays per step (eval only); several = sweep.")
    # objective
    a("--s0", type=int, default=10)
    a("--s1", type=int, default=160)
    a("--curriculum-steps", type=int, default=None, help="K of the curriculum; default: frac x estimated steps.")
    a("--curriculum-frac", type=float, default=1.0, help="K = frac x the estimated total steps of the budget.")
    a("--p-mean", type=float, default=-1.1)
    a("--p-std", type=float, default=2.0)
    a("--huber-c", type=float, default=None, help="None = 0.00054 sqrt(D) = 0.0173 at 32x32x1.")
    a("--sigma-max", type=float, default=80.0)
    a("--sigma-mid", type=float, nargs="*", default=[0.821], help="2-step sampling; several = sweep, none = skip.")
    # evaluation
    a("--fid-n", type=int, default=1000, help="Generated samples per FID.")
    a("--ref-n", type=int, default=2000, help="Test images in the FID reference.")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. model f = EDM preconditioner around the UNet, optimizer + warm-up, eval-only EMA (as the worker does)
    attention = [bool(v) for v in (args.attention or [0] * (len(args.channels) - 1) + [1])]
    net_cfg = NetworkConfig(
        channels=args.channels, attention=attention, layers_per_block=args.layers, dropout=args.dropout,
        num_classes=10, norm_groups=args.norm_groups, attention_head_dim=args.head_dim,
        mid_attention=bool(args.mid_attention), noise_embedding_scale=args.noise_scale,
        scale_shift_norm=bool(args.scale_shift), resblock_updown=bool(args.resblock_updown),
        zero_init=bool(args.zero_init),
    )
    edm_cfg = EDMConfig(sigma_max=args.sigma_max)
    model = EDMPrecond(UNet(net_cfg), edm_cfg)
    if args.decay_frac and not args.max_steps:
        raise SystemExit("--decay-frac needs --max-steps (the decay ends at the last step)")
    optim_cfg = OptimConfig(name=args.optim, lr=args.lr, betas=(0.9, args.beta2), warmup_steps=args.warmup,
                            batch_size=args.batch, total_steps=args.max_steps or 10**9,
                            decay_fraction=args.decay_frac)
    opt = build_optimizer(model.parameters(), optim_cfg)
    sched = lr_schedule(opt, optim_cfg)
    emas = {d: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in args.ema}
    ict_cfg = ICTConfig(edm=edm_cfg, s0=args.s0, s1=args.s1, p_mean=args.p_mean, p_std=args.p_std,
                        huber_c=args.huber_c, sigma_mid=args.sigma_mid[:1] or [0.821])
    print(f"params {count_parameters(model) / 1e6:.3f}M  network {net_cfg.model_dump()}", flush=True)

    # 2. data: all 60k training images in memory, fresh random batches each step
    x_train, y_train = load_fashion("train")
    budget = args.minutes * 60
    objective = ICTObjective(ict_cfg, data_dim=32 * 32, total_steps=10**9)  # K is set once speed is known
    est_steps = None
    losses: list[float] = []
    step, t_train, t0 = 0, 0.0, time.perf_counter()
    while t_train < budget and (args.max_steps is None or step < args.max_steps):
        idx = torch.randint(0, len(x_train), (args.batch,))
        loss, info = objective.loss(model, x_train[idx], y_train[idx], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for ema in emas.values():
            ema.update_parameters(model)
        step += 1
        losses.append(loss.item())
        t_train = time.perf_counter() - t0
        if step == 20 and est_steps is None:
            # 3. the curriculum needs K up front: estimate the steps this budget affords from the first 20
            # --max-steps, when given, is the step budget (wall time on a shared box is only a safety cap)
            est_steps = args.max_steps or int(budget / (t_train / step))
            objective.total_k = args.curriculum_steps or max(1, int(args.curriculum_frac * est_steps))
            print(f"planned {est_steps} steps ({t_train / step:.2f} s/step so far); curriculum K = {objective.total_k}",
                  flush=True)
        if step % 50 == 0:
            print(f"step {step:5d}  t {t_train:6.1f}s  loss {np.mean(losses[-50:]):.4f}  N {info['n_levels']:.0f}"
                  f"  lr {sched.get_last_lr()[0]:.2e}  {step * args.batch / t_train:.1f} img/s", flush=True)
    img_s = step * args.batch / t_train
    print(f"trained {step} steps in {t_train:.0f}s = {img_s:.1f} img/s; final N {objective.n_levels(step - 1)}")

    # 4. EMA samples: N images with uniform labels, fixed noise; 1 step per EMA decay, 2 steps per sigma_mid
    g = torch.Generator().manual_seed(1234)
    labels = torch.arange(args.fid_n) % 10
    noise = torch.randn(args.fid_n, 1, 32, 32, generator=g)

    def generate(gen_model: torch.nn.Module, sigmas: list[float]) -> np.ndarray:
        out = [sample(gen_model, noise[i : i + 250], sigmas, labels[i : i + 250], edm_cfg.sigma_min, g)
               for i in range(0, args.fid_n, 250)]
        return to_uint8(torch.cat(out))  # (N, 32, 32, 1)

    # 5. save what the (slow) FID needs first: the EMA weights, all samples and the grid, then one FID at a time
    #    with result.json rewritten after each, so a run killed during the Inception pass keeps its evidence.
    first = emas[args.ema[0]].module.eval()
    torch.save(first.state_dict(), args.out / "ema.pt")
    samples = {"1step": generate(first, [args.sigma_max])}
    samples |= {f"2step_mid{m}": generate(first, [args.sigma_max, m]) for m in args.sigma_mid}
    samples |= {f"1step_ema{d}": generate(emas[d].module.eval(), [args.sigma_max]) for d in args.ema[1:]}
    np.savez_compressed(args.out / "samples.npz", **samples)
    shown = []
    for imgs in list(samples.values())[:2]:
        # rows = classes 0..9 (labels cycle 0..9, so sample k*10 + c has class c), up to 10 samples each
        k = min(10, len(imgs) // 10)
        shown.append(imgs[: 10 * k].reshape(k, 10, 32, 32, 1).transpose(1, 0, 2, 3, 4).reshape(10 * k, 32, 32, 1))
    save_png(np.concatenate([grid(s, cols=len(s) // 10) for s in shown], axis=1), args.out / "samples.png")

    t_eval = time.perf_counter()
    record = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params_M": count_parameters(model) / 1e6, "steps": step, "train_s": t_train, "img_per_s": img_s,
        "curriculum_K": objective.total_k, "final_N": objective.n_levels(step - 1),
        "final_loss": float(np.mean(losses[-50:])), "fid": {}, "fid_n": args.fid_n, "ref_n": args.ref_n,
    }
    (args.out / "result.json").write_text(json.dumps(record, indent=2))
    mu_ref, sigma_ref = ref_stats(args.ref_n)
    extractor = fid.InceptionFeatures(batch_size=50, threads=args.threads)
    results: dict[str, float] = record["fid"]
    for name, imgs in samples.items():
        results[name] = fid.frechet_distance(*fid.stats(extractor(imgs)), mu_ref, sigma_ref)
        record["eval_s"] = time.perf_counter() - t_eval
        (args.out / "result.json").write_text(json.dumps(record, indent=2))
        print(f"FID {name}: {results[name]:.1f}", flush=True)
    print(json.dumps({k: record[k] for k in ("steps", "img_per_s", "final_N", "final_loss", "fid")}))
    if not all(math.isfinite(v) for v in results.values()):
        raise SystemExit("non-finite FID")


if __name__ == "__main__":
    main()
