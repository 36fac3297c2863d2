"""The step-budget family in miniature on Fashion-MNIST: do the MCM paper's orderings hold at one CPU budget?

    python -m pipelines.bench multistep [--steps 800 --batch 32 --threads 2 --fid-n 500 --ref-n 1000] [--quick]

Not a test and not the distributed pipeline: one process, `--threads` torch threads, every run step-matched
(same optimizer steps and batch). Each run is the matching fashion-* preset (network, optimizer, EMA, schedule)
with its objective overridden, trained on the in-memory training split with fewstep's own model, objective,
EMA, Generator and teacher code. FID: `--fid-n` class-balanced EMA samples vs the first `--ref-n` test images
padded to 32x32 (cached under outputs/bench_quality/).

Runs (10 trainings): the diffusion teacher (FID at 8, 32, 128 DDIM steps); multistep CT at S = 1, 2, 4, 8;
multistep CD of that teacher (init from its weights, aDDIM teacher steps, annealed) at S = 1, 2, 4, 8; CD S = 4
with DDIM teacher steps; CD S = 4 with teacher steps fixed at n_end. Orderings checked [MCM Tables 2-4]:
CT improves with S; CD beats CT at 1-2 steps and they meet by 8; aDDIM beats DDIM as teacher step; annealed
beats fixed; the diffusion teacher improves with sampling steps. Results: a table on stdout and
`--out`/results.json (rewritten after every run, so a killed benchmark keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fewstep import fid
from fewstep import teacher as teachers
from fewstep.config import TrainConfig, load_config
from fewstep.distributed import build_optimizer, lr_schedule
from fewstep.evaluation import balanced_labels
from fewstep.generator import Generator
from fewstep.networks import count_parameters
from fewstep.objectives import build_model, build_objective
from pipelines.bench_quality import load_fashion, ref_stats
from pipelines.presets import preset_path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench multistep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_multistep"))
    p.add_argument("--steps", type=int, default=800, help="Optimizer steps of every run (the presets' 800).")
    p.add_argument("--batch", type=int, default=32, help="Batch of every run (the presets' 32).")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2 = the presets' 2 workers x 1 thread).")
    p.add_argument("--fid-n", type=int, default=500, help="Generated images per FID.")
    p.add_argument("--ref-n", type=int, default=1000, help="Test images in the FID reference.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="Toy budget that only checks the benchmark runs end to end.")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.fid_n, args.ref_n = 4, 8, 10, 20
    return args


def config(preset: str, args: argparse.Namespace, **objective) -> TrainConfig:
    """The preset at this benchmark's budget; teacher-step annealing over the first half, as the presets do."""
    sets = [f"optim.batch_size={args.batch}", f"optim.total_steps={args.steps}",
            f"optim.warmup_steps={min(50, args.steps // 4)}"]
    if preset != "fashion-diffusion":
        sets.append(f"objective.anneal_steps={max(1, args.steps // 2)}")
    sets += [f"objective.{k}={json.dumps(v)}" for k, v in objective.items()]
    return load_config(preset_path(preset), None, sets)


