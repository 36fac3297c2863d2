"""WebDataset shards -> Ray Datasets of training-ready tensors.

`ShardSource` is a Ray Data datasource with one read task per shard. The task streams the tar from local
disk or object storage (storage.py), decodes and checks every sample under the bad-data policy
(samples.py), centre-pads images to (C, S, S) uint8 (pad value 0 = -1 after scaling), and ends the shard
with one *report row* (valid=False) carrying the shard's position and its tally of read and skipped
samples. The report rides with the data, so the consumer learns how many samples each shard had (for
shard-level resume, stream.py) and what was skipped (MLflow, max_skip_fraction) without any side channel.

Columns after `to_training_batch` (one row per sample, plus one report row per shard):
  image: float32 (C, S, S) in [-1, 1], centre-padded with -1, flipped per data.hflip
  label: int64 class index in [0, num_classes); 0 when num_classes == 0
  caption: str, the sample's caption member (.txt; "" when it has none), for text-to-image models
  pos:   int32 position of the row's shard in the read order;  report: str, "" for samples
`build_dataset` drops report rows and returns exactly image and label.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fewstep.data.config import DataConfig
from fewstep.data.samples import SampleSpec, Tally, read_tar
from fewstep.data.storage import is_remote, open_input, read_text, resolve_shards

ROWS_PER_BLOCK = 256
TARGET_BLOCK_BYTES = 1 << 20  # emitted blocks of ~1 MiB: ~1000 Fashion-MNIST or ~80 ImageNet-64 rows


def _pad(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) uint8 -> (C, size, size) uint8, centred (odd margins: the extra row/col after)."""
    h, w, c = image.shape
    out = np.zeros((c, size, size), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = image.transpose(2, 0, 1)
    return out


def _columns(rows: list[tuple[np.ndarray, int, int, str, str]], pos: int) -> dict[str, np.ndarray]:
    return {
        "image": np.stack([r[0] for r in rows]),
        "label": np.array([r[1] for r in rows], np.int64),
        "keyhash": np.array([r[2] for r in rows], np.uint32),
        "pos": np.full(len(rows), pos, np.int32),
        "report": np.array([r[3] for r in rows], dtype=object),
        "caption": np.array([r[4] for r in rows], dtype=object),
    }


def read_shard(uri: str, pos: int, spec: SampleSpec, on_error: Literal["fail", "skip"],
               expected: int | None) -> Iterator[Any]:
    """Blocks of one shard (runs inside a Ray read task); the last block ends with the report row."""
    for columns in read_shard_columns(uri, pos, spec, on_error, expected):
        yield BlockAccessor.batch_to_block(columns)


def read_shard_columns(uri: str, pos: int, spec: SampleSpec, on_error: Literal["fail", "skip"],
                       expected: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of one shard (numpy), the last ending with the report row: what read_shard's blocks hold."""
    size, channels = spec.image_size, spec.channels
    tally, rows = Tally(), []
    with open_input(uri) as f:
        for s in read_tar(f, uri, spec, on_error, tally, expected):
            cls = s["cls"] if spec.num_classes and s["cls"] is not None else 0
            rows.append((_pad(s["image"], size), cls, zlib.crc32(s["key"].encode()), "", s["txt"] or ""))
            if len(rows) == ROWS_PER_BLOCK:
                yield _columns(rows, pos)
                rows = []
    report = json.dumps({"pos": pos, "shard": uri, "tally": dict(tally)})
    rows.append((np.zeros((channels, size, size), np.uint8), 0, 0, report, ""))
    yield _columns(rows, pos)


class ShardSource(Datasource):
    """Ray Data datasource: `shards[i]` is read by read task i, its rows tagged pos=positions[i] (default i)."""

    def __init__(self, shards: list[str], spec: SampleSpec, on_error: Literal["fail", "skip"],
                 expected: dict[str, int] | None = None, positions: list[int] | None = None) -> None:
        self.shards, self.spec, self.on_error, self.expected = list(shards), spec, on_error, expected or {}
        self.positions = list(range(len(shards))) if positions is None else list(positions)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        def task(pos: int, uri: str) -> ReadTask:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[uri])
            expected = self.expected.get(uri)
            return ReadTask(lambda: read_shard(uri, pos, self.spec, self.on_error, expected), meta,
                            per_task_row_limit=per_task_row_limit)

        return [task(p, uri) for p, uri in zip(self.positions, self.shards, strict=True)]


def manifest_counts(shards: list[str]) -> dict[str, int]:
    """Sample counts per shard from `manifest.json` files beside the shards (fewstep-written sets), so that
    a tar cut at a member boundary is detected; shards without a manifest are not checked."""
    counts: dict[str, int] = {}
    for parent in dict.fromkeys(s.rsplit("/", 1)[0] for s in shards):
        text = read_text(f"{parent}/manifest.json")
        if text:
            for e in json.loads(text).get("shards", []):
                counts[f"{parent}/{e['name']}"] = int(e["samples"])
    return counts


def flip_mask(keyhash: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """(N,) bool: flip or not, a hash of (key, seed, epoch): reproducible, different every epoch."""
    mix = np.uint64((seed * 0x9E3779B1 + epoch * 0x85EBCA77 + 0x165667B1) % 2**32)
    h = (keyhash.astype(np.uint64) ^ mix) * np.uint64(0x27D4EB2F)  # wraps mod 2**64: a multiplicative hash
    return ((h >> np.uint64(31)) & np.uint64(1)).astype(bool)


def to_training_batch(batch: dict[str, np.ndarray], hflip: bool = False, seed: int = 0,
                      epoch: int = 0) -> dict[str, np.ndarray]:
    """uint8 (N, C, S, S) -> float32 in [-1, 1], flipped per data.hflip. Runs in Ray Data's map_batches,
    in parallel tasks, not in the training step."""
    image = batch["image"].astype(np.float32) / 127.5 - 1.0
    if hflip:
        flip = flip_mask(batch["keyhash"], seed, epoch)
        image[flip] = image[flip, :, :, ::-1]
    out = {"image": image, "label": batch["label"], "pos": batch["pos"], "report": batch["report"]}
    if "caption" in batch:
        out["caption"] = batch["caption"]
    return out


class IdlePollThrottle(ExecutionCallback):
    """Bounds the CPU of Ray Data's scheduling loop while a slow consumer (a training step) backpressures it.

    Ray 2.60's StreamingExecutor waits with `ray.wait(active tasks, timeout=0.1)`; a streaming read task whose
    next output is ready but held back by output backpressure is returned as ready at once, so the loop spins
    at 100% of a core for as long as training is slower than reading (always, on CPU). On a small box that
    core is taken from training (`python -m pipelines.bench train` measures it).
    A loop step that finds output already queued for the consumer is followed by a short sleep; while the
    consumer waits for data (empty output queue) the loop runs at full speed, so reading throughput is kept.
    """

    SLEEP_S = 0.02

    def on_execution_step(self, executor) -> None:
        idling = getattr(executor, "_consumer_idling", None)  # private in Ray 2.60: without it, never sleep
        if idling is not None and not idling():
            time.sleep(self.SLEEP_S)


def shard_dataset(cfg: DataConfig, shards: list[str], epoch: int = 0, expected: dict[str, int] | None = None,
                  positions: list[int] | None = None) -> ray.data.Dataset:
    """The shards, in this order, as one Ray Dataset with report rows (see module docstring)."""
    source = ShardSource(shards, SampleSpec.from_config(cfg), cfg.on_error, expected, positions)
    # One block stream per shard: Ray's default (>= 200 blocks) would split each shard's output into ~100
    # tiny blocks and run map_batches once per block.
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards), concurrency=cfg.read_tasks)
    ds.context.enable_progress_bars = False  # per-operator bars flood job logs; rank 0 logs data wait
    # Ray Data merges a read task's yielded blocks up to target_max_block_size (128 MiB) before emitting one: a
    # whole 10k-image shard would be decoded before its first row reaches training (~10 s to the first step).
    ds.context.target_max_block_size = TARGET_BLOCK_BYTES
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdlePollThrottle]
    return ds.map_batches(to_training_batch, batch_format="numpy",
                          fn_kwargs={"hflip": cfg.hflip, "seed": cfg.shuffle_seed, "epoch": epoch})


def build_dataset(cfg: DataConfig, split: str = "train") -> ray.data.Dataset:
    """A lazy Ray Dataset of `cfg.shards` (split="train") or `cfg.test_shards` (split="test") in file order,
    exactly the columns image and label. Training itself reads per rank and epoch (stream.py)."""
    if split == "train":
        spec = cfg.shards
    elif split == "test":
        if cfg.test_shards is None:
            raise ValueError("split='test' needs data.test_shards")
        spec = cfg.test_shards
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    shards = resolve_shards(spec)
    ds = shard_dataset(cfg, shards, expected=manifest_counts(shards))
    from ray.data.expressions import col

    return ds.filter(expr=col("report") == "").select_columns(["image", "label"])


__all__ = ["ShardSource", "build_dataset", "is_remote", "manifest_counts", "shard_dataset", "to_training_batch"]
