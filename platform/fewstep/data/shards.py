"""WebDataset shards on local disk: write them atomically, find them, and read them back safely.

A shard is a plain tar whose members are `KEY.png`, `KEY.cls` (ascii int) and `KEY.txt` (utf-8), keys
sorted and each sample's members contiguous: Ray's reader groups members by key on the fly and would
split non-contiguous samples (ray issue 44068). Members are decoded by `decode_sample`, which never
unpickles: a `.pkl`/`.pth` member in a shard is code, not data.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Member suffixes whose decoding would execute code (pickle, torch.load): always refused.
UNSAFE_EXTS = ("pkl", "pickle", "pth", "pt")
MANIFEST = "manifest.json"
# The same split rule as Ray's and webdataset's readers: key = path up to the first dot of the basename.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(ValueError):
    """A shard or sample that fewstep refuses to read; the message names the shard and the key."""


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


def _write_atomic(path: Path, write) -> str:
    """Run write(file) into a hidden temp file beside `path`, then rename: a killed run leaves no half
    shard under the final name (and the temp name does not end in .tar, so no reader picks it up)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def _write_shard(path: Path, samples: list[dict]) -> str:
    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for s in sorted(samples, key=lambda s: s["key"]):
                key = s["key"]
                # Members in name order (cls < png < txt), all of one sample together.
                if s.get("cls") is not None:
                    _add_member(tar, f"{key}.cls", str(int(s["cls"])).encode("ascii"))
                _add_member(tar, f"{key}.png", _encode_png(np.asarray(s["image"]), key))
                if s.get("txt") is not None:
                    _add_member(tar, f"{key}.txt", str(s["txt"]).encode("utf-8"))

    return _write_atomic(path, write)


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 10000,
    *,
    meta: dict[str, Any] | None = None,
) -> list[Path]:
    """Write samples {key, image (uint8 HxW|HxWxC), cls, txt} as `{prefix}-000000.tar`, ... plus
    `manifest.json` (per-shard counts and sha256, totals, classes, image sizes; `meta` merged in).
    Keys must be unique and dot-free (the reader splits member names at the first dot). Shards left by an
    earlier run under the same prefix are removed once the new set is complete."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    entries: list[dict] = []
    seen: set[str] = set()
    classes: Counter[int] = Counter()
    shapes: Counter[tuple[int, ...]] = Counter()
    buffer: list[dict] = []

    def flush() -> None:
        path = out / f"{prefix}-{len(written):06d}.tar"
        digest = _write_shard(path, buffer)
        written.append(path)
        entries.append({"name": path.name, "samples": len(buffer), "sha256": digest})
        buffer.clear()

    for s in samples:
        key = str(s["key"])
        if not key or "." in key or "/" in key or key.startswith("__"):
            raise ShardError(f"sample key {key!r}: keys must be non-empty, without '.' or '/', not '__*'")
        if key in seen:
            raise ShardError(f"sample key {key!r} appears twice")
        seen.add(key)
        shape = np.shape(s["image"])
        shapes[tuple(shape) if len(shape) == 3 else (*shape, 1)] += 1
        if s.get("cls") is not None:
            classes[int(s["cls"])] += 1
        buffer.append(s)
        if len(buffer) == samples_per_shard:
            flush()
    if buffer:
        flush()
    for stale in set(out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) - set(written):
        stale.unlink()
    manifest = {
        **(meta or {}),
        "format": "webdataset",
        "members": ["cls", "png", "txt"],
        "num_shards": len(written),
        "num_samples": len(seen),
        "classes": {str(c): n for c, n in sorted(classes.items())},
        "image_sizes": [{"shape_hwc": list(k), "samples": n} for k, n in shapes.most_common()],
        "shards": entries,
    }
    _write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))
    return written


# ---------------------------------------------------------------------------------------------- find


def resolve_shards(spec: str) -> list[str]:
    """Absolute paths of the .tar shards named by `spec`: a directory (its *.tar, sorted), a glob, a brace
    pattern (`dir/train-{000000..000005}.tar`, every expanded file must exist), or one file. Absolute,
    because Ray tasks do not run in the driver's working directory."""
    paths: list[str] = []
    for part in braceexpand(os.path.expanduser(spec)):
        if glob.has_magic(part):
            paths += sorted(p for p in glob.glob(part) if p.endswith(".tar") and os.path.isfile(p))
        elif os.path.isdir(part):
            paths += sorted(str(p) for p in Path(part).glob("*.tar") if p.is_file())
        elif os.path.isfile(part) and part.endswith(".tar"):
            paths.append(part)
        elif part != spec:
            raise FileNotFoundError(f"shard spec {spec!r}: {part!r} is not a .tar file")
    if not paths:
        raise FileNotFoundError(f"shard spec {spec!r} matches no .tar shard (expected a directory of .tar "
                                "files, a glob, or a brace pattern such as dir/train-{000000..000005}.tar)")
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


