"""python -m pipelines.posthoc_ema --run RUN [--sigma-rel 0.02,0.05,0.1,0.2] [--steps 1,2,4] [--seeds K] [--n N]

Post-hoc EMA [EDM2 sec. 3.2] of a run trained with ema.mode=posthoc: reads the snapshots in the run's latest
checkpoint, reconstructs the EMA of every --sigma-rel length, evaluates each at every --steps count with FID
(the mean over --seeds sampling seeds), logs the table and plot to the run (artifacts posthoc_ema/), and registers
the best EMA length per step count as model versions with aliases @best-<k>step. RUN: an MLflow run id or run
name (tracking URI: --tracking-uri or $MLFLOW_TRACKING_URI). Non-interactive: runs as a Ray job too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fewstep.cli import ArgumentParser, UserError, command, step_list


def floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m pipelines.posthoc_ema", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="MLflow run id or run name of an ema.mode=posthoc run")
    p.add_argument("--sigma-rel", default="0.02,0.05,0.1,0.2", help="comma-separated EMA lengths to reconstruct")
    p.add_argument("--steps", default=[1, 2, 4], type=step_list, help="comma-separated sampling step counts")
    p.add_argument("--seeds", type=int, default=1, help="sampling seeds per FID (the mean is reported)")
    p.add_argument("--n", type=int, default=1000, help="generated images per FID")
    p.add_argument("--n-ref", type=int, default=2000, help="held-out images in the reference statistics")
    p.add_argument("--reference", help="held-out shards; default: the run's data.test_shards")
    p.add_argument("--checkpoint", help="checkpoint directory; default: the run's latest in engine.storage_path")
    p.add_argument("--registered-model", help="registry name; default: the run's tracking.registered_model")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    p.add_argument("--num-workers", type=int, default=0, help="Ray actors for the FID; 0 = this process")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--output-dir", default="outputs", help="where the table and plot are written")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from fewstep import posthoc_select as ph
    from fewstep.config import ConfigError
    from fewstep.ema import checkpoint_snapshots
    from fewstep.tracking import RUN_NAME_TAG, resolve_uri

    uri = resolve_uri(args.tracking_uri)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        run = ph.find_run(client, args.run)
        run_id, run_name = run.info.run_id, run.data.tags.get(RUN_NAME_TAG, run.info.run_name)
        cfg = ph.run_config(client, run_id)
        if cfg.ema.mode != "posthoc":
            raise ConfigError(f"run {run_name} was trained with ema.mode={cfg.ema.mode}: it has no post-hoc EMA "
                              "snapshots (train with --set ema.mode=posthoc)")
        name = args.registered_model or cfg.tracking.registered_model
        if not name:
            raise ConfigError("the run has no tracking.registered_model: pass --registered-model NAME")
        checkpoint = Path(args.checkpoint) if args.checkpoint else ph.latest_checkpoint(cfg, run_name)
        snapshots = checkpoint_snapshots(checkpoint)
        steps = args.steps
        rows = ph.evaluate_grid(checkpoint, cfg, floats(args.sigma_rel), steps, args.n, args.n_ref, args.reference,
                                args.seeds, args.device, snapshots, args.num_workers)
    except ValueError as e:  # ConfigError is a UserError already
        raise UserError(str(e)) from e
    best = ph.best_per_steps(rows)
    md = ph.log_results(client, run_id, rows, best, cfg.ema.sigma_rels, Path(args.output_dir) / run_name)
    aliases = ph.register_best(client, run_id, checkpoint, cfg, uri, best, name, snapshots)
    last = max(s.step for s in snapshots)
    print(f"run {run_name}: {len(snapshots)} snapshots up to step {last} ({checkpoint})")
    print(f"FID ({args.n} samples x {args.seeds} seed(s) vs {args.n_ref} held-out):")
    print(md, end="")
    for k, r in sorted(best.items()):
        print(f"models:/{name}@{ph.alias(k)} -> version {aliases[ph.alias(k)]} (sigma_rel {r.sigma_rel:g}, "
              f"FID {r.fid:.2f} at {k} step{'s' if k > 1 else ''})")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
