"""prepare_data sources on tiny synthetic inputs the tests write: scikit-learn digits, an ImageNet-style image
folder (sorted synsets or a mapping file, box resize), parquet with configurable columns, parallel conversion
with Ray tasks; and existing WebDataset shards read as they are, member names mapped by config."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep.data import DataConfig
from fewstep.data.convert import convert
from fewstep.data.samples import box_resize
from fewstep.data.shards import iter_samples
from fewstep.data.sources import digits_source, imagefolder_source, parquet_source

REPO = Path(__file__).resolve().parents[1]


def encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(buf, format=fmt)
    return buf.getvalue()


def test_box_resize_is_area_average():
    im = Image.fromarray(np.kron(np.array([[0, 200], [100, 50]], np.uint8), np.ones((4, 4), np.uint8)))
    assert np.asarray(box_resize(im, 2)).tolist() == [[0, 200], [100, 50]]  # 4x4 blocks average to themselves
    im = Image.fromarray(np.array([[0, 100], [200, 100]], np.uint8))
    assert np.asarray(box_resize(im, 1)).tolist() == [[100]]


def test_digits_source_and_cli(tmp_path):
    src = digits_source("test")
    s = next(iter(src.load(src.items[:1])))
    assert s["image"].shape == (8, 8) and s["image"].dtype == np.uint8 and s["image"].max() > 200
    assert len(src.items) + len(digits_source("train").items) == 1797
    r = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--source", "digits", "--out",
                        str(tmp_path), "--samples-per-shard", "100", "--limit", "250"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 3 shards, 250 samples" in r.stdout and "test: 3 shards, 250 samples" in r.stdout
    m = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert m["num_samples"] == 250 and m["image_sizes"] == [{"shape_hwc": [8, 8, 1], "samples": 250}]
    assert sum(m["classes"].values()) == 250 and len(m["shards"]) == 3 and m["source"] == "digits-train"


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    """3 synsets, images of mixed sizes and modes (RGB JPEG, grayscale PNG, CMYK JPEG)."""
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for synset in ("n02", "n01", "n03"):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            rgb = rng.integers(0, 255, (40 + 7 * i, 50, 3), np.uint8)
            data = encoded(rgb, "JPEG") if i == 0 else encoded(rgb[..., 0]) if i == 1 else encoded(rgb, "JPEG", "CMYK")
            (root / synset / f"{synset}_{i}.{'png' if i == 1 else 'JPEG'}").write_bytes(data)
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_source_sorted_synsets_and_mapping(imagefolder, tmp_path):
    src = imagefolder_source(imagefolder, size=16)
    samples = list(src.load(src.items))
    assert len(samples) == 9 and {s["image"].shape for s in samples} == {(16, 16, 3)}
    assert [s["cls"] for s in samples] == [0] * 3 + [1] * 3 + [2] * 3  # n01 < n02 < n03
    assert samples[0]["key"] == "n01_n01_0" and samples[0]["txt"] == "a photo of a n01"
    (tmp_path / "map.txt").write_text("n03 7\nn02 5\nn01 0\n")
    mapped = imagefolder_source(imagefolder, size=16, class_map=tmp_path / "map.txt")
    assert [c for _, _, c in mapped.items] == [0] * 3 + [5] * 3 + [7] * 3
    (tmp_path / "map.json").write_text(json.dumps({"n01": 3}))
    with pytest.raises(ValueError, match=r"folders \['n02', 'n03'\] are not in the class map"):
        imagefolder_source(imagefolder, class_map=tmp_path / "map.json")


@pytest.mark.integration
def test_parallel_conversion_with_ray_matches_sequential(ray_cluster, imagefolder, tmp_path):
    src = imagefolder_source(imagefolder, size=16)
    seq = convert(src, tmp_path / "seq", "train", samples_per_shard=4, progress=False)
    par = convert(src, tmp_path / "par", "train", samples_per_shard=4, ray=True)
    assert par["num_shards"] == 3 and par["num_samples"] == 9 and par["classes"] == {"0": 3, "1": 3, "2": 3}
    assert [e["sha256"] for e in par["shards"]] == [e["sha256"] for e in seq["shards"]]  # byte-identical
    assert par["image_sizes"] == [{"shape_hwc": [16, 16, 3], "samples": 9}]


def test_parquet_source_with_configured_columns(tmp_path):
    rng = np.random.default_rng(1)
    images = [encoded(rng.integers(0, 255, (12, 10, 3), np.uint8)) for _ in range(7)]
    table = pa.table({"jpg_bytes": images, "text": [f"caption {i}" for i in range(7)], "y": list(range(7))})
    pq.write_table(table.slice(0, 4), tmp_path / "part-0.parquet", row_group_size=2)
    pq.write_table(table.slice(4), tmp_path / "part-1.parquet", row_group_size=2)
    src = parquet_source(str(tmp_path / "part-*.parquet"), image_column="jpg_bytes", caption_column="text",
                         label_column="y", size=8)
    out = list(src.load(src.items[1:6]))  # spans row groups and files
    assert [s["txt"] for s in out] == [f"caption {i}" for i in range(1, 6)]
    assert [s["cls"] for s in out] == [1, 2, 3, 4, 5] and {s["image"].shape for s in out} == {(8, 8, 3)}
    assert out[0]["key"] == "part-0-000000001" and out[3]["key"] == "part-1-000000000"
    part0 = str(tmp_path / "part-0.parquet")
    keep = list(parquet_source(part0, "jpg_bytes", "text").load([(part0, 0)]))
    assert keep[0]["image"].shape == (12, 10, 3) and keep[0]["cls"] is None
    with pytest.raises(ValueError, match=r"part-0.parquet: no column 'image'"):
        parquet_source(str(tmp_path / "part-0.parquet"))
    r = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--source",
                        f"parquet:{tmp_path}/part-*.parquet", "--out", str(tmp_path / "out"), "--image-column",
                        "jpg_bytes", "--caption-column", "text", "--samples-per-shard", "3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [s["txt"] for s in iter_samples(str(tmp_path / "out" / "train"), require_cls=False)] == \
        [f"caption {i}" for i in range(7)]


def test_existing_webdataset_shards_read_with_mapped_member_names(tmp_path):
    """imagenet-train-style shards (.jpg + .cls + .json, full-size RGB) are read in place, not rewritten."""
    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "imagenet-train-000000.tar", "w") as tar:
        for i, key in enumerate(["n01440764_10026", "n01440764_10027"]):
            jpg = encoded(rng.integers(0, 255, (48, 60, 3), np.uint8), "JPEG")
            for ext, data in (("cls", str(i * 3).encode()), ("jpg", jpg), ("json", b'{"width": 60}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(shards=str(tmp_path / "imagenet-train-{000000..000000}.tar"), image_ext=["jpg"], label_ext="cls",
                     channels=3, image_size=16, resize="box", convert_mode=True, num_classes=1000)
    from fewstep.data.samples import SampleSpec

    out = list(iter_samples(cfg.shards, spec=SampleSpec.from_config(cfg)))
    assert [(s["key"], s["cls"], s["image"].shape, s["json"]) for s in out] == [
        ("n01440764_10026", 0, (16, 16, 3), {"width": 60}), ("n01440764_10027", 3, (16, 16, 3), {"width": 60})]
