"""python -m pipelines.evaluate --model models:/NAME@ALIAS --steps 1,2 [--sampler S] [--n N] [--reference SHARDS]

Inception FID of the model's samples at each step count against the held-out split; logs fid_steps_<k> to
the model version's run and as registered-model-version tags, with a FID-vs-steps plot.
"""

from __future__ import annotations

import os
import sys

from fewstep.cli import ArgumentParser, UserError, command, step_list
from fewstep.probe import check_model_server


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
    p.add_argument("--steps", default=[1, 2], type=step_list, help="comma-separated sampling step counts")
    p.add_argument("--sampler", help="ddim | addim (multistep / diffusion models), ict (iCT); default: the model's")
    p.add_argument("--n", type=int, default=1000, help="generated images per step count")
    p.add_argument("--n-ref", type=int, default=2000, help="held-out images in the reference statistics")
    p.add_argument("--reference", help="held-out shards; default: the model's data.test_shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-log", action="store_true", help="do not write results to MLflow")
    args = p.parse_args(argv)
    from fewstep.fid import inception_path

    inception_path()  # the FID weights first: a missing install fails before any model is downloaded
    check_model_server(args.model)

    import mlflow
    import yaml

    from fewstep import lineage
    from fewstep.evaluation import evaluate

    reference = args.reference
    if reference is None:
        path = mlflow.artifacts.download_artifacts(f"{args.model}/artifacts/model/config.yaml")
        reference = yaml.safe_load(open(path))["data"]["test_shards"]
        if not reference:
            raise UserError("the model's config has no data.test_shards: pass --reference SHARDS")
    steps = args.steps
    ev = evaluate(
        args.model, steps, args.n, reference, args.n_ref, args.seed, log=not args.no_log, sampler=args.sampler
    )
    if line := lineage.summary(args.model):
        print(line)
    print(f"FID ({ev.n} samples vs {ev.n_ref} held-out images from {reference}):")
    for s, v in ev.fid.items():
        print(f"  {s} step{'s' if s > 1 else ' '}: {v:.2f}")
    if ev.version and not args.no_log:
        print(f"logged to {ev.name} version {ev.version} (run {ev.run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
