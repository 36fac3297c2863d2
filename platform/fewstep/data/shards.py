"""WebDataset shards: write them atomically with a manifest, and read them back (local or object storage).

A shard is a plain tar whose members are `KEY.png`, `KEY.cls` (ascii int) and `KEY.txt` (utf-8), keys
sorted and each sample's members contiguous: Ray's and webdataset's readers group members by key on the
fly and would split non-contiguous samples (ray issue 44068). Reading goes through `samples.read_tar`,
which never unpickles: a `.pkl`/`.pth` member in a shard is code, not data.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewstep.data.samples import SampleSpec, ShardError, Tally, decode_sample, read_tar
from fewstep.data.storage import open_input, resolve_shards

__all__ = [
    "ShardError", "decode_sample", "iter_samples", "resolve_shards", "write_atomic", "write_shards", "write_shard",
]
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- write


def _encode_png(image: np.ndarray, key: str) -> bytes:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]  # PIL wants grayscale as HxW
    if image.dtype != np.uint8 or image.ndim != 2 and not (image.ndim == 3 and image.shape[2] in (3, 4)):
        raise ShardError(f"sample {key!r}: image must be uint8 HxW or HxWxC (C in 1, 3, 4), got "
                         f"{image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so that the same samples always give byte-identical shards (stable sha256).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_atomic(path: Path, write) -> str:
    """Run write(file) into a hidden temp file beside `path`, then rename; returns the sha256 of what was written.
    A killed run leaves no half file under the final name (the temp name does not end in .tar, so no reader picks
    it up), and concurrent writers of one path (two sweep trials caching one FID reference) each have their own
    temp file: the last rename wins."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _check_key(key: str) -> str:
    if not key or "." in key or "/" in key or key.startswith("__"):
        raise ShardError(f"sample key {key!r}: keys must be non-empty, without '.' or '/', not '__*'")
    return key


def write_shard(path: str | Path, samples: list[dict]) -> dict:
    """One shard from samples {key, image (uint8 HxW|HxWxC), cls, txt}, keys sorted; returns its manifest
    entry {name, samples, sha256, classes, shapes}. Runs in Ray tasks for parallel conversion."""
    path, samples = Path(path), sorted(samples, key=lambda s: s["key"])
    keys = [_check_key(str(s["key"])) for s in samples]
    dup = next((a for a, b in zip(keys, keys[1:], strict=False) if a == b), None)
    if dup is not None:
        raise ShardError(f"sample key {dup!r} appears twice")

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for s in samples:
                key = s["key"]
                # Members in name order (cls < png < txt), all of one sample together.
                if s.get("cls") is not None:
                    _add_member(tar, f"{key}.cls", str(int(s["cls"])).encode("ascii"))
                _add_member(tar, f"{key}.png", _encode_png(np.asarray(s["image"]), key))
                if s.get("txt") is not None:
                    _add_member(tar, f"{key}.txt", str(s["txt"]).encode("utf-8"))

    digest = write_atomic(path, write)
    shapes = Counter("x".join(map(str, np.shape(s["image"]) + (() if np.ndim(s["image"]) == 3 else (1,))))
                     for s in samples)
    classes = Counter(str(int(s["cls"])) for s in samples if s.get("cls") is not None)
    return {"name": path.name, "samples": len(samples), "sha256": digest, "classes": dict(classes),
            "shapes": dict(shapes)}


def write_manifest(out_dir: str | Path, prefix: str, entries: list[dict], meta: dict[str, Any] | None = None) -> dict:
    """`manifest.json` over shard entries (totals, classes, image sizes, per-shard counts and sha256); removes
    shards left under the same prefix by an earlier, larger run."""
    out = Path(out_dir)
    names = {e["name"] for e in entries}
    for stale in out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in names:
            stale.unlink()
    classes: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    for e in entries:
        classes.update(e["classes"])
        shapes.update(e["shapes"])
    manifest = {
        **(meta or {}),
        "format": "webdataset",
        "members": ["cls", "png", "txt"],
        "num_shards": len(entries),
        "num_samples": sum(e["samples"] for e in entries),
        "classes": {c: classes[c] for c in sorted(classes, key=int)},
        "image_sizes": [{"shape_hwc": [int(d) for d in k.split("x")], "samples": n} for k, n in shapes.most_common()],
        "shards": [{k: e[k] for k in ("name", "samples", "sha256")} for e in entries],
    }
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))
    return manifest


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 10000,
    *,
    meta: dict[str, Any] | None = None,
) -> list[Path]:
    """Write samples {key, image (uint8 HxW|HxWxC), cls, txt} as `{prefix}-000000.tar`, ... plus
    `manifest.json` (per-shard counts and sha256, totals, classes, image sizes; `meta` merged in), in one
    process. Keys must be unique and dot-free (the reader splits member names at the first dot). For large
    sources, `convert.convert_parallel` writes the same shards with Ray tasks."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    seen: set[str] = set()
    buffer: list[dict] = []
    for s in samples:
        key = _check_key(str(s["key"]))
        if key in seen:
            raise ShardError(f"sample key {key!r} appears twice")
        seen.add(key)
        buffer.append(s)
        if len(buffer) == samples_per_shard:
            entries.append(write_shard(out / f"{prefix}-{len(entries):06d}.tar", buffer))
            buffer = []
    if buffer:
        entries.append(write_shard(out / f"{prefix}-{len(entries):06d}.tar", buffer))
    write_manifest(out, prefix, entries, meta)
    return [out / e["name"] for e in entries]


def iter_samples(
    paths: str | Path | Iterable[str | Path], require_cls: bool = True, spec: SampleSpec | None = None
) -> Iterator[dict]:
    """Single-process read of shards -> {key, image (uint8 HxWxC), cls, txt, json}, in file order; any bad
    sample raises (policy "fail"). For FID reference statistics, benchmarks and tests; training reads
    through Ray Data (reader.py). A str is a shard spec (see storage.resolve_shards), local or remote."""
    if isinstance(paths, str):
        paths = resolve_shards(paths)
    elif isinstance(paths, Path):
        paths = [paths]
    spec = spec or SampleSpec(require_label=require_cls)
    for path in paths:
        with open_input(str(path)) as f:
            yield from read_tar(f, str(path), spec, "fail", Tally())
