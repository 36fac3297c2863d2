"""python -m pipelines.train [--preset NAME] [--config FILE.yaml] [--set dotted.key=value ...] [--dry-run]"""

from __future__ import annotations

import logging
import os
import sys

from fewstep.cli import ArgumentParser, add_address, address_override, command
from fewstep.config import load_config, to_yaml
from pipelines.presets import available, preset_path


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    p.add_argument("--preset", default="fashion-ict", help=f"one of: {', '.join(available())}")
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_address(p)
    p.add_argument("--run-name", help="reuse a name to resume that run (Ray Train storage + MLflow run)")
    p.add_argument("--output-dir", default="outputs", help="where the final sample grid is written")
    p.add_argument("--dry-run", action="store_true",
                   help="run the checks a run starts with (shards, MLflow, teacher / init_from), print the resolved "
                   "config and exit")
    args = p.parse_args(argv)
    cfg = load_config(preset_path(args.preset), args.config, args.overrides + address_override(args))
    from fewstep.engine import preflight, train

    if args.dry_run:
        pre = preflight(cfg)
        print(to_yaml(pre.cfg), end="")
        for key, pinned in (("objective.teacher", pre.teacher), ("objective.init_from", pre.init_from)):
            if pinned:
                print(f"# {key} resolves to {pinned}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from fewstep.faults import DivergenceError

    try:
        s = train(cfg, run_name=args.run_name, output_dir=args.output_dir)
    except DivergenceError as e:  # the run's outcome, not a bug: the message says how to resume
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow run:        {s.run_url}")
    if s.registered_model:
        uri = f"models:/{s.registered_model}@{cfg.tracking.alias}"
        print(f"Registered model:  {s.registered_model} version {s.version} ({uri})")
    print(f"Samples (rows = {', '.join(map(str, cfg.eval.steps))} steps): {s.samples_png}")
    print(f"Trained {s.steps} steps in {s.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
