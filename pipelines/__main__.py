"""`fewstep COMMAND [args]` (the console script `pip install` puts on PATH) and `python -m pipelines COMMAND`: one
entry point dispatching to the commands' own mains, e.g. `fewstep train --preset fashion-ict` is
`python -m pipelines.train --preset fashion-ict`; `fewstep COMMAND --help` lists each command's options."""

from __future__ import annotations

import importlib
import sys

from fewstep.cli import UserError, command

COMMANDS = {  # command -> (module with main(argv), what it does)
    "train": ("pipelines.train", "train a preset (Ray Train + DeepSpeed), track it in MLflow, register the model"),
    "sample": ("pipelines.sample", "sample image grids from a registered model"),
    "evaluate": ("pipelines.evaluate", "FID of a registered model per sampling-step count"),
    "prepare-data": ("pipelines.prepare_data", "write WebDataset shards from Fashion-MNIST, an image folder, parquet"),
    "sweep": ("tune.sweep", "a Ray Tune sweep; registers the best model per step budget"),
    "bench": ("pipelines.bench.__main__", "benchmarks (`fewstep bench --help` lists them)"),
    "posthoc-ema": ("pipelines.posthoc_ema", "the EMA length per step budget, from a run's post-hoc snapshots"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<13} {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: fewstep {{{','.join(COMMANDS)}}} [args]\n\ncommands:\n{rows}\n\nfewstep COMMAND --help: its options"


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)} (see fewstep --help)")
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
