"""Data plane on real shards: write/read round trip, Ray Data column contract, refusal of unsafe or
malformed samples, and the prepare_data CLI. Shards are tiny (64 Fashion-MNIST test images)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep.data import DataConfig
from fewstep.data.reader import _pad, build_dataset, flip_mask, to_training_batch
from fewstep.data.shards import ShardError, iter_samples, resolve_shards, write_shards
from fewstep.data.sources import FASHION_MNIST_CLASSES, fashion_mnist

REPO = Path(__file__).resolve().parents[1]
N = 64


@pytest.fixture(scope="module")
def source() -> list[dict]:
    return list(itertools.islice(fashion_mnist("test"), N))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, source) -> Path:
    out = tmp_path_factory.mktemp("shards")
    # Reversed input: the writer must still sort keys inside each tar.
    write_shards(reversed(source), out, prefix="test", samples_per_shard=24)
    return out


def padded(image: np.ndarray, size: int = 32) -> np.ndarray:
    """Reference for the reader: (28, 28) uint8 -> (1, size, size) float32, centre-padded with -1."""
    out = np.full((1, size, size), -1.0, np.float32)
    o = (size - 28) // 2
    out[0, o : o + 28, o : o + 28] = image.astype(np.float32) / 127.5 - 1.0
    return out


def raw_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A hand-made shard, for the malformed cases write_shards refuses to produce."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class CreatesFile:
    """Unpickling this creates a file: proof that a reader executed the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def data_cfg(spec: str | Path, **kw) -> DataConfig:
    return DataConfig(shards=str(spec), test_shards=str(spec), **kw)


# ------------------------------------------------------------------------------------ no Ray needed


def test_fashion_mnist_source(source):
    s = source[0]
    assert s["key"] == "fmnist-test-000000" and s["image"].shape == (28, 28) and s["image"].dtype == np.uint8
    assert s["txt"] == f"a photo of a {FASHION_MNIST_CLASSES[s['cls']]}"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        next(fashion_mnist("train", root="/nonexistent"))


def test_write_read_round_trip(shard_dir, source):
    shards = sorted(shard_dir.glob("*.tar"))
    assert [p.name for p in shards] == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
    for p in shards:
        with tarfile.open(p) as tar:
            names = tar.getnames()
        keys = [n.split(".")[0] for n in names]
        runs = [k for k, _ in itertools.groupby(keys)]
        assert runs == sorted(set(keys)), "keys sorted and each sample's members contiguous"
        assert names[:3] == [f"{keys[0]}.cls", f"{keys[0]}.png", f"{keys[0]}.txt"]
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["num_samples"] == N and manifest["num_shards"] == 3
    assert [s["samples"] for s in manifest["shards"]] == [24, 24, 16]
    for entry in manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256((shard_dir / entry["name"]).read_bytes()).hexdigest()
    assert sum(manifest["classes"].values()) == N
    assert manifest["image_sizes"] == [{"shape_hwc": [28, 28, 1], "samples": N}]

    back = {s["key"]: s for s in iter_samples(str(shard_dir))}
    assert len(back) == N
    for s in source:
        b = back[s["key"]]
        assert b["image"].shape == (28, 28, 1) and np.array_equal(b["image"][..., 0], s["image"])
        assert (b["cls"], b["txt"]) == (s["cls"], s["txt"])