# ---------------------------------------------------------------------------------------------- read


def _decode_image(data: bytes, shard: str, key: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types; the caller needs shard and key, not the type.
        raise ShardError(f"{shard}: sample {key!r}: undecodable image ({type(e).__name__}: {e})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def decode_sample(members: dict[str, bytes], shard: str, key: str, require_cls: bool = True) -> dict:
    """Raw member bytes by suffix ({"png": b"..", "cls": b"3"}) -> {key, image (uint8 HxWxC), cls (int or
    None), txt, json}. Only images, .cls, .txt and .json are decoded; unknown suffixes are dropped;
    pickle and torch members raise, so reading a shard never runs code from it."""
    out: dict[str, Any] = {"key": key, "image": None, "cls": None, "txt": None, "json": None}
    for suffix, data in members.items():
        ext = suffix.lower()
        if ext.rsplit(".", 1)[-1] in UNSAFE_EXTS:
            raise ShardError(f"{shard}: sample {key!r} has a {key}.{suffix} member: pickle/torch members "
                             "are refused (unpickling runs arbitrary code); store arrays as images or .json")
        if ext in IMAGE_EXTS:
            if out["image"] is not None:
                raise ShardError(f"{shard}: sample {key!r} has more than one image member")
            out["image"] = _decode_image(data, shard, key)
        elif ext in ("cls", "txt", "json"):
            try:
                text = data.decode("utf-8")
                out[ext] = int(text.strip()) if ext == "cls" else json.loads(text) if ext == "json" else text
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
                raise ShardError(f"{shard}: sample {key!r}: bad .{ext} member ({e})") from e
    if out["image"] is None:
        raise ShardError(f"{shard}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)})")
    if require_cls and out["cls"] is None:
        raise ShardError(f"{shard}: sample {key!r} has no .cls member (class label)")
    return out


def _iter_members(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, streaming; refuses non-contiguous samples instead of splitting."""
    done: set[str] = set()
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            m = _MEMBER.match(info.name) if info.isreg() else None
            if m is None:
                continue
            if m.group(1) != key:
                if key is not None:
                    yield key, members
                    done.add(key)
                key, members = m.group(1), {}
                if key in done:
                    raise ShardError(f"{path}: members of sample {key!r} are not contiguous in the tar")
            if m.group(2) in members:
                raise ShardError(f"{path}: sample {key!r} has two {m.group(2)!r} members")
            members[m.group(2)] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def iter_samples(paths: str | Path | Iterable[str | Path], require_cls: bool = True) -> Iterator[dict]:
    """Single-process read of shards -> {key, image (uint8 HxWxC), cls, txt, json}, in file order.
    For FID reference statistics and tests; training reads through Ray Data (reader.py). A str is a
    shard spec (see resolve_shards)."""
    if isinstance(paths, str):
        paths = resolve_shards(paths)
    elif isinstance(paths, Path):
        paths = [paths]
    for path in paths:
        for key, members in _iter_members(str(path)):
            yield decode_sample(members, str(path), key, require_cls=require_cls)
