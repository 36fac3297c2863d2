"""python -m pipelines.prepare_data --source fashion-mnist --out DIR [--samples-per-shard N] [--limit N]

Writes DIR/train/train-000000.tar ... and DIR/test/test-000000.tar ... (WebDataset shards + manifest.json)
for `data.shards` / `data.test_shards`. A source is `NAME` or `NAME:ARG` (room for `imagefolder:PATH`,
`parquet:PATH`): add a function to SOURCES.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fewstep.data.shards import write_shards
from fewstep.data.sources import fashion_mnist


def _fashion_mnist(arg: str | None) -> dict[str, Callable[[], Iterable[dict]]]:
    root = arg or "/usr/share/datasets/fashion-mnist"
    return {"train": lambda: fashion_mnist("train", root), "test": lambda: fashion_mnist("test", root)}


# name -> (optional ARG after the colon) -> {split: sample iterator factory}
SOURCES: dict[str, Callable[[str | None], dict[str, Callable[[], Iterable[dict]]]]] = {
    "fashion-mnist": _fashion_mnist,  # fashion-mnist[:ROOT_DIR]
}


def parse_source(text: str) -> tuple[str, str | None]:
    """'fashion-mnist' -> ('fashion-mnist', None); 'imagefolder:/data/x' -> ('imagefolder', '/data/x')."""
    name, _, arg = text.partition(":")
    if name not in SOURCES:
        raise argparse.ArgumentTypeError(f"unknown source {name!r}; available: {', '.join(sorted(SOURCES))}")
    return name, arg or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.prepare_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=parse_source, help=f"one of: {', '.join(sorted(SOURCES))}")
    p.add_argument("--out", required=True, type=Path, help="output directory (gets train/ and test/)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--limit", type=int, default=None, help="first N samples of each split (smoke tests)")
    args = p.parse_args(argv)
    name, arg = args.source
    try:
        splits = SOURCES[name](arg)
        start = time.perf_counter()
        for split, make in splits.items():
            t0 = time.perf_counter()
            samples = itertools.islice(make(), args.limit)
            out = args.out / split
            shards = write_shards(samples, out, prefix=split, samples_per_shard=args.samples_per_shard,
                                  meta={"source": f"{name}:{arg}" if arg else name, "split": split})
            n = json.loads((out / "manifest.json").read_text())["num_samples"]
            seconds = time.perf_counter() - t0
            print(f"{split:>6}: {len(shards)} shards, {n} samples -> {out} ({seconds:.1f} s)")
        print(f"done in {time.perf_counter() - start:.1f} s")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
