"""Raw datasets -> sample dicts {key, image (uint8 HxW), cls, txt} for write_shards.

Sources read local files only (the training boxes have no internet); each yields samples lazily in a fixed
order so that shards, and their checksums, are reproducible.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# idx magic numbers (LeCun's MNIST format): uint8 data, 3 dims for images, 1 dim for labels.
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


def caption(class_name: str) -> str:
    """The text-conditioning caption of a class; one template so that all sources agree."""
    return f"a photo of a {class_name}"


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


def fashion_mnist(split: Literal["train", "test"], root: str | Path = FASHION_MNIST_ROOT) -> Iterator[dict]:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes, MIT) from its idx.gz files."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = "train" if split == "train" else "t10k"
    root = Path(root)
    images = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", _IDX_IMAGES)
    labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", _IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield {
            "key": f"fmnist-{split}-{i:06d}",
            "image": image,
            "cls": int(label),
            "txt": caption(FASHION_MNIST_CLASSES[label]),
        }
