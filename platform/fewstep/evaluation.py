"""FID you can trust at scale: reference statistics identified by the hash of their images, FID per step count
over several seeds, generation and Inception features spread over Ray actors (fewstep.fid_pool), results as a
table (fewstep.fid_table) recorded on the model version and its run.

`evaluate_generators` is the library entry point (any number of models: registry URIs, model directories or
in-memory Generators); `evaluate` is what `python -m pipelines.evaluate` runs on one model, with the protocol of
the model's own config (`eval.protocol`) as defaults, and logs the result to MLflow (`record`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fewstep.data.shards import iter_samples, resolve_shards, write_atomic
from fewstep.data.storage import is_remote
from fewstep.fid import InceptionFeatures, Moments, default_features, frechet_distance, stats
from fewstep.fid_pool import SEED_BLOCK, FeaturePool, SampleJob
from fewstep.fid_table import FIDRow, FIDTable, ModelInfo

if TYPE_CHECKING:
    from fewstep.config import TrainConfig
    from fewstep.generator import Generator

REF_BLOCK = 500  # reference images read, hashed and featurised per block


class ProtocolConfig(BaseModel):
    """The full evaluation of a trained model (`python -m pipelines.evaluate`): its defaults come from here."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1000, ge=2, description="Generated images per step count and seed.")
    seeds: int = Field(3, ge=1, description="Seeds per step count; the FID is reported as mean, std and min.")
    reference: Literal["test", "train"] = Field(
        "test", description="Reference statistics from data.test_shards (test) or the training set data.shards "
        "(train).",
    )
    n_ref: int = Field(2000, ge=0, description="Images in the reference statistics; 0 = every image of the split.")
    num_workers: int = Field(
        0, ge=0, description="Ray actors that generate and extract features; 0 = in the evaluating process."
    )
    use_gpu: bool | None = Field(None, description="One GPU per actor; None = when the Ray cluster has GPUs.")


