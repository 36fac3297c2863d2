"""The training stream of one rank: per-epoch shard order, exact-size batches, shard-level resume, skip counts.

Order. Epoch e permutes all shards with a generator seeded by (data.shuffle_seed, e); rank r reads every
world-th shard of that permutation, in order (Ray Data with preserve_order), through a local shuffle buffer
seeded by (seed, e, r). Ranks read disjoint shards, so an epoch is each sample once across ranks. Each rank
runs its own Ray Data pipeline (read tasks spread over the cluster); Ray Train's shared `streaming_split`
cannot say which shards a rank has finished (no mid-epoch resume in Ray Data: ray issues 37633, 48224).

Process. Each rank's Ray Data pipeline runs in a small companion actor (`_EpochReader`, same node, no CPU
reserved) and the rank pulls chunks of batches from it, one chunk ahead. Run inside the training process,
Ray Data's streaming executor thread (a Python scheduling loop that polls while its read tasks are
backpressured) competes with the training step for the GIL (`python -m pipelines.bench train` measures the cost;
docs/results/benchmarks.md has the figures).

Resume (`state()` at every checkpoint, on every rank; `TrainStream(..., resume=state)` after a restart).
A shard is finished when every sample of it was handed to training (its report row gives the count). The
checkpoint stores, per rank, the epoch and its finished shards; a restart reads the rest of that epoch's
shards in the same order and then continues with epoch e+1. Exact: the shard order of every epoch, no
finished shard is repeated, no unread shard is dropped, the same seed gives the same stream. Not exact:
samples of shards that were partly consumed at the checkpoint are seen again in that epoch; the shuffle
buffer is refilled, so the sample order after a restart differs from an uninterrupted run; up to
batch_size - 1 samples carried across an epoch boundary at the checkpoint are dropped; with a different
number of ranks the run restarts the checkpoint's epoch from its beginning.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fewstep.data.config import DataConfig
from fewstep.data.reader import manifest_counts, read_shard_columns, shard_dataset, to_training_batch
from fewstep.data.samples import SampleSpec, ShardError, Tally
from fewstep.data.storage import resolve_shards

COLUMNS = ("image", "label", "pos", "caption")


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard indices of epoch `epoch`: a permutation seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


CHUNK = 8  # batches per round trip to the reader actor


@ray.remote
class _EpochReader:
    """One rank's Ray Data pipeline for one epoch at a time, in its own process (see the module docstring)."""

    def __init__(self, cfg: DataConfig, rank: int, batch_size: int, expected: dict[str, int]):
        self.cfg, self.rank, self.batch_size, self.expected = cfg, rank, batch_size, expected
        self.batches: Iterator[dict[str, np.ndarray]] = iter(())

    def begin(self, shards: list[str], positions: list[int], epoch: int) -> None:
        ds = shard_dataset(self.cfg, shards, epoch, self.expected, positions=positions)
        ds.context.execution_options.preserve_order = True  # reproducible order for a given seed
        buffer = self.cfg.shuffle_buffer or None
        seed = int(np.random.default_rng([self.cfg.shuffle_seed, epoch, self.rank]).integers(2**31))
        self.batches = iter(ds.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=False, local_shuffle_buffer_size=buffer,
            local_shuffle_seed=seed if buffer else None,
        ))

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n next batches; [] when the epoch is over."""
        return list(itertools.islice(self.batches, n))


class _RemoteReader:
    """The rank's side of its `_EpochReader` actor: `begin` starts an epoch and asks for the first chunk at once
    (reading overlaps whatever the rank does next); `chunks` yields chunks of batches, one chunk ahead."""

    def __init__(self, cfg: DataConfig, rank: int, batch_size: int, expected: dict[str, int]):
        here = ray.get_runtime_context().get_node_id()
        self.actor = _EpochReader.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)
        ).remote(cfg, rank, batch_size, expected)
        self.begun = self.pending = None

    def begin(self, shards: list[str], positions: list[int], epoch: int) -> None:
        self.begun = self.actor.begin.remote(shards, positions, epoch)
        self.pending = self.actor.take.remote(CHUNK)  # an actor runs one caller's calls in order

    def chunks(self) -> Iterator[list[dict[str, np.ndarray]]]:
        ray.get(self.begun)  # raises a bad shard list or config here, not as a silently empty epoch
        while chunk := ray.get(self.pending):
            self.pending = self.actor.take.remote(CHUNK)  # the next chunk is read while this one trains
            yield chunk


class _LocalReader:
    """The same epoch read in this process, without Ray (engine.backend=local): the shards in order through the
    same decoder and bad-data policy (report rows included), then a seeded shuffle buffer of data.shuffle_buffer."""

    def __init__(self, cfg: DataConfig, rank: int, batch_size: int, expected: dict[str, int]):
        self.cfg, self.rank, self.batch_size, self.expected = cfg, rank, batch_size, expected
        self.batches: Iterator[dict[str, np.ndarray]] = iter(())

    def begin(self, shards: list[str], positions: list[int], epoch: int) -> None:
        spec, c = SampleSpec.from_config(self.cfg), self.cfg
        rng = np.random.default_rng([c.shuffle_seed, epoch, self.rank])

        def rows() -> Iterator[dict[str, np.ndarray]]:
            for uri, pos in zip(shards, positions, strict=True):
                for cols in read_shard_columns(uri, pos, spec, c.on_error, self.expected.get(uri)):
                    yield to_training_batch(cols, c.hflip, c.shuffle_seed, epoch)

        self.batches = shuffled(rows(), self.batch_size, c.shuffle_buffer, rng)

    def chunks(self) -> Iterator[list[dict[str, np.ndarray]]]:
        while chunk := list(itertools.islice(self.batches, CHUNK)):
            yield chunk


def shuffled(chunks: Iterator[dict[str, np.ndarray]], batch: int, buffer: int,
             rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch` rows drawn at random from a buffer holding at least `buffer` rows (0: in order). Each
    draw takes `batch` random slots and refills them with the buffer's last rows: O(batch) per batch, not
    O(buffer); a new chunk is appended once."""
    held: dict[str, np.ndarray] | None = None
    for chunk in itertools.chain(chunks, [None]):
        if chunk is not None:
            held = chunk if held is None else {k: np.concatenate([held[k], chunk[k]]) for k in held}
        if held is None:
            continue
        size = len(held["pos"])
        while size >= (batch + buffer if chunk is not None else 1):
            n = min(batch, size)
            take = np.sort(rng.choice(size, n, replace=False)) if buffer else np.arange(n)
            yield {k: v[take] for k, v in held.items()}
            # refill the taken slots below size - n with the untaken rows at or above it (order kept when buffer=0)
            if buffer:
                taken = np.zeros(size, dtype=bool)
                taken[take] = True
                holes, movers = take[take < size - n], np.flatnonzero(~taken[size - n :]) + size - n
                for v in held.values():
                    v[holes] = v[movers]
                held = {k: v[: size - n] for k, v in held.items()}
            else:
                held = {k: v[n:] for k, v in held.items()}
            size -= n


