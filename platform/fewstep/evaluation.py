"""FID of a registered model across sampling step counts, recorded on the model version and its run."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from fewstep import modelref
from fewstep.data.shards import iter_samples, resolve_shards
from fewstep.fid import InceptionFeatures, frechet_distance, reference_stats, stats

if TYPE_CHECKING:
    from fewstep.config import TrainConfig
    from fewstep.generator import Generator


class EvalConfig(BaseModel):
    """In-training evaluation on rank 0: sample grids, and optionally a small-sample FID per step count."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(1000, ge=1, description="Sample a grid from the EMA model every N steps (and at the end).")
    grid_size: int = Field(8, ge=1, description="Grid is grid_size x grid_size images.")
    steps: list[int] = Field(default_factory=lambda: [1, 2], description="Sampling step counts shown.")
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
    fid_steps: list[int] | None = Field(None, description="Step counts evaluated; None = eval.steps.")


@dataclass
class Evaluation:
    fid: dict[int, float]  # steps -> FID
    n: int
    n_ref: int
    name: str | None
    version: str | None
    run_id: str | None


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad (N, h, w, C) uint8 with black to (N, size, size, C): the same padding the training data got
    (data.image_size), so that generated and held-out images live in one domain."""
    n, h, w, c = images.shape
    if h > size or w > size:
        raise ValueError(f"held-out images are {h}x{w}, larger than the model's {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def heldout_reference(
    shards: str | list[str], n_ref: int, size: int, features: InceptionFeatures
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the first n_ref held-out images padded to `size`, cached next to the shards;
    the shards are read only when the cache is missing (reference_stats consumes the generator lazily).
    `shards`: a shard spec (resolve_shards) or a list of .tar paths."""
    paths = resolve_shards(shards) if isinstance(shards, str) else [str(p) for p in shards]
    cache = Path(paths[0]).parent / f"fid_stats_{n_ref}_{size}px.npz"

    def batches():
        samples = itertools.islice(iter_samples(paths, require_cls=False), n_ref)
        images = np.stack([s["image"] for s in samples])
        if len(images) < n_ref:
            raise ValueError(f"{shards} holds {len(images)} images, fewer than --n-ref {n_ref}")
        yield pad_to(images, size)

    return reference_stats(batches(), cache, features)


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
    eval.fid_n_ref held-out images (statistics loaded or computed on first use, cached next to the shards)."""

    def __init__(self, cfg: TrainConfig, reference_shards: list[str]):
        self.cfg = cfg
        self.shards = reference_shards
        self.features = InceptionFeatures()  # the worker already set torch's thread count
        self.reference: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, gen: Generator) -> dict[int, float]:
        e = self.cfg.eval
        if self.reference is None:
            self.reference = heldout_reference(self.shards, e.fid_n_ref, self.cfg.data.image_size, self.features)
        labels = balanced_labels(e.fid_n, self.cfg.network.num_classes) if gen.conditional else None
        return fid_per_steps(
            lambda k: gen.generate(e.fid_n, num_steps=k, seed=0, labels=labels),
            e.fid_steps or self.cfg.eval.steps, self.reference, self.features,
        )


def evaluate(
    uri: str, steps: list[int], n: int, reference_shards: str, n_ref: int, seed: int = 0, log: bool = True,
    sampler: str | None = None,
) -> Evaluation:
    """FID of a registered model at each step count; `sampler` (ddim | addim | ict) overrides the model's default
    and suffixes the logged names (fid_steps_<k>_<sampler>) so runs of different samplers do not overwrite."""
    features = InceptionFeatures()
    model = mlflow.pyfunc.load_model(uri)
    size = model.metadata.get_output_schema().inputs[0].shape[1]  # (-1, H, W, C)
    mu_ref, sigma_ref = heldout_reference(reference_shards, n_ref, size, features)
    meta = model.metadata.metadata or {}
    k = int(meta.get("num_classes", 0))
    column = "class_label" if k else "index"
    frame = pd.DataFrame({column: balanced_labels(n, k)})
    extra = {"sampler": sampler} if sampler else {}
    fid = fid_per_steps(
        lambda s: model.predict(frame, params={"num_steps": s, "seed": seed, **extra}),
        steps, (mu_ref, sigma_ref), features,
    )
    found = modelref.version_of(uri)
    name, version = found if found else (None, None)
    run_id = MlflowClient().get_model_version(name, version).run_id if found else None
    if log and run_id:
        record(fid, n, n_ref, name, version, run_id, suffix=f"_{sampler}" if sampler else "")
    return Evaluation(fid, n, n_ref, name, version, run_id)


def record(fid: dict[int, float], n: int, n_ref: int, name: str, version: str, run_id: str, suffix: str = "") -> None:
    """fid_steps_<k> as metrics of the version's run and as version tags, plus a FID-vs-steps plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    for s, v in fid.items():
        client.log_metric(run_id, f"fid_steps_{s}{suffix}", v)
        client.set_model_version_tag(name, version, f"fid_steps_{s}{suffix}", f"{v:.3f}")
    client.set_model_version_tag(name, version, "fid_samples", f"{n} generated vs {n_ref} held-out")
    fig, ax = plt.subplots(figsize=(4, 3))
    xs = sorted(fid)
    ax.plot(xs, [fid[s] for s in xs], marker="o")
    ax.set(xscale="log", xlabel="sampling steps", ylabel="FID", title=f"{name} v{version} (n={n})")
    ax.set_xticks(xs, [str(s) for s in xs])
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        fig.savefig(Path(d) / f"fid_vs_steps{suffix}.png", dpi=100)
        client.log_artifact(run_id, str(Path(d) / f"fid_vs_steps{suffix}.png"), "evaluation")
    plt.close(fig)
