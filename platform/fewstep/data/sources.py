"""Raw datasets -> sample dicts {key, image (uint8 HxW | HxWxC), cls, txt} for the shard writers.

Sources read local files only (the training boxes have no internet): Fashion-MNIST idx files, scikit-learn's
8x8 digits, an ImageNet-style image folder, parquet files of captioned images. Each lists its samples in a
fixed order so that shards, and their checksums, are reproducible.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fewstep.data.samples import box_resize

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# idx magic numbers (LeCun's MNIST format): uint8 data, 3 dims for images, 1 dim for labels.
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


def caption(class_name: str) -> str:
    """The text-conditioning caption of a class; one template so that all sources agree."""
    return f"a photo of a {class_name}"


# Varied text-to-image captions for Fashion-MNIST: a template and attributes measured on the image itself (tone
# from the mean of the garment's pixels, size from its area), chosen per sample key by a hash, so that shards stay
# reproducible. Thresholds: the train split's terciles of each measure.
CAPTION_TEMPLATES = (
    "a photo of a {tone} {cls}",
    "a {size} {tone} {cls}",
    "a grayscale picture of a {cls}",
    "a product photo of a {size} {cls}",
    "{cls}, {tone}",
)


def varied_caption(class_name: str, image: np.ndarray, key: str) -> str:
    """One of CAPTION_TEMPLATES for this sample (by crc32 of its key) filled with the class and attributes of
    the image: tone dark/gray/light (mean of its non-zero pixels), size small/medium/large (their area)."""
    import zlib

    fg = image[image > 0]
    mean, area = (float(fg.mean()) if fg.size else 0.0), fg.size / image.size
    tone = "dark" if mean < 128 else "gray" if mean < 171 else "light"
    size = "small" if area < 0.41 else "medium" if area < 0.59 else "large"
    template = CAPTION_TEMPLATES[zlib.crc32(key.encode()) % len(CAPTION_TEMPLATES)]
    return template.format(cls=class_name, tone=tone, size=size)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: Fashion-MNIST is not installed. Install it with "
            "`apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist)."
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    header = np.frombuffer(raw, ">u4", count=1 + dims)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: not an idx file of the expected kind (magic {header[0]}, want {magic})")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, np.uint8, offset=4 * (1 + dims))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({data.size} bytes of data for shape {shape})")
    return data.reshape(shape)


def fashion_mnist(split: Literal["train", "test"], root: str | Path = FASHION_MNIST_ROOT,
                  captions: Literal["class", "varied"] = "class") -> Iterator[dict]:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes, MIT) from its idx.gz files. Captions:
    "class" = `caption(class)`, "varied" = `varied_caption` (templates and measured attributes; text-to-image)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = "train" if split == "train" else "t10k"
    root = Path(root)
    images = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", _IDX_IMAGES)
    labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", _IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        key, name = f"fmnist-{split}-{i:06d}", FASHION_MNIST_CLASSES[label]
        text = varied_caption(name, image, key) if captions == "varied" else caption(name)
        yield {"key": key, "image": image, "cls": int(label), "txt": text}


# ------------------------------------------------------------------------- sources for parallel conversion
# A `Source` is a list of cheap, picklable item references in output order plus a top-level `load(items)`
# that turns a chunk of them into samples; convert.py writes one shard per chunk, in Ray tasks if asked.


@dataclass(frozen=True)
class Source:
    name: str
    items: list
    load: Callable[[list], Iterator[dict]]
    meta: dict = field(default_factory=dict)


def _fashion_load(items: list[int], split: str, root: str, captions: str = "class") -> Iterator[dict]:
    samples = list(fashion_mnist(split, root, captions))  # ~50 ms per task: the idx files are small
    return (samples[i] for i in items)


def fashion_mnist_source(split: Literal["train", "test"], root: str | Path = FASHION_MNIST_ROOT,
                         captions: Literal["class", "varied"] = "class") -> Source:
    n = 60000 if split == "train" else 10000
    return Source(f"fashion-mnist-{split}", list(range(n)),
                  partial(_fashion_load, split=split, root=str(root), captions=captions),
                  {"class_names": list(FASHION_MNIST_CLASSES), "captions": captions})


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _digits_load(items: list[int], split: str) -> Iterator[dict]:
    from sklearn.datasets import load_digits  # ships its data: no download

    d = load_digits()
    for i in items:
        # 8x8 values 0..16 -> uint8 0..255
        image = np.round(d.images[i] * (255.0 / 16.0)).astype(np.uint8)
        yield {"key": f"digits-{split}-{i:04d}", "image": image, "cls": int(d.target[i]),
               "txt": caption(f"handwritten {DIGIT_NAMES[d.target[i]]}")}


def digits_source(split: Literal["train", "test"]) -> Source:
    """scikit-learn's 8x8 digits (1797 images, 10 classes; BSD): every 5th image is the test split."""
    items = [i for i in range(1797) if (i % 5 == 0) == (split == "test")]
    return Source(f"digits-{split}", items, partial(_digits_load, split=split), {"class_names": list(DIGIT_NAMES)})


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp")