class TrainStream:
    """Iterate `(epoch, {"image": (B, C, S, S) float32, "label": (B,) int64, "caption": list of B str})`
    forever, B = batch_size."""

    def __init__(self, cfg: DataConfig, rank: int, world: int, batch_size: int, resume: dict | None = None,
                 local: bool = False):
        self.cfg, self.rank, self.world, self.batch_size = cfg, rank, world, batch_size
        self.local = local  # read in this process (engine.backend=local) instead of a Ray actor
        self.shards = resolve_shards(cfg.shards)
        if len(self.shards) < world:
            raise ValueError(f"data.shards {cfg.shards!r} has {len(self.shards)} shards, fewer than the {world} "
                             "training ranks (each rank reads whole shards): write smaller shards")
        self.expected = manifest_counts(self.shards)
        self.epoch, self.done = 0, set()  # done: positions in this rank's list of the epoch
        if resume:
            ranks = resume["ranks"]
            if len(ranks) == world and resume["num_shards"] == len(self.shards):
                self.epoch, self.done = ranks[rank]["epoch"], set(ranks[rank]["done"])
            else:  # other world size or shard set: restart the epoch (documented above)
                self.epoch = min(r["epoch"] for r in ranks)
        self.consumed: Counter[int] = Counter()  # pos -> samples handed to training, this epoch
        self.totals: dict[int, int] = {}  # pos -> samples the shard yielded (from its report row)
        self.tally = Tally()  # read/skipped samples of this rank since start
        self.global_tally = Tally()  # all ranks, as of the last state()
        self.reader: _RemoteReader | _LocalReader | None = None  # created on first use
        self.launched: int | None = None  # start(): the epoch already begun

    def my_shards(self, epoch: int) -> list[str]:
        order = epoch_order(len(self.shards), self.cfg.shuffle_seed, epoch)
        return [self.shards[i] for i in order[self.rank :: self.world]]

    def _on_report(self, report: dict) -> None:
        self.totals[report["pos"]] = report["tally"].get("ok", 0)
        self.tally.update(report["tally"])
        frac = self.tally.fraction()
        if self.tally.skipped and frac > self.cfg.max_skip_fraction:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.tally.items()) if k != "ok")
            raise ShardError(f"rank {self.rank}: {self.tally.skipped} of {self.tally['ok'] + self.tally.skipped} "
                             f"samples skipped ({frac:.2%} > data.max_skip_fraction={self.cfg.max_skip_fraction}); "
                             f"by reason: {counts}; last shard {report['shard']}")

    def start(self) -> TrainStream:
        """Start reading the current epoch now (reader, Ray Data pipeline, first chunk) without waiting, so that
        data startup (several seconds on a fresh cluster) overlaps the model and DeepSpeed setup."""
        self.launched = self._launch(self.epoch)
        return self

    def _launch(self, epoch: int) -> int | None:
        """Begin reading this rank's unfinished shards of `epoch`; None when there are none."""
        mine = self.my_shards(epoch)
        todo = [p for p in range(len(mine)) if p not in self.done]
        if not todo:
            return None
        if self.reader is None:
            kind = _LocalReader if self.local else _RemoteReader
            self.reader = kind(self.cfg, self.rank, self.batch_size, self.expected)
        self.reader.begin([mine[p] for p in todo], todo, epoch)
        return epoch

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's raw batches of `epoch` (image, label, pos, report columns)."""
        launched = self.launched if self.launched == epoch else self._launch(epoch)
        self.launched = None
        if launched is None:
            return
        for chunk in self.reader.chunks():
            yield from chunk

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        pending: list[dict[str, np.ndarray]] = []  # rows received, not yet handed out (B rows or fewer)
        n = 0
        while True:
            for b in self._epoch_batches(self.epoch):
                report = b["report"] != ""
                for r in b["report"][report]:
                    self._on_report(json.loads(r))
                keep = ~report
                if keep.any():
                    pending.append({k: b[k][keep] for k in COLUMNS})
                    n += int(keep.sum())
                while n >= self.batch_size:
                    rows = {k: np.concatenate([p[k] for p in pending]) for k in COLUMNS}
                    out = {k: v[: self.batch_size] for k, v in rows.items()}
                    rest = {k: v[self.batch_size :] for k, v in rows.items()}
                    pending, n = ([rest] if len(rest["pos"]) else []), n - self.batch_size
                    self.consumed.update(out["pos"].tolist())
                    yield self.epoch, {"image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"]),
                                       "caption": [str(c) for c in out["caption"]]}
            # Epoch over: the remainder (< B rows) starts the next epoch's first batch.
            for p in pending:
                p["pos"] = np.full_like(p["pos"], -1)  # carried rows count for no shard of the new epoch
            self.epoch, self.done = self.epoch + 1, set()
            self.consumed.clear()
            self.totals.clear()

    def finished(self) -> list[int]:
        """Positions (in this rank's list of the current epoch) of shards all of whose samples were used."""
        new = {p for p, t in self.totals.items() if self.consumed[p] >= t}
        return sorted(self.done | new)

    def state(self) -> dict[str, Any]:
        """The data position and skip counts of all ranks: call on every rank at the same step (it gathers);
        store it in the checkpoint (trainer_state.json "data") and pass it back as `resume`."""
        mine = {"epoch": self.epoch, "done": self.finished(), "tally": dict(self.tally)}
        ranks = [mine]
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        self.global_tally = Tally()
        for r in ranks:
            self.global_tally.update(r.pop("tally"))
        return {"num_shards": len(self.shards), "seed": self.cfg.shuffle_seed, "ranks": ranks,
                "tally": dict(self.global_tally)}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the last state(): samples read and skipped (all ranks), skipped per reason."""
        t = self.global_tally
        return {"data_samples_read": float(t["ok"] + t.skipped), "data_skipped": float(t.skipped),
                "data_skipped_frac": t.fraction(),
                **{f"data_skipped_{k}": float(v) for k, v in sorted(t.items()) if k != "ok"}}