def train(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
          teacher: teachers.FrozenTeacher | None = None) -> tuple[torch.nn.Module, dict]:
    """Plain loop: Adam + warm-up, EMA for evaluation; returns the EMA model and timings."""
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    if teacher is not None and cfg.objective.init_from_teacher:
        teachers.init_student(model, teacher)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = lr_schedule(opt, cfg.optim)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay))
    objective = build_objective(cfg)
    extra = {"teacher": teacher} if teacher is not None else {}
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.optim.total_steps):
        idx = torch.randint(0, len(x), (cfg.optim.batch_size,), generator=g)
        loss, _ = objective.loss(model, x[idx], y[idx], step, **extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    return ema.module.eval(), {"train_s": seconds, "img_per_s": cfg.optim.total_steps * cfg.optim.batch_size / seconds,
                               "final_loss": float(np.mean(losses[-50:]))}


def main(argv: list[str]) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = load_fashion("train")
    reference = ref_stats(args.ref_n)
    features = fid.InceptionFeatures(threads=args.threads)
    labels = balanced_labels(args.fid_n, 10)
    results: dict[str, dict] = {}
    record = {"budget": {k: v for k, v in vars(args).items() if k != "out"}, "runs": results}

    def evaluate(name: str, model: torch.nn.Module, cfg: TrainConfig, info: dict, steps: list[int], **sample) -> None:
        gen = Generator(model, cfg)
        t = time.perf_counter()
        scores = {k: fid.frechet_distance(*fid.stats(features(gen.generate(args.fid_n, k, 0, labels, **sample))),
                                          *reference) for k in steps}
        results[name] = {**info, "fid": scores, "eval_s": time.perf_counter() - t}
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
        print(f"{name:28s} " + "  ".join(f"{k} steps: {v:7.1f}" for k, v in scores.items())
              + f"   ({info['train_s']:.0f} s train, {info['img_per_s']:.0f} img/s)", flush=True)

    # 1. the diffusion teacher, sampled with DDIM at 8 / 32 / 128 steps (and aDDIM at 8)
    tcfg = config("fashion-diffusion", args)
    print(f"budget: {args.steps} steps x batch {args.batch}, {args.threads} threads, FID {args.fid_n} vs "
          f"{args.ref_n}; network {count_parameters(build_model(tcfg)) / 1e6:.2f}M params", flush=True)
    teacher_model, info = train(tcfg, x, y, args)
    evaluate("diffusion (DDIM)", teacher_model, tcfg, info, [8, 32, 128])
    evaluate("diffusion (aDDIM)", teacher_model, tcfg, info, [8], sampler="addim")
    teacher_dir = Generator(teacher_model, tcfg).save(args.out / "teacher")
    teacher = teachers.load(str(teacher_dir), "")

    # 2. multistep CT and CD at S = 1, 2, 4, 8: each model samples in exactly its S steps
    for S in (1, 2, 4, 8):
        cfg = config("fashion-mct", args, student_steps=S)
        evaluate(f"CT S={S}", *_trained(cfg, x, y, args), [S])
        cfg = config("fashion-mcd", args, student_steps=S, teacher=str(teacher_dir))
        evaluate(f"CD S={S}", *_trained(cfg, x, y, args, teacher), [S])
    # 3. the teacher-step ablations at S = 4 [MCM Tables 2, 4]
    cfg = config("fashion-mcd", args, student_steps=4, teacher=str(teacher_dir), teacher_sampler="ddim")
    evaluate("CD S=4 DDIM teacher", *_trained(cfg, x, y, args, teacher), [4])
    n_end = cfg.objective.n_end
    cfg = config("fashion-mcd", args, student_steps=4, teacher=str(teacher_dir), n_start=n_end)
    evaluate(f"CD S=4 fixed N={n_end}", *_trained(cfg, x, y, args, teacher), [4])
    report(results)


def _trained(cfg, x, y, args, teacher=None):
    model, info = train(cfg, x, y, args, teacher)
    return model, cfg, info


def report(r: dict[str, dict]) -> None:
    f = {name: next(iter(v["fid"].values())) for name, v in r.items()}
    d = r["diffusion (DDIM)"]["fid"]
    checks = [
        ("CT improves with S (1 > 2 > 4 > 8)", f["CT S=1"] > f["CT S=2"] > f["CT S=4"] > f["CT S=8"]),
        ("CD beats CT at S = 1 and 2", f["CD S=1"] < f["CT S=1"] and f["CD S=2"] < f["CT S=2"]),
        ("CT and CD within 10% at S = 8", abs(f["CD S=8"] - f["CT S=8"]) <= 0.1 * f["CD S=8"]),
        ("aDDIM teacher beats DDIM teacher (CD S=4)", f["CD S=4"] < f["CD S=4 DDIM teacher"]),
        ("annealed beats fixed teacher steps (CD S=4)", f["CD S=4"] < next(v for k, v in f.items() if "fixed" in k)),
        ("diffusion improves 8 > 32 > 128 steps", d[8] > d[32] > d[128]),
    ]
    print("\n| ordering [MCM] | holds |\n|---|---|")
    for text, ok in checks:
        print(f"| {text} | {'yes' if ok else 'NO'} |")