class EvalConfig(BaseModel):
    """In-training evaluation on rank 0: sample grids, and optionally a small-sample FID per step count."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(1000, ge=1, description="Sample a grid from the EMA model every N steps (and at the end).")
    grid_size: int = Field(8, ge=1, description="Grid is grid_size x grid_size images.")
    steps: list[int] = Field(
        default_factory=lambda: [1, 2],
        description="Sampling step counts of the run's sample grids (and the default of eval.fid_steps and of the "
                    "served num_steps); each must be one the objective samples, e.g. [S] for a multistep model "
                    "(checked before the run starts).")
    fid_every: int = Field(
        0, ge=0,
        description="Rank 0 computes Inception FID of the EMA model every N steps (and at the end), logged as "
        "fid_steps_<k> at that step; 0 = off. Other ranks wait at their next collective meanwhile.",
    )
    fid_n: int = Field(
        256, ge=2,
        description="Generated images per step count. Small on purpose (Inception is slow on a CPU "
        "thread): an in-training FID is biased upward and only comparable between equal fid_n.",
    )
    fid_n_ref: int = Field(
        1000, ge=2, description="Held-out images (data.test_shards) in the reference statistics, cached once."
    )
    fid_steps: list[int] | None = Field(None, description="Step counts of the in-training FID; None = eval.steps.")
    protocol: ProtocolConfig = Field(
        default_factory=ProtocolConfig, description="The full evaluation of the trained model (pipelines.evaluate)."
    )


# ------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Reference:
    """Inception statistics of reference images and their identity: the sha256 of the images as an
    (n, size, size, C) uint8 array (after padding to the model's size), their count and where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    sha256: str
    n: int
    size: int
    source: str

    @property
    def identity(self) -> dict:
        return {"sha256": self.sha256, "n": self.n, "size": self.size, "source": self.source}


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad (N, h, w, C) uint8 with black to (N, size, size, C): the same padding the training data got
    (data.image_size), so that generated and held-out images live in one domain."""
    n, h, w, c = images.shape
    if h > size or w > size:
        raise ValueError(f"held-out images are {h}x{w}, larger than the model's {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def _cache_stem(paths: list[str], n_ref: int, size: int) -> Path:
    """Next to local shards; remote shards cache under ~/.cache/fewstep/fid/<hash of their location>/."""
    where = Path(paths[0]).parent
    if is_remote(paths[0]):
        key = hashlib.sha256(paths[0].rsplit("/", 1)[0].encode()).hexdigest()[:16]
        where = Path.home() / ".cache" / "fewstep" / "fid" / key
    return where / f"fid_stats_{n_ref or 'all'}_{size}px"


def reference_of(
    shards: str | list[str], n_ref: int, size: int, extract: FeaturePool | InceptionFeatures | None = None,
) -> Reference:
    """The statistics of the first n_ref images of `shards` (0 = all) padded to `size`, with their sha256.

    Cached next to the shards as fid_stats_<n>_<size>px.npz (mu, sigma) + .json (sha256, n, size, source): a
    cache with its .json is returned as is (delete both to recompute); statistics without a .json (written by an
    older fewstep) get their .json from one read of the images. `extract`: a FeaturePool (actors) or an
    InceptionFeatures (this process)."""
    paths = resolve_shards(shards) if isinstance(shards, str) else [str(p) for p in shards]
    source = shards if isinstance(shards, str) else str(Path(paths[0]).parent)
    stem = _cache_stem(paths, n_ref, size)
    npz, meta = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if npz.is_file() and meta.is_file():
        ident = json.loads(meta.read_text())
        with np.load(npz, allow_pickle=False) as f:
            return Reference(f["mu"], f["sigma"], ident["sha256"], int(ident["n"]), int(ident["size"]),
                             ident["source"])
    digest, count = hashlib.sha256(), 0

    def blocks() -> Iterator[np.ndarray]:
        nonlocal count
        samples = iter_samples(paths, require_cls=False)
        if n_ref:
            samples = itertools.islice(samples, n_ref)
        while chunk := [s["image"] for s in itertools.islice(samples, REF_BLOCK)]:
            if n_ref and len(chunk) < min(REF_BLOCK, n_ref - count):
                count += len(chunk)
                break  # the shards ran out before n_ref: refuse before featurising this block
            block = np.ascontiguousarray(pad_to(np.stack(chunk), size))
            digest.update(block.tobytes())
            count += len(block)
            yield block
        if n_ref and count < n_ref:
            raise ValueError(f"{source} holds {count} images, fewer than the {n_ref} reference images asked for")

    if npz.is_file():  # statistics from before reference hashes: hash the images, keep the statistics
        for _ in blocks():
            pass
        with np.load(npz, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    else:
        if isinstance(extract, FeaturePool):
            moments = extract.image_moments(blocks(), total=n_ref or None)
        else:
            features, moments = extract or default_features(), Moments()
            for block in blocks():
                moments.add(features(block))
        mu, sigma = moments.stats()
    ref = Reference(mu, sigma, digest.hexdigest(), count, size, source)
    npz.parent.mkdir(parents=True, exist_ok=True)
    if not npz.is_file():
        write_atomic(npz, lambda f: np.savez(f, mu=mu, sigma=sigma))  # no half cache, no writers' collision
    write_atomic(meta, lambda f: f.write((json.dumps(ref.identity, indent=2) + "\n").encode()))
    return ref


def heldout_reference(
    shards: str | list[str], n_ref: int, size: int, features: InceptionFeatures
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of reference_of, in this process: what the in-training FID and the benchmarks compare to."""
    ref = reference_of(shards, n_ref, size, features)
    return ref.mu, ref.sigma


# ------------------------------------------------------------------------------------------- in training


def fid_per_steps(
    sample: Callable[[int], np.ndarray],
    steps: list[int],
    reference: tuple[np.ndarray, np.ndarray],
    features: InceptionFeatures,
) -> dict[int, float]:
    """{k: FID of sample(k) against the reference (mu, sigma)}; sample(k) -> (n, H, W, C) uint8 in k steps."""
    return {k: frechet_distance(*stats(features(sample(k))), *reference) for k in steps}


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """Class-balanced labels 0, 1, ..., K-1, 0, ... (or 0..n-1 for an unconditional model's index column)."""
    return (np.arange(n) % num_classes if num_classes else np.arange(n)).astype(np.int64)


class TrainingFID:
    """Rank 0's periodic FID of the EMA generator: eval.fid_n class-balanced samples per step count against
    eval.fid_n_ref held-out images (statistics loaded or computed on first use, cached next to the shards);
    `reference.sha256` identifies them once the first FID is computed."""

    def __init__(self, cfg: TrainConfig, reference_shards: list[str]):
        self.cfg = cfg
        self.shards = reference_shards
        self.features = InceptionFeatures()  # the worker already set torch's thread count
        self.reference: Reference | None = None

    def __call__(self, gen: Generator) -> dict[int, float]:
        e = self.cfg.eval
        if self.reference is None:
            self.reference = reference_of(self.shards, e.fid_n_ref, self.cfg.data.image_size, self.features)
        labels = balanced_labels(e.fid_n, self.cfg.network.num_classes) if gen.conditional else None
        return fid_per_steps(
            lambda k: gen.generate(e.fid_n, num_steps=k, seed=0, labels=labels),
            e.fid_steps or self.cfg.eval.steps, (self.reference.mu, self.reference.sigma), self.features,
        )


# ------------------------------------------------------------------------------------------- full evaluation

def load_model(source, label: str | None = None, tracking_uri: str | None = None) -> tuple[Generator, ModelInfo]:
    """A Generator and where it came from: `models:/NAME@ALIAS|VERSION` (an alias is pinned to its version now),
    `runs:/RUN_ID/model`, a model directory (weights.safetensors + config.yaml, or its model/ / artifacts/model/),
    or a Generator as is. Weights are read from safetensors, never unpickled."""
    from fewstep import modelref, teacher
    from fewstep.generator import Generator

    if isinstance(source, Generator):
        return source, ModelInfo(label or "generator")
    ref = str(source)
    if modelref.is_registry_uri(ref):
        ref = teacher.pin(ref, tracking_uri, field="model")  # every actor evaluates this version
    with tempfile.TemporaryDirectory() as d:
        if ref.startswith("runs:/"):
            import mlflow.artifacts

            path = mlflow.artifacts.download_artifacts(f"{ref.rstrip('/')}/artifacts/model", dst_path=d,
                                                       tracking_uri=tracking_uri)
            return Generator.from_dir(path), ModelInfo(label or ref, ref, run_id=ref.split("/")[1])
        path = teacher.model_dir(ref, tracking_uri, d, field="model")
        gen = Generator.from_dir(path)
    if not modelref.is_registry_uri(ref):
        return gen, ModelInfo(label or ref, str(path))
    r = modelref.parse(ref)
    run_id = modelref.client(tracking_uri).get_model_version(r.name, r.version).run_id
    return gen, ModelInfo(label or str(source), ref, r.name, str(r.version), run_id)


def evaluate_generators(
    models: Mapping[str, object] | Sequence[object],
    steps: Sequence[int],
    n: int,
    reference: str | list[str] | Reference,
    n_ref: int = 2000,
    seeds: int | Sequence[int] = 3,
    num_workers: int = 0,
    use_gpu: bool | None = None,
    sampler: str | None = None,
    seed_block: int = SEED_BLOCK,
    progress: bool = True,
    tracking_uri: str | None = None,
) -> FIDTable:
    """FID of every model at every step count under every seed, as an FIDTable (mean, std, min per row).

    models: {label: source} or [source, ...]; a source is a Generator, a model directory, `models:/...` or
    `runs:/.../model` (see load_model). All models must have the same image size.
    steps: sampling step counts; n: generated images per step count and seed (class-balanced labels).
    reference: shards (a spec or .tar paths) whose first n_ref images (0 = all) give the statistics, cached next
    to them (reference_of), or a Reference already computed. seeds: K (= seeds 0..K-1) or the seeds themselves.
    num_workers: 0 = this process, else that many Ray actors (GPUs when use_gpu, default: when the cluster has
    them); the same seeds give the same samples whatever the split (fewstep.fid_pool). sampler: None = each
    model's default. progress: a tqdm bar with ETA on stderr.
    Compare two tables only through fewstep.fid_table.check_comparable / compare (same reference sha256, same n).
    """
    from fewstep.generator import Generator

    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if not items:
        raise ValueError("evaluate_generators needs at least one model")
    loaded = [load_model(src, label or (f"generator{i}" if isinstance(src, Generator) else None), tracking_uri)
              for i, (label, src) in enumerate(items)]
    return evaluate_loaded(loaded, steps, n, reference, n_ref, seeds, num_workers, use_gpu, sampler, seed_block,
                           progress)


def evaluate_loaded(
    loaded: list[tuple[Generator, ModelInfo]], steps: Sequence[int], n: int, reference: str | list[str] | Reference,
    n_ref: int, seeds: int | Sequence[int], num_workers: int = 0, use_gpu: bool | None = None,
    sampler: str | None = None, seed_block: int = SEED_BLOCK, progress: bool = True,
) -> FIDTable:
    """evaluate_generators on models already loaded (load_model)."""
    gens = [g for g, _ in loaded]
    infos = {info.label: info for _, info in loaded}
    if len(infos) != len(loaded):
        raise ValueError(f"two models have the same label: {[info.label for _, info in loaded]}")
    sizes = {info.label: g.cfg.data.image_size for g, info in loaded}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the models' image sizes differ ({sizes}): one reference cannot serve them all")
    for g, _ in loaded:
        g.check_sampler(sampler)
        for k in steps:
            g.capabilities.steps.check(k, g.capabilities.steps_reason)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or n < 2:
        raise ValueError(f"need at least one seed and n >= 2 samples, got seeds={seeds} n={n}")
    size = next(iter(sizes.values()))
    if isinstance(reference, Reference) and reference.size != size:
        raise ValueError(f"the reference statistics are of {reference.size}px images, the models make {size}px")
    with FeaturePool(gens, num_workers, use_gpu, progress=progress) as pool:
        ref = reference if isinstance(reference, Reference) else reference_of(reference, n_ref, size, pool)
        jobs = [SampleJob(i, k, s, n) for i in range(len(gens)) for k in steps for s in seed_list]
        fids = {job: frechet_distance(*m.stats(), ref.mu, ref.sigma)
                for job, m in pool.sample_moments(jobs, seed_block, sampler)}
    labels = [info.label for _, info in loaded]
    rows = [FIDRow(labels[i], k, [fids[SampleJob(i, k, s, n)] for s in seed_list])
            for i in range(len(gens)) for k in steps]
    return FIDTable(rows, n, seed_list, ref.identity, sampler, seed_block, infos)


@dataclass
class Evaluation:
    fid: dict[int, float]  # steps -> mean FID over the seeds
    table: FIDTable
    n: int
    n_ref: int
    name: str | None
    version: str | None
    run_id: str | None


def evaluate(
    uri: str, steps: list[int], *, n: int | None = None, reference_shards: str | None = None, n_ref: int | None = None,
    seeds: int | None = None, seed: int = 0, log: bool = True, sampler: str | None = None,
    num_workers: int | None = None, use_gpu: bool | None = None, progress: bool = True,
) -> Evaluation:
    """FID of one model (registry URI, runs:/ URI or directory) at each step count over seeds seed..seed+K-1;
    every None takes the model's eval.protocol (reference_shards: its data.test_shards, or data.shards for
    protocol.reference=train). Logged (`record`) when the model is a registered version or a run. `sampler`
    (ddim | addim | ict) overrides the model's default and suffixes the logged names (fid_steps_<k>_<sampler>)."""
    gen, info = load_model(uri)
    p = gen.cfg.eval.protocol
    if reference_shards is None:
        reference_shards = gen.cfg.data.shards if p.reference == "train" else gen.cfg.data.test_shards
        if not reference_shards:
            raise ValueError(f"the model's config has no data.{'shards' if p.reference == 'train' else 'test_shards'}"
                             ": give the reference shards")
    k = p.seeds if seeds is None else seeds
    table = evaluate_loaded(
        [(gen, info)], steps, p.n if n is None else n, reference_shards,
        p.n_ref if n_ref is None else n_ref, list(range(seed, seed + k)),
        p.num_workers if num_workers is None else num_workers, p.use_gpu if use_gpu is None else use_gpu,
        sampler, progress=progress,
    )
    if log and info.run_id:
        record(table, info.label, suffix=f"_{sampler}" if sampler else "")
    return Evaluation({r.steps: r.mean for r in table.rows}, table, table.n, table.reference["n"], info.name,
                      info.version, info.run_id)


def record(table: FIDTable, model: str, suffix: str = "") -> None:
    """Log one model's rows to its run and registered version: run metrics fid_steps_<k> (the mean),
    fid_std_steps_<k>, fid_min_steps_<k>; version tags fid_steps_<k> = "mean ± std"; the protocol (samples,
    seeds, reference n, source and sha256) as tags of both; the table as evaluation/fid.json and a FID-vs-steps
    plot with error bars as evaluation/fid_vs_steps.png (names suffixed with `suffix`)."""
    from mlflow.tracking import MlflowClient

    from fewstep.fid_table import plot

    info, rows = table.models[model], table.only(model)
    client = MlflowClient()
    protocol = {
        f"fid_protocol{suffix}": table.protocol(),
        f"fid_reference_sha256{suffix}": table.reference["sha256"],
        f"fid_reference_n{suffix}": str(table.reference["n"]),
        f"fid_n{suffix}": str(table.n),
        f"fid_seeds{suffix}": ",".join(str(s) for s in table.seeds),
        "fid_samples": f"{table.n} generated vs {table.reference['n']} reference images, {len(table.seeds)} seeds",
    }
    for r in rows.rows:
        for key, v in ((f"fid_steps_{r.steps}", r.mean), (f"fid_std_steps_{r.steps}", r.std),
                       (f"fid_min_steps_{r.steps}", r.min)):
            client.log_metric(info.run_id, f"{key}{suffix}", v)
    for key, v in protocol.items():
        client.set_tag(info.run_id, key, v)
    if info.name and info.version:
        for r in rows.rows:
            client.set_model_version_tag(info.name, info.version, f"fid_steps_{r.steps}{suffix}", r.summary())
        for key, v in protocol.items():
            client.set_model_version_tag(info.name, info.version, key, v)
    title = f"{info.name} v{info.version}" if info.name else model
    with tempfile.TemporaryDirectory() as d:
        files = [rows.save(Path(d) / f"fid{suffix}.json"),
                 plot(rows, Path(d) / f"fid_vs_steps{suffix}.png", f"{title} (n={table.n}, {len(table.seeds)} seeds)")]
        for f in files:
            client.log_artifact(info.run_id, str(f), "evaluation")
