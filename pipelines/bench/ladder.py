"""The quality ladder at equal compute: from scratch vs from a diffusion model, on Fashion-MNIST.

    python -m pipelines.bench ladder [--images 25600 --teacher-share 0.5 --seeds 0,1 --fid-n 500 --ref-n 1000]

Every configuration gets the same total budget of training images (`--images`), the diffusion teacher included:
a student that starts from a diffusion model trains on (1 - share) of the budget after a teacher that trained on
`--teacher-share` of it (one teacher per family and seed, shared by its students and counted in each of them).
Rows: iCT from scratch; ECT from `edm`; multistep CT (S = 2, 4) from scratch and from `diffusion`; multistep CD
(S = 2, 4) of that `diffusion` model; CD S = 4 with DDIM teacher steps and with the teacher steps fixed at
N = 256 instead of annealed. Each row is trained with every seed; FID (`--fid-n` class-balanced EMA
samples vs the first `--ref-n` test images, padded like the training data) at 1, 2 and 4 steps where the model
samples them; mean, spread (max - min) over seeds. Every run is `pipelines.train` with `engine.backend=local`
(one process, `--threads` torch threads, the same loop as the distributed run) and is tracked in an MLflow store
under `--out`. Results: a table on stdout and `--out`/results.json, rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fewstep import fid
from fewstep.config import TrainConfig, load_config
from fewstep.engine import export_model, run
from fewstep.evaluation import balanced_labels, fid_per_steps, heldout_reference
from fewstep.generator import Generator
from pipelines.presets import preset_path

REPO = Path(__file__).resolve().parents[2]
# row -> (preset, teacher family or None, objective overrides, step counts evaluated)
ROWS: dict[str, tuple[str, str | None, dict, list[int]]] = {
    "iCT (scratch)": ("fashion-ict", None, {}, [1, 2]),
    "ECT (from edm)": ("fashion-ect", "edm", {}, [1, 2]),
    "MCM CT S=2 (scratch)": ("fashion-mct", None, {"student_steps": 2}, [2]),
    "MCM CT S=4 (scratch)": ("fashion-mct", None, {"student_steps": 4}, [4]),
    "MCM CT S=2 (from diffusion)": ("fashion-mct", "diffusion", {"student_steps": 2}, [2]),
    "MCM CT S=4 (from diffusion)": ("fashion-mct", "diffusion", {"student_steps": 4}, [4]),
    "MCM CD S=2": ("fashion-mcd", "diffusion", {"student_steps": 2}, [2]),
    "MCM CD S=4": ("fashion-mcd", "diffusion", {"student_steps": 4}, [4]),
    # the teacher-step ablations of CD S=4 [MCM Tables 2, 4]: DDIM instead of aDDIM; N fixed at the preset's n_end
    "MCM CD S=4 (DDIM teacher steps)": ("fashion-mcd", "diffusion", {"student_steps": 4, "teacher_sampler": "ddim"},
                                        [4]),
    "MCM CD S=4 (fixed N=256)": ("fashion-mcd", "diffusion", {"student_steps": 4, "n_start": 256}, [4]),
}
TEACHERS = {"edm": ("fashion-edm", [4, 16]), "diffusion": ("fashion-diffusion", [8, 32])}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench ladder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_ladder"))
    p.add_argument("--images", type=int, default=25_600, help="Training images per configuration, teacher included.")
    p.add_argument("--teacher-share", type=float, default=0.5, help="The teacher's part of the budget.")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every row is trained with each")
    p.add_argument("--rows", help="comma-separated subset of the rows (default: all)")
    p.add_argument("--fid-n", type=int, default=500, help="Generated images per FID.")
    p.add_argument("--ref-n", type=int, default=1000, help="Test images in the FID reference.")
    p.add_argument("--shards", type=Path, default=REPO / "data/fashion-mnist",
                   help="folder with train/ and test/ shards (make data)")
    p.add_argument("--quick", action="store_true", help="Toy budget that only checks the benchmark runs end to end.")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.fid_n, args.ref_n, args.seeds = 64, 8, 10, 20, "0"
    return args


def config(preset: str, args: argparse.Namespace, steps: int, seed: int, init_from: str | None,
           eval_steps: list[int] | None = None, **objective) -> TrainConfig:
    """The preset at `steps` optimizer steps of `--batch`, local backend, annealing/stages over the run; the run's
    sample grid at `eval_steps` (default: the preset's), the step counts the row's model samples."""
    sets = {**({"eval.steps": eval_steps} if eval_steps else {}),
            "optim.batch_size": args.batch, "optim.total_steps": steps, "optim.warmup_steps": min(50, steps // 4),
            "engine.backend": "local", "engine.num_workers": 1, "engine.threads_per_worker": args.threads,
            "eval.fid_every": 0, "eval.every": steps, "tracking.registered_model": None,
            "tracking.uri": f"sqlite:///{(args.out / 'mlflow.db').absolute()}",
            "engine.storage_path": str(args.out.absolute()), "data.shards": f"{args.shards}/train",
            "data.test_shards": f"{args.shards}/test", "seed": seed, "objective.init_from": init_from,
            **{f"objective.{k}": v for k, v in objective.items()}}
    if preset in ("fashion-mct", "fashion-mcd"):
        sets["objective.anneal_steps"] = max(1, steps // 2)
    if preset == "fashion-ict":
        sets["objective.curriculum_steps"] = steps
    return load_config(preset_path(preset), None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def train(cfg: TrainConfig, name: str, args: argparse.Namespace) -> tuple[Generator, float, Path]:
    r = run(cfg, name)
    if r.status != "finished":
        raise SystemExit(f"{name}: training {r.status}: {r.message}")
    model_dir = export_model(r.checkpoint, args.out / name)
    return Generator.from_dir(model_dir), r.seconds, model_dir


def main(argv: list[str]) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {k: v for k, v in ROWS.items() if not args.rows or k in args.rows.split(",")}
    total_steps = max(1, args.images // args.batch)
    teacher_steps = max(1, round(total_steps * args.teacher_share))
    features = fid.InceptionFeatures(threads=args.threads, progress=True)
    reference = heldout_reference(f"{args.shards}/test", args.ref_n, 32, features)
    labels = balanced_labels(args.fid_n, 10)
    runs: list[dict] = []
    record = {"budget": {"images": args.images, "batch": args.batch, "threads": args.threads, "seeds": seeds,
                         "teacher_share": args.teacher_share, "fid_n": args.fid_n, "ref_n": args.ref_n},
              "runs": runs}

    def score(gen: Generator, steps: list[int], sampler: str | None = None) -> dict[int, float]:
        return fid_per_steps(lambda k: gen.generate(args.fid_n, k, 0, labels, sampler=sampler), steps, reference,
                             features)

    def save(entry: dict) -> None:
        runs.append(entry)
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
        print(f"{entry['row']:30s} seed {entry['seed']}  " + "  ".join(f"{k} steps: {v:6.1f}"
              for k, v in entry["fid"].items()) + f"   ({entry['images']} images, {entry['seconds']:.0f} s)",
              flush=True)

    print(f"budget: {args.images} training images per configuration (batch {args.batch}, {total_steps} steps; "
          f"teachers {teacher_steps} steps), {args.threads} threads; FID {args.fid_n} vs {args.ref_n} test images",
          flush=True)
    # teachers of every seed first, then each row with every seed: a run cut short still has whole rows
    teachers: dict[tuple[str, int], tuple[Path, float]] = {}
    for seed in seeds:
        for family in dict.fromkeys(t for _, t, _, _ in rows.values() if t):
            preset, steps = TEACHERS[family]
            cfg = config(preset, args, teacher_steps, seed, None)
            gen, seconds, model_dir = train(cfg, f"{family}-seed{seed}", args)
            teachers[family, seed] = (model_dir, seconds)
            save({"row": f"{family} teacher", "seed": seed, "fid": score(gen, steps), "seconds": seconds,
                  "images": teacher_steps * args.batch})
    for row, (preset, family, objective, steps) in rows.items():
        for seed in seeds:
            own = total_steps - teacher_steps if family else total_steps
            init = str(teachers[family, seed][0]) if family else None
            extra = {"teacher": init} if preset == "fashion-mcd" else {}
            cfg = config(preset, args, own, seed, init, steps, **objective, **extra)
            slug = row.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("=", "")
            t = time.perf_counter()
            gen, seconds, _ = train(cfg, f"{slug}-seed{seed}", args)
            teacher_s = teachers[family, seed][1] if family else 0.0
            save({"row": row, "seed": seed, "fid": score(gen, steps), "train_s": time.perf_counter() - t,
                  "seconds": seconds + teacher_s, "images": own * args.batch
                  + (teacher_steps * args.batch if family else 0)})
    report(runs)


def report(runs: list[dict]) -> None:
    """Mean and spread (max - min) over seeds, per row and step count."""
    print("\n| configuration | images (teacher incl.) | seconds (teacher incl.) | FID by steps: mean (spread) |")
    print("|---|---|---|---|")
    for row in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == row]
        cells = []
        for k in mine[0]["fid"]:
            v = [r["fid"][k] for r in mine]
            cells.append(f"{k}: {statistics.mean(v):.1f} ({max(v) - min(v):.1f})")
        seconds = statistics.mean(r["seconds"] for r in mine)
        print(f"| {row} | {mine[0]['images']} | {seconds:.0f} | {', '.join(cells)} |")