def read_class_map(path: str | Path) -> dict[str, int]:
    """A class mapping file: JSON {"n01440764": 0, ...}, or text with one `synset [index]` per line (without an
    index, the line number is the class index)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return {str(k): int(v) for k, v in json.loads(text).items()}
    out = {}
    for n, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        parts = line.split()
        out[parts[0]] = int(parts[1]) if len(parts) > 1 else n
    return out


def _imagefolder_load(items: list[tuple[str, str, int]], root: str, size: int) -> Iterator[dict]:
    for synset, name, cls in items:
        path = Path(root) / synset / name
        try:
            with Image.open(path) as im:
                image = box_resize(im.convert("RGB"), size)  # CMYK / grayscale JPEGs -> RGB first
                array = np.asarray(image, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{synset}_{Path(name).stem}")
        yield {"key": key, "image": array, "cls": cls, "txt": caption(synset)}


def imagefolder_source(root: str | Path, size: int = 64, class_map: str | Path | None = None) -> Source:
    """The ImageNet train layout: ROOT/SYNSET/*.JPEG. Class index = position of the synset in the sorted list
    of folders, or from `class_map`; every image is box-resized to size x size RGB (downsampled ImageNet)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder {root}: not a directory")
    synsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    mapping = read_class_map(class_map) if class_map else {s: i for i, s in enumerate(synsets)}
    missing = [s for s in synsets if s not in mapping]
    if missing:
        raise ValueError(f"imagefolder {root}: folders {missing[:5]} are not in the class map {class_map}")
    items = [(s, p.name, mapping[s]) for s in synsets for p in sorted((root / s).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise FileNotFoundError(f"imagefolder {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
    return Source(f"imagefolder:{root}", items, partial(_imagefolder_load, root=str(root), size=size),
                  {"synsets": {s: mapping[s] for s in synsets}})


def _parquet_load(items: list[tuple[str, int]], image_column: str, caption_column: str | None,
                  label_column: str | None, size: int | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    columns = [c for c in (image_column, caption_column, label_column) if c]
    for path, rows in itertools.groupby(items, key=lambda it: it[0]):
        rows = [r for _, r in rows]
        pf = pq.ParquetFile(path)
        # Read only the row groups that hold these rows; `first[g]` = file row index of group g's first row.
        first = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        group = {r: int(np.searchsorted(first, r, side="right") - 1) for r in rows}
        groups = sorted(set(group.values()))
        before = dict(zip(groups, np.cumsum([0] + [int(first[g + 1] - first[g]) for g in groups]), strict=False))
        table = pf.read_row_groups(groups, columns=columns)
        local = [int(before[group[r]] + r - first[group[r]]) for r in rows]
        for r, row in zip(rows, table.take(local).to_pylist(), strict=True):
            data = row[image_column]
            data = data.get("bytes") if isinstance(data, dict) else data  # HF-style {"bytes", "path"} structs
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im = im.convert("RGB")
                    array = np.asarray(box_resize(im, size) if size else im, dtype=np.uint8)
            except Exception as e:
                raise ValueError(f"{path}: row {r}: column {image_column!r} is not an image ({e})") from e
            yield {"key": f"{Path(path).stem.replace('.', '_')}-{r:09d}", "image": array,
                   "cls": int(row[label_column]) if label_column else None,
                   "txt": str(row[caption_column]) if caption_column and row[caption_column] is not None else None}


def parquet_source(pattern: str, image_column: str = "image", caption_column: str | None = "caption",
                   label_column: str | None = None, size: int | None = None) -> Source:
    """LAION-style captioned images in parquet files (a path or glob): an image-bytes column and a caption
    column (names configurable), read with pyarrow; optionally box-resized to size x size RGB."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"parquet source {pattern!r}: no such file")
    items = []
    for f in files:
        schema = pq.read_schema(f)
        for c in (image_column, caption_column, label_column):
            if c and c not in schema.names:
                raise ValueError(f"{f}: no column {c!r} (columns: {', '.join(schema.names)})")
        items += [(f, r) for r in range(pq.ParquetFile(f).metadata.num_rows)]
    return Source(f"parquet:{pattern}", items, partial(_parquet_load, image_column=image_column,
                  caption_column=caption_column, label_column=label_column, size=size))
