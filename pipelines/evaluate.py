"""python -m pipelines.evaluate --model models:/NAME@ALIAS --steps 1,2 [--seeds K] [--n N] [--num-workers W]
python -m pipelines.evaluate --compare A.json B.json

Inception FID of the model's samples at each step count over K seeds (mean, std, min), against reference
statistics identified by the sha256 of their images; defaults come from the model's eval.protocol. Logs
fid_steps_<k> (and the protocol) to the model version's run and as registered-model-version tags, with a
FID-vs-steps plot with error bars. --out writes the table as JSON; --compare prints two such tables side by side
and refuses when their reference hashes (or sample counts) differ.
"""

from __future__ import annotations

import argparse
import os
import sys

from fewstep.cli import ArgumentParser, UserError, command, step_list
from fewstep.probe import check_model_server


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model directory")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two --out tables")
    p.add_argument("--steps", default=[1, 2], type=step_list, help="comma-separated sampling step counts")
    p.add_argument("--sampler", help="ddim | addim (multistep / diffusion models), ict (iCT); default: the model's")
    p.add_argument("--n", type=int, help="generated images per step count and seed (default: eval.protocol.n)")
    p.add_argument("--n-ref", type=int, help="images in the reference statistics, 0 = all (eval.protocol.n_ref)")
    p.add_argument("--reference", help="reference shards (default: the model's split of eval.protocol.reference)")
    p.add_argument("--seeds", type=int, help="seeds per step count (default: eval.protocol.seeds)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (seeds SEED..SEED+K-1)")
    p.add_argument("--num-workers", type=int, help="Ray actors; 0 = this process (default: eval.protocol)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="a GPU per actor (default: when the Ray cluster has GPUs)")
    p.add_argument("--out", help="write the FID table as JSON here")
    p.add_argument("--no-log", action="store_true", help="do not write results to MLflow")
    args = p.parse_args(argv)
    from fewstep.fid import inception_path

    inception_path()  # the FID weights first: a missing install fails before any model is downloaded
    if args.model:
        check_model_server(args.model)

    from fewstep.fid_table import FIDTable, IncomparableFID, compare

    if args.compare:
        if args.model:
            p.error("give either --model or --compare")
        a, b = args.compare
        try:
            print(compare(FIDTable.load(a), FIDTable.load(b), names=(a, b)))
        except (IncomparableFID, ValueError) as e:
            raise UserError(str(e)) from e
        return 0
    if not args.model:
        p.error("--model is required (or --compare A.json B.json)")

    from fewstep import lineage
    from fewstep.evaluation import evaluate

    steps = args.steps
    ev = evaluate(
        args.model, steps, n=args.n, reference_shards=args.reference, n_ref=args.n_ref, seeds=args.seeds,
        seed=args.seed, log=not args.no_log, sampler=args.sampler, num_workers=args.num_workers, use_gpu=args.gpu,
    )
    if line := lineage.summary(args.model):
        print(line)
    print(ev.table.format())
    if args.out:
        print(f"wrote {ev.table.save(args.out)}")
    if ev.run_id and not args.no_log:
        where = f"{ev.name} version {ev.version} (run {ev.run_id})" if ev.version else f"run {ev.run_id}"
        print(f"logged to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
