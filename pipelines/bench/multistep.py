"""The step-budget family in miniature on Fashion-MNIST: do the MCM paper's orderings hold at one CPU budget?

    python -m pipelines.bench multistep [--steps 800 --batch 32 --threads 2 --fid-n 500 --ref-n 1000] [--quick]

Every run is `pipelines.train` with `engine.backend=local` (one process, `--threads` torch threads, the same
loop and train_step as the distributed run) on the Fashion-MNIST shards of `make data`, step-matched (same
optimizer steps and batch): the matching fashion-* preset (network, optimizer, EMA, schedule) with its objective
overridden. FID: `--fid-n` class-balanced EMA samples vs the first `--ref-n` test images, padded like the training
data (statistics cached next to the test shards).

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

import torch

from fewstep import fid
from fewstep.config import TrainConfig, load_config
from fewstep.engine import export_model, run
from fewstep.evaluation import balanced_labels, fid_per_steps, heldout_reference
from fewstep.generator import Generator
from fewstep.networks import count_parameters
from fewstep.objectives import build_model
from pipelines.presets import preset_path

REPO = Path(__file__).resolve().parents[2]


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
    p.add_argument("--shards", type=Path, default=REPO / "data/fashion-mnist",
                   help="folder with train/ and test/ shards (make data)")
    p.add_argument("--quick", action="store_true", help="Toy budget that only checks the benchmark runs end to end.")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.fid_n, args.ref_n = 4, 8, 10, 20
    return args


def config(preset: str, args: argparse.Namespace, **objective) -> TrainConfig:
    """The preset at this benchmark's budget; teacher-step annealing over the first half, as the presets do."""
    sets = [f"optim.batch_size={args.batch}", f"optim.total_steps={args.steps}",
            f"optim.warmup_steps={min(50, args.steps // 4)}", "engine.backend=local", "engine.num_workers=1",
            f"engine.threads_per_worker={args.threads}", "eval.fid_every=0", "tracking.registered_model=null",
            f"tracking.uri=sqlite:///{(args.out / 'mlflow.db').absolute()}",
            f"engine.storage_path={args.out.absolute()}",
            f"data.shards={args.shards}/train", f"data.test_shards={args.shards}/test", f"seed={args.seed}"]
    if preset == "fashion-mct":  # this benchmark measures CT from scratch
        sets += ["objective.init_from=null", "optim.lr=0.0005"]
    if preset != "fashion-diffusion":
        sets.append(f"objective.anneal_steps={max(1, args.steps // 2)}")
    sets += [f"objective.{k}={json.dumps(v)}" for k, v in objective.items()]
    if "student_steps" in objective:  # the run's sample grid at the step count the student samples
        sets.append(f"eval.steps=[{objective['student_steps']}]")
    return load_config(preset_path(preset), None, sets)


def train(cfg: TrainConfig, name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """One local run of the pipeline; returns the exported EMA model and timings."""
    r = run(cfg, name)
    if r.status != "finished":
        raise SystemExit(f"{name}: training {r.status}: {r.message}")
    model_dir = export_model(r.checkpoint, args.out / name)
    images = cfg.optim.total_steps * cfg.optim.batch_size
    return Generator.from_dir(model_dir).model, {"train_s": r.seconds, "img_per_s": images / r.seconds,
                                                 "model_dir": str(model_dir)}


def main(argv: list[str]) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    features = fid.InceptionFeatures(threads=args.threads, progress=True)
    reference = heldout_reference(f"{args.shards}/test", args.ref_n, 32, features)
    labels = balanced_labels(args.fid_n, 10)
    results: dict[str, dict] = {}
    record = {"budget": {k: v for k, v in vars(args).items() if k != "out"}, "runs": results}

    def evaluate(name: str, model: torch.nn.Module, cfg: TrainConfig, info: dict, steps: list[int], **sample) -> None:
        gen = Generator(model, cfg)
        t = time.perf_counter()
        scores = fid_per_steps(lambda k: gen.generate(args.fid_n, k, 0, labels, **sample), steps, reference, features)
        results[name] = {**info, "fid": scores, "eval_s": time.perf_counter() - t}
        (args.out / "results.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"{name:28s} " + "  ".join(f"{k} steps: {v:7.1f}" for k, v in scores.items())
              + f"   ({info['train_s']:.0f} s train, {info['img_per_s']:.0f} img/s)", flush=True)

    # 1. the diffusion teacher, sampled with DDIM at 8 / 32 / 128 steps (and aDDIM at 8)
    tcfg = config("fashion-diffusion", args)
    print(f"budget: {args.steps} steps x batch {args.batch}, {args.threads} threads, FID {args.fid_n} vs "
          f"{args.ref_n}; network {count_parameters(build_model(tcfg)) / 1e6:.2f}M params", flush=True)
    teacher_model, info = train(tcfg, "teacher", args)
    evaluate("diffusion (DDIM)", teacher_model, tcfg, info, [8, 32, 128])
    evaluate("diffusion (aDDIM)", teacher_model, tcfg, info, [8], sampler="addim")
    teacher_dir = info["model_dir"]

    # 2. multistep CT and CD at S = 1, 2, 4, 8: each model samples in exactly its S steps
    for S in (1, 2, 4, 8):
        cfg = config("fashion-mct", args, student_steps=S)
        evaluate(f"CT S={S}", *_trained(cfg, f"ct-s{S}", args), [S])
        cfg = config("fashion-mcd", args, student_steps=S, teacher=str(teacher_dir))
        evaluate(f"CD S={S}", *_trained(cfg, f"cd-s{S}", args), [S])
    # 3. the teacher-step ablations at S = 4 [MCM Tables 2, 4]
    cfg = config("fashion-mcd", args, student_steps=4, teacher=str(teacher_dir), teacher_sampler="ddim")
    evaluate("CD S=4 DDIM teacher", *_trained(cfg, "cd-s4-ddim", args), [4])
    n_end = cfg.objective.n_end
    cfg = config("fashion-mcd", args, student_steps=4, teacher=str(teacher_dir), n_start=n_end)
    evaluate(f"CD S=4 fixed N={n_end}", *_trained(cfg, "cd-s4-fixed", args), [4])
    report(results)


def _trained(cfg, name, args):
    model, info = train(cfg, name, args)
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
