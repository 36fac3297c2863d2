"""Source -> WebDataset shards + manifest, one shard per chunk of `samples_per_shard` items: sequentially in
this process, or as Ray tasks across the cluster (`ray=True`) for large sources (ImageNet: 1.28M images,
~128 shards of 10k), with a progress bar over finished shards either way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fewstep.data.shards import write_manifest, write_shard
from fewstep.data.sources import Source


def _write_chunk(load: Callable, items: list, path: str) -> dict:
    return write_shard(path, list(load(items)))


def convert(source: Source, out_dir: str | Path, prefix: str, samples_per_shard: int = 10000, *,
            limit: int | None = None, ray: bool = False, meta: dict[str, Any] | None = None,
            progress: bool = True) -> dict:
    """Write `{prefix}-000000.tar`, ... and manifest.json under out_dir; returns the manifest. With ray=True
    each shard is one Ray task (Ray must be initialised: joins the running cluster)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = source.items[:limit] if limit is not None else source.items
    chunks = [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    paths = [str(out / f"{prefix}-{k:06d}.tar") for k in range(len(chunks))]
    bar = tqdm(total=len(chunks), unit="shard", desc=f"{source.name} -> {out}", disable=not progress)
    entries: list[dict | None] = [None] * len(chunks)
    if ray:
        import ray as ray_

        task = ray_.remote(_write_chunk)
        load = ray_.put(source.load)
        pending = {task.remote(load, c, p): k for k, (c, p) in enumerate(zip(chunks, paths, strict=True))}
        while pending:
            done, _ = ray_.wait(list(pending), num_returns=1)
            entries[pending.pop(done[0])] = ray_.get(done[0])  # raises the task's error (file named)
            bar.update()
    else:
        for k, (c, p) in enumerate(zip(chunks, paths, strict=True)):
            entries[k] = _write_chunk(source.load, c, p)
            bar.update()
    bar.close()
    return write_manifest(out, prefix, entries, {"source": source.name, **source.meta, **(meta or {})})
