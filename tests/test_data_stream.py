"""Per-epoch shuffling (seeded, reproducible) and shard-level resume of a rank's training stream, on real
shards through real Ray Data."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from fewstep.data import DataConfig
from fewstep.data.shards import write_shards
from fewstep.data.sources import fashion_mnist
from fewstep.data.stream import TrainStream, epoch_order, shuffled


def test_epoch_order_is_seeded_and_ranks_split_it():
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert sorted(epoch_order(10, 0, 3)) == list(range(10))
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1) != epoch_order(10, 1, 1)
    order = epoch_order(7, 5, 2)
    ranks = [order[r::3] for r in range(3)]
    assert sorted(itertools.chain(*ranks)) == list(range(7))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    write_shards(itertools.islice(fashion_mnist("test"), 48), out, samples_per_shard=8)  # 6 shards
    return out


def digests(batches) -> list[str]:
    return [hashlib.sha1(im.numpy().tobytes()).hexdigest() for _, b in batches for im in b["image"]]


def take(stream: TrainStream, n: int) -> list:
    it = iter(stream)
    return [next(it) for _ in range(n)]


@pytest.mark.integration
def test_shuffle_is_reproducible_and_resume_skips_finished_shards(ray_cluster, shards):
    cfg = DataConfig(shards=str(shards), shuffle_buffer=16)
    a = take(TrainStream(cfg, 0, 1, 8), 12)  # two epochs of 48
    b = take(TrainStream(cfg, 0, 1, 8), 12)
    assert digests(a) == digests(b), "same seed, same stream"
    assert [e for e, _ in a] == [0] * 6 + [1] * 6
    first, second = digests(a[:6]), digests(a[6:])
    assert sorted(first) == sorted(second) and len(set(first)) == 48, "each epoch: every sample once"
    assert first != second, "reshuffled every epoch"
    assert digests(take(TrainStream(cfg.model_copy(update={"shuffle_seed": 1}), 0, 1, 8), 6)) != first

    # Shard-level resume: no buffer, so 3 batches = the first 3 shards of epoch 0's order
    ordered = cfg.model_copy(update={"shuffle_buffer": 0})
    s = TrainStream(ordered, 0, 1, 8)
    before = digests(take(s, 3))
    state = s.state()
    done = state["ranks"][0]["done"]  # shard 2 counts once its report row (after its last sample) was read
    assert state["ranks"][0]["epoch"] == 0 and done in ([0, 1], [0, 1, 2])
    r = TrainStream(ordered, 0, 1, 8, resume=state)
    after = []
    for epoch, batch in r:
        if epoch == 1:
            break
        after += digests([(epoch, batch)])
    k = 8 * len(done)
    assert len(after) == 48 - k, "finished shards are not read again"
    assert set(before[:k]).isdisjoint(after)
    assert set(before[k:]) <= set(after), "a partly used shard is read again (documented)"
    assert set(before) | set(after) == set(first), "nothing of the epoch is lost"


def test_local_stream_reads_each_sample_once_per_epoch_reshuffled_and_reproducibly(shards):
    cfg = DataConfig(shards=str(shards), shuffle_buffer=16)
    a = take(TrainStream(cfg, 0, 1, 8, local=True), 12)  # no Ray: engine.backend=local
    assert digests(a) == digests(take(TrainStream(cfg, 0, 1, 8, local=True), 12))
    first, second = digests(a[:6]), digests(a[6:])
    assert sorted(first) == sorted(second) and len(set(first)) == 48 and first != second
    ordered = digests(take(TrainStream(cfg.model_copy(update={"shuffle_buffer": 0}), 0, 1, 8, local=True), 6))
    assert sorted(ordered) == sorted(first) and ordered != first


def test_shuffle_buffer_yields_every_row_once_in_full_batches():
    rng = np.random.default_rng(0)
    chunks = [{"pos": np.arange(i, i + 10), "image": np.arange(i, i + 10) * 2} for i in range(0, 95, 10)]
    chunks[-1] = {k: v[:5] for k, v in chunks[-1].items()}  # 95 rows in all
    out = list(shuffled(iter(chunks), 8, 20, rng))
    rows = np.concatenate([b["pos"] for b in out])
    assert sorted(rows.tolist()) == list(range(95)) and [len(b["pos"]) for b in out[:-1]] == [8] * 11
    assert all(np.array_equal(b["image"], b["pos"] * 2) for b in out), "columns stay aligned"
    assert rows.tolist() != list(range(95))
    in_order = np.concatenate([b["pos"] for b in shuffled(iter(chunks), 8, 0, rng)])
    assert in_order.tolist() == list(range(95))
