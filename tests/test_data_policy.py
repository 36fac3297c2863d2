"""Bad data, case by case, on small tars the tests write: policy "fail" raises an error naming the shard and
the key; policy "skip" counts the sample under its reason and keeps reading the good ones. Then the same
through the real Ray Data path: skip counts ride to the consumer, and the skip bound stops training."""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep.data import DataConfig
from fewstep.data.samples import BadSample, SampleSpec, ShardError, Tally, read_tar
from fewstep.data.shards import write_shards
from fewstep.data.sources import fashion_mnist
from fewstep.data.storage import resolve_shards

SPEC = SampleSpec(channels=1, image_size=32, num_classes=10)


def png(shape=(28, 28), mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good(key: str, cls: int = 1) -> list[tuple[str, bytes]]:
    return [(f"{key}.cls", str(cls).encode()), (f"{key}.png", png()), (f"{key}.txt", b"a caption")]


class CreatesFile:
    """Unpickling this creates a file: proof that a reader executed the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def run(data: bytes, policy: str, spec: SampleSpec = SPEC, expected: int | None = None):
    tally = Tally()
    keys = [s["key"] for s in read_tar(io.BytesIO(data), "s.tar", spec, policy, tally, expected)]
    return keys, tally


def cut_at(data: bytes, member: str, inside: bool) -> bytes:
    """The tar cut inside `member`'s data (a torn download) or right before its header (a lost tail)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(member)
    return data[: info.offset_data + 10] if inside else data[: info.offset]


def rgb_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


A, C = good("a"), good("c")
CASES = {
    # name: (tar bytes, spec, manifest count, reason, key named in the error, keys kept under "skip")
    "truncated_tar": (cut_at(tar_bytes(A + good("b") + C), "c.png", True), SPEC, None, "truncated_tar", "'c'",
                      ["a", "b"]),
    "truncated_at_member_boundary": (cut_at(tar_bytes(A + good("b") + C), "c.cls", False), SPEC, 3,
                                     "truncated_tar", "manifest says 3", ["a", "b"]),
    "undecodable_image": (tar_bytes(A + [("b.cls", b"1"), ("b.png", b"not a png")] + C), SPEC, None,
                          "undecodable_image", "'b'", ["a", "c"]),
    "missing_cls": (tar_bytes(A + [("b.png", png()), ("b.txt", b"x")] + C), SPEC, None, "missing_label",
                    "'b' has no .cls", ["a", "c"]),
    "missing_txt": (tar_bytes(A + [("b.cls", b"1"), ("b.png", png())] + C),
                    SampleSpec(channels=1, image_size=32, num_classes=10, require_caption=True), None,
                    "missing_caption", "'b' has no .txt", ["a", "c"]),
    "duplicated_key": (tar_bytes(A + good("b") + good("b") + C), SPEC, None, "duplicate_key", "'b'", ["a", "c"]),
    "noncontiguous_keys": (tar_bytes([("a.cls", b"1"), ("a.png", png()), *good("b"), ("a.txt", b"late"), *C]),
                           SPEC, None, "noncontiguous_key", "'a' are not contiguous", ["a", "b", "c"]),
    "wrong_mode": (tar_bytes(A + [("b.cls", b"1"), ("b.png", rgb_png())] + C), SPEC, None, "wrong_mode",
                   "'b': image has 3 channels", ["a", "c"]),
    "wrong_size": (tar_bytes(A + [("b.cls", b"1"), ("b.png", png((40, 40)))] + C), SPEC, None, "wrong_size",
                   "'b': image is 40x40", ["a", "c"]),
    "class_out_of_range": (tar_bytes(A + good("b", cls=12) + C), SPEC, None, "class_out_of_range",
                           "'b' has class 12, outside [0, 10)", ["a", "c"]),
    "not_a_tar": (b"definitely not a tar archive" * 40, SPEC, None, "bad_tar", "s.tar: not a readable tar", []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_fail_names_shard_and_key_skip_counts(name):
    data, spec, expected, reason, named, kept = CASES[name]
    with pytest.raises(BadSample) as err:
        run(data, "fail", spec, expected)
    assert err.value.reason == reason and "s.tar" in str(err.value) and named in str(err.value), str(err.value)
    keys, tally = run(data, "skip", spec, expected)
    assert keys == kept
    assert tally == Tally({"ok": len(kept), reason: 1}), tally


def test_pickle_and_torch_members_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(CreatesFile(marker))
    pickle.loads(payload).close()  # the payload is live: unpickling it does create the file
    assert marker.exists()
    marker.unlink()
    for ext in ("pkl", "pth"):
        data = tar_bytes(A + [("b.cls", b"1"), (f"b.{ext}", payload), ("b.png", png())] + C)
        with pytest.raises(BadSample, match=rf"s\.tar: sample 'b' has a b\.{ext} member: pickle/torch"):
            run(data, "fail")
        keys, tally = run(data, "skip")
        assert keys == ["a", "c"] and tally["unsafe_member"] == 1
    assert not marker.exists(), "a pickle member was unpickled"


def test_convert_mode_and_box_resize_make_odd_images_fit():
    data = tar_bytes(A + [("b.cls", b"1"), ("b.jpg", rgb_png())] + [("c.cls", b"2"), ("c.png", png((64, 48)))])
    spec = SampleSpec(channels=1, image_size=32, num_classes=10, convert_mode=True, resize="box")
    out = list(read_tar(io.BytesIO(data), "s.tar", spec, "fail", Tally()))
    assert [s["image"].shape for s in out] == [(32, 32, 1)] * 3


def test_empty_shard_list_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no .tar shard"):
        resolve_shards(str(tmp_path))
    (tmp_path / "x-000000.tar").write_bytes(tar_bytes(A))
    with pytest.raises(FileNotFoundError, match=r"x-000001\.tar' is not a \.tar file"):
        resolve_shards(str(tmp_path / "x-{000000..000001}.tar"))


# ------------------------------------------------------------------------------------ real Ray Data


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """4 good shards of 16 Fashion-MNIST images + 1 shard of 14 with an undecodable image and a pickle."""
    out = tmp_path_factory.mktemp("mixed")
    write_shards(itertools.islice(fashion_mnist("test"), 64), out, prefix="good", samples_per_shard=16)
    members = [m for i in range(14) for m in good(f"x{i:02d}")]
    members[1] = ("x00.png", b"\x89PNG broken")
    members.insert(5, ("x01.pkl", pickle.dumps({"x": 1})))
    (out / "zbad-000000.tar").write_bytes(tar_bytes(members))
    return out


@pytest.mark.integration
def test_skip_policy_through_ray_counts_and_bounds(ray_cluster, mixed_shards):
    from fewstep.data.stream import TrainStream

    cfg = DataConfig(shards=str(mixed_shards), on_error="skip", max_skip_fraction=0.2, shuffle_buffer=0)
    stream = TrainStream(cfg, rank=0, world=1, batch_size=2)
    n = 0
    for epoch, batch in stream:
        if epoch == 1:
            break
        n += len(batch["label"])
    assert n == 64 + 12  # every good sample once; the bad ones never reach training
    assert stream.tally == Tally({"ok": 76, "undecodable_image": 1, "unsafe_member": 1})
    state = stream.state()
    assert state["tally"] == {"ok": 76, "undecodable_image": 1, "unsafe_member": 1}
    m = stream.metrics()  # what rank 0 logs to MLflow at each checkpoint
    assert m["data_skipped_undecodable_image"] == 1.0 and m["data_skipped_unsafe_member"] == 1.0
    assert m["data_samples_read"] == 78.0 and m["data_skipped_frac"] == pytest.approx(2 / 78)

    strict = cfg.model_copy(update={"max_skip_fraction": 0.001})
    with pytest.raises(ShardError, match=r"2 of \d+ samples skipped .* > data.max_skip_fraction=0.001\); by reason: "
                                         r"undecodable_image 1, unsafe_member 1; last shard .*zbad-000000.tar"):
        for _ in TrainStream(strict, rank=0, world=1, batch_size=2):
            pass

    # policy "fail" through Ray Data: the read task's error names shard and key
    with pytest.raises(Exception, match=r"zbad-000000\.tar: sample 'x00': undecodable image"):  # noqa: B017
        for _ in TrainStream(cfg.model_copy(update={"on_error": "fail"}), rank=0, world=1, batch_size=2):
            pass
