"""python -m tune.sweep --preset NAME --space tune/spaces/SPACE.yaml [--samples N] [--name NAME] [--set KEY=VALUE ...]

Each trial is a full distributed training run (Ray Tune over Ray Train + DeepSpeed), logged as an MLflow child
run of the sweep's parent run. At the end: the Pareto table (best FID per sampling-step budget) and plot on the
parent run, and the winners registered with aliases @fast (<= 1 step), @balanced (<= 4), @quality (<= 8).
`--set sweep.search=optuna` (or any sweep.* field) changes how it searches; other --set keys change the preset.
Re-running a stopped sweep with the same name resumes it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fewstep.cli import ArgumentParser, add_address, address_override, command
from pipelines.presets import available


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m tune.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(available())}")
    p.add_argument("--space", required=True, help="tune/spaces/NAME.yaml (or just NAME)")
    p.add_argument("--samples", type=int, help="number of trials (default: the space's sweep.num_samples)")
    p.add_argument("--name", help="sweep name (default: PRESET-SPACE); the same name resumes a stopped sweep")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", default="outputs", help="where the Pareto table and plot are written")
    add_address(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from tune.runner import run_sweep

    overrides = args.overrides + address_override(args)
    s = run_sweep(args.preset, args.space, args.samples, overrides, args.name, args.output_dir)
    print(f"Sweep {s.name}{' (restored)' if s.restored else ''}: parent run {s.parent_url}")
    print(s.published.markdown, end="")
    for alias, (version, row) in s.published.aliases.items():
        print(f"models:/{s.registered_model}@{alias} -> version {version} ({row.trial}, {row.steps} steps, "
              f"FID {row.fid:.1f})")
    print(f"Pareto table and plot: {s.out_dir}")
    for path, err in s.errors.items():  # the table is built from the trials that finished
        print(f"trial failed: {err}\n  full error: {path}/error.txt", file=sys.stderr)
    return 1 if s.errors else 0


if __name__ == "__main__":
    sys.exit(main())
