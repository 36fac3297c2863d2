"""`python -m pipelines.bench quality`: sample quality of a preset trained by the local backend, then FID.

The training is `pipelines.train` itself with `engine.backend=local` (one process, the same loop, objective and
train_step as the distributed run, no Ray or DeepSpeed), so a setting tuned here is the setting the pipeline runs.
Then the EMA model's FID at each step count: `--fid-n` class-balanced samples against the first `--ref-n` images
of `data.test_shards`, padded like the training data (statistics cached next to the shards).

    python -m pipelines.bench quality --preset fashion-ict --set optim.total_steps=600 --out outputs/bq/run1

Results in --out: model/ (the export), result.json (config, steps, seconds, images/s, FID per step count).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench quality", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fashion-ict")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_quality/run"))
    p.add_argument("--threads", type=int, default=2, help="torch threads (2 = the demo's 2 workers x 1 thread)")
    p.add_argument("--steps", default=None, help="sampling step counts to score, e.g. 1,2 (default: eval.steps)")
    p.add_argument("--fid-n", type=int, default=1000, help="generated images per FID")
    p.add_argument("--ref-n", type=int, default=2000, help="held-out images in the FID reference")
    args = p.parse_args(argv)

    from fewstep.config import load_config, to_yaml
    from fewstep.engine import export_model, run
    from fewstep.evaluation import balanced_labels, fid_per_steps, heldout_reference
    from fewstep.fid import InceptionFeatures
    from fewstep.generator import Generator
    from pipelines.presets import preset_path

    args.out.mkdir(parents=True, exist_ok=True)
    local = [
        "engine.backend=local", "engine.num_workers=1", f"engine.threads_per_worker={args.threads}",
        "engine.max_failures=0", "engine.precision=fp32", "eval.fid_every=0", "tracking.registered_model=null",
        f"tracking.uri=sqlite:///{(args.out / 'mlflow.db').absolute()}", f"engine.storage_path={args.out.absolute()}",
        f"data.shards={REPO / 'data/fashion-mnist/train'}", f"data.test_shards={REPO / 'data/fashion-mnist/test'}",
    ]
    cfg = load_config(preset_path(args.preset), None, local + args.overrides)  # the user's --set win
    if not cfg.data.test_shards:
        raise SystemExit("the FID needs data.test_shards")
    (args.out / "config.yaml").write_text(to_yaml(cfg))
    name = f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}"
    r = run(cfg, name)
    if r.status != "finished":
        raise SystemExit(f"training {r.status}: {r.message}")
    model_dir = export_model(r.checkpoint, args.out / "model")
    gen = Generator.from_dir(model_dir)
    steps = [int(k) for k in args.steps.split(",")] if args.steps else cfg.eval.steps
    features = InceptionFeatures(threads=args.threads, progress=True)
    reference = heldout_reference(cfg.data.test_shards, args.ref_n, cfg.data.image_size, features)
    labels = balanced_labels(args.fid_n, cfg.network.num_classes) if gen.conditional else None
    t = time.perf_counter()
    fid = fid_per_steps(lambda k: gen.generate(args.fid_n, num_steps=k, seed=0, labels=labels), steps, reference,
                        features)
    images = r.metrics["step"] * cfg.optim.batch_size
    result = {"preset": args.preset, "overrides": args.overrides, "steps": r.metrics["step"], "train_s": r.seconds,
              "img_per_s": images / r.seconds, "fid": fid, "fid_n": args.fid_n, "ref_n": args.ref_n,
              "eval_s": time.perf_counter() - t, "run_id": r.run_id}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps", "train_s", "img_per_s", "fid")}))

