"""python -m pipelines.prepare_data --source SOURCE --out DIR [--samples-per-shard N] [--limit N] [--ray]

Writes WebDataset shards (sorted keys, .png/.cls/.txt) + manifest.json (counts, classes, image sizes, sha256
per shard) for `data.shards` / `data.test_shards`:

  fashion-mnist[:ROOT]      DIR/train, DIR/test  (idx files, default /usr/share/datasets/fashion-mnist;
                                                  --captions varied: text-to-image captions)
  digits                    DIR/train, DIR/test  (scikit-learn's 8x8 digits; tiny tests)
  imagefolder:PATH          DIR/train            (ImageNet train layout; --image-size, --class-map)
  parquet:PATH_OR_GLOB      DIR/train            (--image-column, --caption-column, --label-column)

Existing WebDataset shards (e.g. imagenet-train-{000000..001281}.tar with .jpg + .cls) need no conversion:
point data.shards at them and map member names with data.image_ext / data.label_ext (README "Data sources").
--ray converts shards in parallel as Ray tasks (joins the running cluster or starts a local one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fewstep.cli import ArgumentParser, UserError, command
from fewstep.data.convert import convert
from fewstep.data.sources import Source, digits_source, fashion_mnist_source, imagefolder_source, parquet_source

SOURCE_NAMES = ("fashion-mnist", "digits", "imagefolder", "parquet")


def splits(name: str, arg: str | None, args: argparse.Namespace) -> dict[str, Callable[[], Source]]:
    """{split: source factory} of `--source NAME[:ARG]`."""
    if name == "fashion-mnist":
        root = arg or "/usr/share/datasets/fashion-mnist"
        return {s: partial(fashion_mnist_source, s, root, args.captions) for s in ("train", "test")}
    if name == "digits":
        return {s: partial(digits_source, s) for s in ("train", "test")}
    if not arg:
        raise ValueError(f"--source {name}:PATH needs a path")
    if name == "imagefolder":
        return {"train": lambda: imagefolder_source(arg, args.image_size, args.class_map)}
    size = args.image_size if args.resize else None
    return {"train": lambda: parquet_source(arg, args.image_column, args.caption_column or None, args.label_column,
                                            size)}


def parse_source(text: str) -> tuple[str, str | None]:
    """'fashion-mnist' -> ('fashion-mnist', None); 'imagefolder:/data/x' -> ('imagefolder', '/data/x')."""
    name, _, arg = text.partition(":")
    if name not in SOURCE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown source {name!r}; available: {', '.join(sorted(SOURCE_NAMES))}")
    return name, arg or None


@command
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m pipelines.prepare_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=parse_source, help=f"one of: {', '.join(SOURCE_NAMES)}")
    p.add_argument("--out", required=True, type=Path, help="output directory (gets train/ and test/)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--limit", type=int, default=None, help="first N samples of each split (smoke tests)")
    p.add_argument("--ray", action="store_true", help="one Ray task per shard (parallel conversion)")
    p.add_argument("--image-size", type=int, default=64, help="imagefolder/parquet: box-resize to this size")
    p.add_argument("--class-map", default=None, help="imagefolder: JSON {synset: index} or 'synset [index]' lines")
    p.add_argument("--image-column", default="image", help="parquet: column of encoded image bytes")
    p.add_argument("--caption-column", default="caption", help="parquet: caption column ('' = none)")
    p.add_argument("--label-column", default=None, help="parquet: class index column (optional)")
    p.add_argument("--captions", choices=("class", "varied"), default="class",
                   help="fashion-mnist: 'a photo of a CLASS' or varied templates + measured attributes (text-to-image)")
    p.add_argument("--resize", action="store_true", help="parquet: box-resize to --image-size (default: keep)")
    args = p.parse_args(argv)
    name, arg = args.source
    try:
        factories = splits(name, arg, args)
        if args.ray:
            from fewstep.cluster import connect_ray

            connect_ray()
        start = time.perf_counter()
        for split, make in factories.items():
            t0 = time.perf_counter()
            out = args.out / split
            m = convert(make(), out, split, args.samples_per_shard, limit=args.limit, ray=args.ray,
                        meta={"split": split})
            print(f"{split:>6}: {m['num_shards']} shards, {m['num_samples']} samples -> {out} "
                  f"({time.perf_counter() - t0:.1f} s)")
        print(f"done in {time.perf_counter() - start:.1f} s")
    except (FileNotFoundError, ValueError) as e:  # a missing source, a bad sample: the message names it
        raise UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
