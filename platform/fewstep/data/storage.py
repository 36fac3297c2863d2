"""Where shards live: local paths, globs, brace patterns, or `s3://` / `gs://` URIs, all through pyarrow
filesystems. Credentials come from the usual environment of each process that opens a shard (AWS_* /
GOOGLE_APPLICATION_CREDENTIALS, instance roles); an S3-compatible endpoint from AWS_ENDPOINT_URL. A
filesystem object pickles without secrets, so Ray tasks resolve credentials from their own environment.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand
from pyarrow import fs as pafs

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_remote(spec: str) -> bool:
    return spec.startswith(REMOTE_SCHEMES)


@lru_cache(maxsize=16)
def _filesystem(scheme_and_bucket: str, endpoint: str | None) -> pafs.FileSystem:
    # pyarrow reads credentials, region and AWS_ENDPOINT_URL from the environment here (endpoint: cache key).
    return pafs.FileSystem.from_uri(scheme_and_bucket)[0]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """`s3://bucket/a/b.tar` -> (S3FileSystem, "bucket/a/b.tar"); a local path -> (LocalFileSystem, abs path)."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}", os.environ.get("AWS_ENDPOINT_URL")), rest


def open_input(uri: str) -> BinaryIO:
    """A readable binary stream of a local file or an object (streamed, not downloaded first)."""
    if not is_remote(uri):
        return open(uri, "rb")
    fs, path = filesystem(uri)
    try:
        return fs.open_input_stream(path)
    except OSError as e:
        raise OSError(f"{uri}: cannot open ({e})") from e


def _list_remote(scheme: str, pattern: str, spec: str) -> list[str]:
    """Objects matching `bucket/prefix/*.tar` (a glob), a `bucket/prefix` "directory", or one object."""
    fs, _ = filesystem(f"{scheme}{pattern}")
    magic = glob.has_magic(pattern)
    base = pattern.rsplit("/", 1)[0] if magic else pattern
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [f"{scheme}{base}"] if base.endswith(".tar") and not magic else []
        bucket = base.split("/", 1)[0]
        if info.type == pafs.FileType.NotFound and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"bucket {scheme}{bucket} does not exist (or these credentials cannot see it)")
        found = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    except OSError as e:  # unreachable endpoint, missing bucket, denied: pyarrow's message says which
        raise OSError(f"shard spec {spec!r}: cannot list {scheme}{base} ({e})") from e
    names = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".tar"))
    if magic:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [f"{scheme}{n}" for n in names]


def absolute_spec(spec: str) -> str:
    """A local shard spec made absolute (workers do not run in the driver's directory); URIs unchanged."""
    return spec if is_remote(spec) else os.path.abspath(os.path.expanduser(spec))


def resolve_shards(spec: str) -> list[str]:
    """The .tar shards named by `spec`, in a stable order: a directory (its *.tar, sorted), a glob, a brace
    pattern (`dir/train-{000000..000005}.tar`: every expanded file must exist), one file, or the same as an
    `s3://` / `gs://` URI. Local paths come back absolute (Ray tasks do not run in the driver's directory)."""
    paths: list[str] = []
    for part in braceexpand(os.path.expanduser(spec)):
        if is_remote(part):
            scheme, rest = part.split("://", 1)
            found = _list_remote(f"{scheme}://", rest.rstrip("/"), spec)
            if not found and part != spec:
                raise FileNotFoundError(f"shard spec {spec!r}: {part!r} is not a .tar object")
            paths += found
        elif glob.has_magic(part):
            paths += sorted(p for p in glob.glob(part) if p.endswith(".tar") and os.path.isfile(p))
        elif os.path.isdir(part):
            paths += sorted(str(p) for p in Path(part).glob("*.tar") if p.is_file())
        elif os.path.isfile(part) and part.endswith(".tar"):
            paths.append(part)
        elif part != spec:
            raise FileNotFoundError(f"shard spec {spec!r}: {part!r} is not a .tar file")
    if not paths:
        raise FileNotFoundError(f"shard spec {spec!r} matches no .tar shard (expected a directory of .tar "
                                "files, a glob, a brace pattern such as dir/train-{000000..000005}.tar, "
                                "or the same under s3:// or gs://)")
    return list(dict.fromkeys(p if is_remote(p) else os.path.abspath(p) for p in paths))


def read_text(uri: str) -> str | None:
    """A small text object/file, or None when it does not exist (manifests are optional)."""
    try:
        with open_input(uri) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None
