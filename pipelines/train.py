"""python -m pipelines.train [--preset NAME] [--config FILE.yaml] [--set dotted.key=value ...] [--dry-run]"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fewstep.config import ConfigError, load_config, to_yaml
from pipelines.presets import available, preset_path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    p.add_argument("--preset", default="fashion-ict", help=f"one of: {', '.join(available())}")
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster: local (a private one), auto (`ray start` on this machine), "
                   "HOST:PORT; default: $RAY_ADDRESS, else local (engine.ray_address)")
    p.add_argument("--run-name", help="reuse a name to resume that run (Ray Train storage + MLflow run)")
    p.add_argument("--output-dir", default="outputs", help="where the final sample grid is written")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    try:
        address = [f"engine.ray_address={json.dumps(args.address)}"] if args.address else []
        cfg = load_config(preset_path(args.preset), args.config, args.overrides + address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from fewstep.engine import train

    try:
        s = train(cfg, run_name=args.run_name, output_dir=args.output_dir)
    except ConfigError as e:  # e.g. a distillation teacher that does not fit the config
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MLflow run:        {s.run_url}")
    if s.registered_model:
        uri = f"models:/{s.registered_model}@{cfg.tracking.alias}"
        print(f"Registered model:  {s.registered_model} version {s.version} ({uri})")
    print(f"Samples (rows = {', '.join(map(str, cfg.eval.steps))} steps): {s.samples_png}")
    print(f"Trained {s.steps} steps in {s.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
