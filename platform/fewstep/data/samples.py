"""Reading WebDataset tars safely, one sample at a time, under a bad-data policy.

`read_tar` groups tar members by key itself (Ray's and webdataset's readers split samples whose members are
not contiguous, ray issue 44068) and `decode_sample` decodes and checks one sample. Every problem is a
`BadSample` with a reason from REASONS; policy "fail" raises it (the message names shard and key), policy
"skip" counts it in a `Tally` and goes on. `.pkl`/`.pth` members are refused, never unpickled.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Member suffixes whose decoding would execute code (pickle, torch.load): always refused.
UNSAFE_EXTS = ("pkl", "pickle", "pth", "pt")
# Why a sample was refused; the MLflow metric of each is `data_skipped_<reason>`.
REASONS = (
    "bad_tar",             # not a tar, or a corrupt header
    "truncated_tar",       # ends inside a member, or holds fewer samples than its manifest says
    "duplicate_key",       # the same member (KEY.EXT) twice in one shard
    "noncontiguous_key",   # a key's members split by another key (would silently split the sample)
    "unsafe_member",       # .pkl/.pth/...: refused, never unpickled
    "missing_image",
    "undecodable_image",
    "wrong_mode",          # channels differ from data.channels (and data.convert_mode is off)
    "wrong_size",          # larger than data.image_size (images are padded, never cropped)
    "missing_label",
    "bad_label",           # .cls not an integer
    "class_out_of_range",
    "missing_caption",
    "bad_member",          # undecodable .txt/.json, two image members
)
# The same split rule as Ray's and webdataset's readers: key = path up to the first dot of the basename.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(ValueError):
    """A shard or sample that fewstep refuses to read; the message names the shard and the key."""


class BadSample(ShardError):
    def __init__(self, reason: str, message: str, count: int = 1) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.count = reason, count


@dataclass(frozen=True)
class SampleSpec:
    """What a sample must look like. None disables a check (iter_samples for FID reads leniently)."""

    image_exts: tuple[str, ...] = IMAGE_EXTS
    label_ext: str = "cls"
    caption_ext: str = "txt"
    require_label: bool = True
    require_caption: bool = False
    channels: int | None = None
    image_size: int | None = None
    num_classes: int | None = None
    convert_mode: bool = False
    resize: Literal["none", "box"] = "none"

    @classmethod
    def from_config(cls, cfg: Any) -> SampleSpec:  # cfg: DataConfig (not imported: no cycle)
        return cls(
            image_exts=tuple(e.lower() for e in cfg.image_ext), label_ext=cfg.label_ext, caption_ext=cfg.caption_ext,
            require_label=cfg.num_classes > 0, require_caption=cfg.require_caption, channels=cfg.channels,
            image_size=cfg.image_size, num_classes=cfg.num_classes or None, convert_mode=cfg.convert_mode,
            resize=cfg.resize,
        )


class Tally(Counter):
    """Samples read ("ok") and refused (one count per reason) by one reader; adds up across readers."""

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.items() if k != "ok")

    def fraction(self) -> float:
        total = self["ok"] + self.skipped
        return self.skipped / total if total else 0.0


def box_resize(image: Image.Image, size: int) -> Image.Image:
    """Area-averaging resize of the whole image to size x size: the BOX filter that downsampled ImageNet
    (Chrabaszcz et al. 2017, "A Downsampled Variant of ImageNet") used; aspect ratio is not kept."""
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BOX)


def _decode_image(data: bytes, where: str, spec: SampleSpec) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            want = {1: "L", 3: "RGB"}.get(spec.channels or 0)
            if spec.convert_mode and want and im.mode != want:
                im = im.convert(want)  # e.g. ImageNet's few grayscale and CMYK JPEGs
            elif im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
            if spec.resize == "box" and spec.image_size:
                im = box_resize(im, spec.image_size)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types; the caller needs shard and key, not the type.
        raise BadSample("undecodable_image", f"{where}: undecodable image ({type(e).__name__}: {e})") from e
    arr = arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)
    h, w, c = arr.shape
    if spec.channels is not None and c != spec.channels:
        raise BadSample("wrong_mode", f"{where}: image has {c} channels, data.channels is {spec.channels} "
                        "(set data.convert_mode to convert)")
    if spec.image_size is not None and (h > spec.image_size or w > spec.image_size):
        raise BadSample("wrong_size", f"{where}: image is {h}x{w}, larger than data.image_size={spec.image_size} "
                        "(images are padded, never cropped; data.resize=box resizes)")
    return arr


def decode_sample(members: dict[str, bytes], shard: str, key: str, spec: SampleSpec = SampleSpec()) -> dict:
    """Raw member bytes by suffix ({"png": b"..", "cls": b"3"}) -> {key, image (uint8 HxWxC), cls (int or
    None), txt, json}. Only the configured image, label and caption suffixes and .json are decoded; other
    suffixes are dropped; pickle and torch members raise, so reading a shard never runs code from it."""
    where = f"{shard}: sample {key!r}"
    out: dict[str, Any] = {"key": key, "image": None, "cls": None, "txt": None, "json": None}
    images = [s for s in members if s.lower() in spec.image_exts]
    for suffix in members:
        if suffix.lower().rsplit(".", 1)[-1] in UNSAFE_EXTS:
            raise BadSample("unsafe_member", f"{where} has a {key}.{suffix} member: pickle/torch members are "
                            "refused (unpickling runs arbitrary code); store arrays as images or .json")
    if not images:
        raise BadSample("missing_image", f"{where} has no image member ({', '.join(spec.image_exts)})")
    if len(images) > 1:
        raise BadSample("bad_member", f"{where} has more than one image member ({', '.join(images)})")
    out["image"] = _decode_image(members[images[0]], where, spec)
    for field, ext in (("cls", spec.label_ext), ("txt", spec.caption_ext), ("json", "json")):
        if ext not in members:
            continue
        try:
            text = members[ext].decode("utf-8")
            out[field] = int(text.strip()) if field == "cls" else json.loads(text) if field == "json" else text
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            reason = "bad_label" if field == "cls" else "bad_member"
            raise BadSample(reason, f"{where}: bad .{ext} member ({e})") from e
    if spec.require_label and out["cls"] is None:
        raise BadSample("missing_label", f"{where} has no .{spec.label_ext} member (class label)")
    if spec.num_classes is not None and out["cls"] is not None and not 0 <= out["cls"] < spec.num_classes:
        raise BadSample("class_out_of_range", f"{where} has class {out['cls']}, outside [0, {spec.num_classes}) "
                        f"(data.num_classes={spec.num_classes})")
    if spec.require_caption and out["txt"] is None:
        raise BadSample("missing_caption", f"{where} has no .{spec.caption_ext} member (caption)")
    return out


def _group_members(stream: BinaryIO, shard: str) -> Iterator[tuple[str, dict[str, bytes]] | BadSample]:
    """(key, {suffix: bytes}) per sample in tar order, or a BadSample for a fragment that must not be used."""
    seen: set[str] = set()
    key, members, dropped = None, {}, False  # dropped: the current run of `key` is refused, skip its members
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as e:
        yield BadSample("bad_tar", f"{shard}: not a readable tar ({type(e).__name__}: {e})")
        return
    try:
        for info in tar:
            m = _MEMBER.match(info.name) if info.isreg() else None
            if m is None:
                continue
            if m.group(1) != key:
                if key is not None:
                    if not dropped:
                        yield key, members
                    seen.add(key)
                key, members, dropped = m.group(1), {}, False
                if key in seen:
                    # A later run of an earlier key: drop it (the first run was already used).
                    dropped = True
                    yield BadSample("noncontiguous_key", f"{shard}: members of sample {key!r} are not "
                                    "contiguous in the tar (would split the sample; ray issue 44068)")
            if dropped:
                continue
            if m.group(2) in members:
                dropped = True
                yield BadSample("duplicate_key", f"{shard}: sample {key!r} has two {m.group(2)!r} members "
                                "(duplicated key)")
                continue
            members[m.group(2)] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        yield BadSample("truncated_tar", f"{shard}: tar ends early or is corrupt after sample {key!r} "
                        f"({type(e).__name__}: {e})")
        return
    if key is not None and not dropped:
        yield key, members


def read_tar(stream: BinaryIO, shard: str, spec: SampleSpec, on_error: Literal["fail", "skip"], tally: Tally,
             expected: int | None = None) -> Iterator[dict]:
    """Decoded, checked samples of one tar stream in tar order. Policy "fail" raises the first BadSample;
    "skip" counts it in `tally` and continues. `expected` (the manifest's sample count) detects a tar cut
    at a member boundary, which tar itself cannot tell from a complete one."""
    read = 0
    for item in _group_members(stream, shard):
        if isinstance(item, BadSample):
            bad = item
        else:
            read += 1
            try:
                sample = decode_sample(item[1], shard, item[0], spec)
            except BadSample as e:
                bad = e
            else:
                tally["ok"] += 1
                yield sample
                continue
        if bad.reason in ("truncated_tar", "bad_tar") and expected is not None:
            bad.count = max(1, expected - read)
            read = expected
        if on_error == "fail":
            raise bad
        tally[bad.reason] += bad.count
    if expected is not None and read < expected:
        bad = BadSample("truncated_tar", f"{shard}: {read} samples, its manifest says {expected} (truncated?)",
                        expected - read)
        if on_error == "fail":
            raise bad
        tally[bad.reason] += bad.count