def test_failed_write_leaves_no_partial_shard(tmp_path, source):
    def broken():
        yield from source[:30]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(broken(), tmp_path, samples_per_shard=24)
    # The first full shard was renamed into place; the half-written second one never appears.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_resolve_shards(shard_dir, tmp_path):
    full = [str(shard_dir / f"test-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(shard_dir)) == full
    assert resolve_shards(str(shard_dir / "test-*.tar")) == full
    assert resolve_shards(str(shard_dir / "test-{000000..000001}.tar")) == full[:2]
    for spec in (str(tmp_path), str(tmp_path / "*.tar"), str(tmp_path / "x-{000000..000002}.tar")):
        with pytest.raises(FileNotFoundError, match=re.escape(spec)):
            resolve_shards(spec)


def test_iter_samples_refuses_pickle_and_missing_cls(tmp_path, source):
    png = raw_png(source[0]["image"])
    marker = tmp_path / "unpickled"
    evil = write_tar(tmp_path / "evil.tar", [("a.cls", b"1"), ("a.pkl", pickle.dumps(CreatesFile(marker))),
                                             ("a.png", png)])
    with pytest.raises(ShardError, match=r"evil\.tar: sample 'a' has a a\.pkl member"):
        list(iter_samples([evil]))
    assert not marker.exists()
    nocls = write_tar(tmp_path / "nocls.tar", [("b.png", png), ("b.txt", b"x")])
    with pytest.raises(ShardError, match=r"nocls\.tar: sample 'b' has no \.cls"):
        list(iter_samples([nocls]))
    members = [("c.cls", b"1"), ("c.png", png), ("d.cls", b"2"), ("d.png", png), ("c.txt", b"late")]
    split = write_tar(tmp_path / "split.tar", members)
    with pytest.raises(ShardError, match="not contiguous"):
        list(iter_samples([split]))
    bad = write_tar(tmp_path / "bad.tar", [("e.cls", b"1"), ("e.png", b"not a png")])
    with pytest.raises(ShardError, match=r"bad\.tar: sample 'e': undecodable image"):
        list(iter_samples([bad]))


def test_pad_scale_and_seeded_flips():
    small, big = np.full((28, 28, 1), 255, np.uint8), np.full((31, 30, 1), 255, np.uint8)
    padded_u8 = np.stack([_pad(small, 32), _pad(big, 32)])  # (2, 1, 32, 32) uint8, 0 = padding
    batch = {"image": padded_u8, "label": np.array([3, 9]), "keyhash": np.array([1, 2], np.uint32),
             "pos": np.zeros(2, np.int32), "report": np.array(["", ""], dtype=object)}
    out = to_training_batch(batch)
    assert out["image"].shape == (2, 1, 32, 32) and out["image"].dtype == np.float32
    # White images: 1 inside the centred window, -1 padding around it (odd margins: the extra row/col after).
    assert (out["image"][0, 0, 2:30, 2:30] == 1).all() and out["image"][0].sum() == 28 * 28 - 240
    assert (out["image"][1, 0, :31, 1:31] == 1).all() and out["image"][1].sum() == 31 * 30 - 94
    # Flips: a hash of (key, seed, epoch): about half, reproducible, different in another epoch.
    keys = (np.arange(4000, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
    m0, m1 = flip_mask(keys, 0, 0), flip_mask(keys, 0, 1)
    assert 0.45 < m0.mean() < 0.55 and (m0 == flip_mask(keys, 0, 0)).all() and 0.4 < (m0 != m1).mean() < 0.6
    ramp = np.tile(np.arange(32, dtype=np.uint8), (4, 1, 32, 1))  # (4, 1, 32, 32): brighter to the right
    flipped = to_training_batch({**batch, "image": ramp, "keyhash": keys[:4], "pos": np.zeros(4, np.int32),
                                 "label": np.zeros(4), "report": np.array([""] * 4, dtype=object)}, hflip=True)
    for i, f in enumerate(m0[:4]):
        assert (flipped["image"][i, 0, :, 0] > flipped["image"][i, 0, :, -1]).all() == bool(f)


def test_prepare_data_cli(tmp_path):
    out = tmp_path / "fm"
    cmd = [sys.executable, "-m", "pipelines.prepare_data", "--source", "fashion-mnist", "--out", str(out),
           "--limit", "30", "--samples-per-shard", "20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "train: 2 shards, 30 samples" in r.stdout and "test: 2 shards, 30 samples" in r.stdout
    assert [p.name for p in sorted((out / "train").glob("*.tar"))] == ["train-000000.tar", "train-000001.tar"]
    assert sum(1 for _ in iter_samples(str(out / "test"))) == 30
    r = subprocess.run([*cmd[:4], "nope", *cmd[5:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown source 'nope'" in r.stderr


# ------------------------------------------------------------------------------------ real Ray Data


@pytest.mark.integration
def test_build_dataset_contract(ray_cluster, shard_dir, source):
    ds = build_dataset(data_cfg(shard_dir), "train")
    rows = ds.take_all()
    assert len(rows) == N and set(rows[0]) == {"image", "label"}
    images = np.stack([r["image"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    assert images.dtype == np.float32 and images.shape == (N, 1, 32, 32)
    assert labels.dtype == np.int64
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert (images[:, :, :2, :] == -1).all() and (images[:, :, -2:, :] == -1).all()
    assert (images[:, :, :, :2] == -1).all() and (images[:, :, :, -2:] == -1).all()
    # Every sample exactly once with its own label: compare as multisets of (pixels, label).
    def digest(a: np.ndarray) -> str:
        return hashlib.sha1(a.tobytes()).hexdigest()

    got = sorted((digest(im), int(y)) for im, y in zip(images, labels, strict=True))
    want = sorted((digest(padded(s["image"])), s["cls"]) for s in source)
    assert got == want


@pytest.mark.integration
def test_build_dataset_refuses_bad_shards(ray_cluster, tmp_path, source):
    png = raw_png(source[0]["image"])
    marker = tmp_path / "unpickled"
    # A sanity check that the payload is live: unpickling it elsewhere does create a file.
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "live"))).close()
    assert (tmp_path / "live").exists()

    cases = {
        "evil": ([("k1.cls", b"1"), ("k1.pkl", pickle.dumps(CreatesFile(marker))), ("k1.png", png)],
                 "evil.tar: sample 'k1' has a k1.pkl member"),
        "nocls": ([("k2.png", png)], "nocls.tar: sample 'k2' has no .cls member"),
        "range": ([("k3.cls", b"12"), ("k3.png", png)],
                  "range.tar: sample 'k3' has class 12, outside [0, 10)"),
        "big": ([("k4.cls", b"1"), ("k4.png", raw_png(np.zeros((40, 40), np.uint8)))],
                "big.tar: sample 'k4': image is 40x40, larger than data.image_size=32"),
    }
    for name, (members, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        write_tar(d / f"{name}.tar", members)
        with pytest.raises(Exception) as err:  # noqa: B017 - arrives wrapped in Ray's task error types
            build_dataset(data_cfg(d), "train").take_all()
        assert message in str(err.value), (name, str(err.value)[-2000:])
    assert not marker.exists(), "the .pkl member was unpickled"

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        build_dataset(data_cfg(tmp_path / "nothing-here"), "train")
    with pytest.raises(ValueError, match="test_shards"):
        build_dataset(DataConfig(shards=str(tmp_path), test_shards=None), "test")
