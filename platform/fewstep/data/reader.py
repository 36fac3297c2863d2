"""WebDataset shards -> a Ray Dataset of training-ready tensors.

Column contract of `build_dataset` (exactly these two columns, one row per sample):
  image: float32 (C, H, W) = (cfg.channels, cfg.image_size, cfg.image_size), pixels scaled to [-1, 1],
         centre-padded with -1 (black), never cropped or resized.
  label: int64 class index in [0, cfg.num_classes); all 0 when cfg.num_classes == 0 (labels ignored).
The local shuffle buffer (cfg.shuffle_buffer) is applied by the consumer in `iter_torch_batches`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import ray
from ray.data import FileShuffleConfig

from fewstep.data.config import DataConfig
from fewstep.data.shards import decode_sample, resolve_shards

_MISSING_CLS = -1


def safe_decoder(sample: dict[str, Any], require_cls: bool = True) -> dict[str, Any]:
    """Ray's `read_webdataset` decoder. Ray's default one unpickles `.pkl` and torch.loads `.pth`
    members; this one goes through `decode_sample`, which refuses them naming shard and key."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    shard, key = str(sample.get("__url__")), str(sample["__key__"])
    s = decode_sample(members, shard, key, require_cls=require_cls)
    cls = _MISSING_CLS if s["cls"] is None else s["cls"]
    return {"key": key, "shard": shard, "image": s["image"], "cls": cls}


def to_training_batch(
    batch: dict[str, np.ndarray], image_size: int, channels: int, num_classes: int
) -> dict[str, np.ndarray]:
    """Decoded rows -> {"image": (N, C, S, S) float32 in [-1, 1], "label": (N,) int64}. Runs in
    `map_batches`, so padding and scaling happen in Ray tasks, in parallel, not in a worker's collate."""
    def where(i: int) -> str:
        return f"{batch['shard'][i]}: sample {str(batch['key'][i])!r}"

    images = list(batch["image"])  # a (N, H, W, C) tensor column, or ragged when sizes differ
    out = np.full((len(images), channels, image_size, image_size), -1.0, dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(np.shape(im)), []).append(i)
    for (h, w, c), idx in by_shape.items():
        if c != channels:
            raise ValueError(f"{where(idx[0])} has {c} channels, data.channels is {channels}")
        if h > image_size or w > image_size:
            raise ValueError(f"{where(idx[0])} is {h}x{w}, larger than data.image_size={image_size} "
                             "(images are padded, never cropped)")
        top, left = (image_size - h) // 2, (image_size - w) // 2
        x = np.stack([images[i] for i in idx]).astype(np.float32)  # (n, h, w, C)
        out[np.asarray(idx), :, top : top + h, left : left + w] = x.transpose(0, 3, 1, 2) / 127.5 - 1.0
    labels = np.asarray(batch["cls"], dtype=np.int64)
    if num_classes == 0:
        labels = np.zeros_like(labels)
    else:
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{where(i)} has class {int(labels[i])}, outside [0, {num_classes}) "
                             f"(data.num_classes={num_classes})")
    return {"image": out, "label": labels}


def build_dataset(cfg: DataConfig, split: str = "train") -> ray.data.Dataset:
    """A lazy Ray Dataset of `cfg.shards` (split="train", shard order reshuffled each epoch from
    cfg.shuffle_seed) or `cfg.test_shards` (split="test", file order). Columns: see module docstring."""
    if split == "train":
        spec = cfg.shards
    elif split == "test":
        if cfg.test_shards is None:
            raise ValueError("split='test' needs data.test_shards")
        spec = cfg.test_shards
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = resolve_shards(spec)
    ds = ray.data.read_webdataset(
        paths,
        decoder=partial(safe_decoder, require_cls=cfg.num_classes > 0),
        # `fileselect` filters tar *members*, not shard files: keep every member so that the decoder sees
        # (and refuses) pickles instead of them being dropped silently. Shard files are chosen here:
        file_extensions=["tar"],
        # Each execution (epoch) gets a new shard order derived from the seed (reseed_after_execution).
        shuffle=FileShuffleConfig(seed=cfg.shuffle_seed) if split == "train" else None,
    )
    return ds.map_batches(
        to_training_batch,
        batch_format="numpy",
        fn_kwargs={"image_size": cfg.image_size, "channels": cfg.channels, "num_classes": cfg.num_classes},
    )
