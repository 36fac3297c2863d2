"""python -m pipelines.sample --model models:/NAME@ALIAS --steps 1[,2] [--sampler ddim|addim|ict] --n 64 --out grid.png

Loads the registered model exactly as a user would (mlflow.pyfunc) and writes one grid row block per
step count. Class-conditional models cycle through the classes unless --class-label is given. Text-to-image
models: one grid per --prompt (repeatable), written as OUT_STEM-<prompt>.png; --guidance for diffusion models.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from fewstep.cli import ArgumentParser, UserError, command, step_list
from fewstep.probe import check_model_server


def check_request(args, column: str, metadata: dict) -> None:
    """Refuse what this model cannot honour before sampling, naming the flag: a prompt to a class-conditional
    model, a class label it does not know, a sampler it does not have."""
    if column != "prompt" and (args.prompt or args.guidance is not None):
        flag = "--prompt" if args.prompt else "--guidance"
        raise UserError(f"{flag}: this model is not text-to-image (it is conditioned on {column}): drop {flag}"
                        + (" and pick a class with --class-label" if column == "class_label" else ""))
    if column != "class_label" and args.class_label is not None:
        raise UserError(f"--class-label: this model is not class-conditional (its input is {column})")
    k = int(metadata.get("num_classes", 10))
    if column == "class_label" and args.class_label is not None and not 0 <= args.class_label < k:
        raise UserError(f"--class-label {args.class_label}: this model knows classes 0..{k - 1}")
    samplers = [s for s in str(metadata.get("samplers", "")).split(",") if s]
    if args.sampler and samplers and args.sampler not in samplers:
        raise UserError(f"--sampler {args.sampler}: this {metadata.get('objective', '')} model samples with "
                        f"{' or '.join(samplers)}")


@command
def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread races os.environ readers
    p = ArgumentParser(prog="python -m pipelines.sample", description=__doc__)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a model directory")
    p.add_argument("--steps", default=[1], type=step_list, help="comma-separated sampling step counts, e.g. 1,2")
    p.add_argument("--n", type=int, default=64, help="images per step count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampler", help="ddim | addim (multistep / diffusion models), ict (iCT models); default: the model's"
    )
    p.add_argument("--class-label", type=int, help="one class for all images (default: cycle through classes)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image: a prompt (one grid each)")
    p.add_argument("--guidance", type=float, help="text-to-image diffusion models: classifier-free guidance w")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    args = p.parse_args(argv)
    check_model_server(args.model, args.tracking_uri)  # before the slow imports: fails in seconds
    import mlflow
    import numpy as np
    import pandas as pd

    from fewstep import lineage, modelref
    from fewstep.images import DISPLAY_CELL, grid, save_png

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    if modelref.is_registry_uri(args.model):
        modelref.pin(args.model, mlflow.get_tracking_uri())  # unknown name or alias: an error naming both
    info = mlflow.models.get_model_info(args.model)  # its MLmodel file only: checked before the weights load
    column = info.signature.inputs.input_names()[0] if info.signature else "class_label"
    check_request(args, column, info.metadata or {})
    model = mlflow.pyfunc.load_model(args.model)
    if line := lineage.summary(args.model):
        print(line)
    steps = args.steps
    params = {"seed": args.seed, **({"sampler": args.sampler} if args.sampler else {})}
    if column == "prompt":
        if not args.prompt:
            p.error("this is a text-to-image model: give --prompt TEXT (repeatable)")
        params.update({"guidance": args.guidance} if args.guidance is not None else {})
        cols = math.ceil(math.sqrt(args.n)) if len(steps) == 1 else args.n
        out = Path(args.out)
        for text in args.prompt:
            frame = pd.DataFrame({"prompt": [text] * args.n})
            blocks = [model.predict(frame, params={"num_steps": k, **params}) for k in steps]
            slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]
            image = grid(np.concatenate(blocks), cols, cell=DISPLAY_CELL)
            path = save_png(image, out.with_name(f"{out.stem}-{slug}{out.suffix}"))
            print(f"wrote {path} ({text!r}: {len(steps)} x {args.n} images; steps {','.join(map(str, steps))})")
        return 0
    if column == "class_label":
        k = int((model.metadata.metadata or {}).get("num_classes", 10))  # checked against --class-label above
        labels = np.full(args.n, args.class_label) if args.class_label is not None else np.arange(args.n) % k
    else:
        labels = np.arange(args.n)
    frame = pd.DataFrame({column: labels.astype(np.int64)})
    blocks = [model.predict(frame, params={"num_steps": k, **params}) for k in steps]
    cols = math.ceil(math.sqrt(args.n)) if len(steps) == 1 else args.n
    path = save_png(grid(np.concatenate(blocks), cols, cell=DISPLAY_CELL), args.out)
    print(f"wrote {path} ({len(steps)} x {args.n} images; steps {','.join(map(str, steps))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
