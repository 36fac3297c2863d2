"""Sampling and Inception features for FID, in this process or spread over Ray actors.

The noise does not depend on how the work is split. Sample i of seed s belongs to block b = i // seed_block,
and block b is generated on its own from a torch generator seeded with SeedSequence([s, b]) (initial noise and
any noise a multistep sampler draws), with class label i mod num_classes (text-to-image: prompt
text.eval_prompts[i mod len]). Workers take whole blocks, so one process or any number of actors produce the
same images, and every step count and every model sees the same noise for the same (seed, i).

`FeaturePool(num_workers=0)` runs everything here; `num_workers >= 1` starts that many Ray actors (a GPU each
when `use_gpu`, or by default when the cluster has GPUs), hands them the models as safetensors bytes, and feeds
them blocks as they finish. Results come back as Inception features merged into `Moments`, with a progress bar
(tqdm) whose ETA counts images.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from fewstep.fid import InceptionFeatures, Moments

if TYPE_CHECKING:  # fewstep.config imports this module's user (evaluation): config-side imports stay lazy
    from fewstep.generator import Generator

SEED_BLOCK = 50  # samples per noise block: part of the protocol (the noise of sample i depends on it)


def block_seed(seed: int, block: int) -> int:
    """The torch seed of noise block `block` under evaluation seed `seed`."""
    return int(np.random.SeedSequence([int(seed), int(block)]).generate_state(1, np.uint32)[0])


def eval_labels(gen: Generator, index: np.ndarray) -> np.ndarray | None:
    """Labels of the samples with these global indices: balanced classes (i mod K), prompt indices for
    text-to-image models (Generator.prompts maps i -> text.eval_prompts[i mod len]), None if unconditional."""
    k = gen.cfg.network.num_classes
    if k:
        return (index % k).astype(np.int64)
    return index.astype(np.int64) if gen.text else None


def sample_blocks(gen: Generator, steps: int, seed: int, n: int, blocks: range, seed_block: int = SEED_BLOCK,
                  sampler: str | None = None) -> np.ndarray:
    """Samples of blocks `blocks` (of a set of n) in `steps` steps as (m, H, W, C) uint8; see the module doc."""
    out = []
    for b in blocks:
        index = np.arange(b * seed_block, min(n, (b + 1) * seed_block))
        out.append(gen.generate(len(index), num_steps=steps, seed=block_seed(seed, b),
                                labels=eval_labels(gen, index), batch=seed_block, sampler=sampler))
    return np.concatenate(out)


@dataclass(frozen=True)
class SampleJob:
    """n samples of model `model` (an index into the pool's models) in `steps` steps under seed `seed`."""

    model: int
    steps: int
    seed: int
    n: int


def to_payload(gen: Generator) -> tuple[str, bytes]:
    """(config YAML, safetensors bytes of the weights): how a model travels to an actor, never pickled."""
    from fewstep.config import to_yaml

    state = {k: v.detach().float().contiguous().cpu() for k, v in gen.model.state_dict().items()}
    return to_yaml(gen.cfg), save_safetensors(state)


def from_payload(payload: tuple[str, bytes], device: str) -> Generator:
    from fewstep.config import build_config
    from fewstep.generator import Generator
    from fewstep.objectives import build_model

    cfg = build_config(yaml.safe_load(payload[0]), source="evaluated model config")
    model = build_model(cfg)
    model.load_state_dict(load_safetensors(payload[1]))
    return Generator(model.to(device).eval(), cfg)


class Extractor:
    """Generates blocks and extracts their Inception features; one per actor, or one in this process. `models`
    are Generators (in process) or Ray object refs of payloads (in an actor); only the last one used is kept."""

    def __init__(self, models: Sequence[Any], device: str | None = None, threads: int | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads:  # an actor owns its process: generation and features on its reserved CPUs
            torch.set_num_threads(threads)
        self.models = list(models)
        self.features = InceptionFeatures(device=self.device)
        self._loaded: tuple[int, Generator] | None = None

    def generator(self, i: int) -> Generator:
        from fewstep.generator import Generator

        if isinstance(self.models[i], Generator):
            return self.models[i]
        if self._loaded is None or self._loaded[0] != i:
            import ray

            self._loaded = None  # free the previous model first
            self._loaded = (i, from_payload(ray.get(self.models[i]), self.device))
        return self._loaded[1]

    def sample_features(self, job: SampleJob, blocks: range, seed_block: int, sampler: str | None) -> np.ndarray:
        images = sample_blocks(self.generator(job.model), job.steps, job.seed, job.n, blocks, seed_block, sampler)
        return self.image_features(images)

    def image_features(self, images: np.ndarray) -> np.ndarray:
        return self.features(images)


class FeaturePool:
    """Where FID work runs: this process (num_workers=0) or `num_workers` Ray actors (see the module doc)."""

    def __init__(self, models: Sequence[Generator], num_workers: int = 0, use_gpu: bool | None = None,
                 cpus_per_worker: float = 1.0, progress: bool = True):
        self.num_workers, self.progress, self.actors = num_workers, progress, []
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_workers == 0:
            if use_gpu and not torch.cuda.is_available():
                raise ValueError("use_gpu: this process sees no GPU")
            device = "cuda" if use_gpu or (use_gpu is None and torch.cuda.is_available()) else None
            self.local: Extractor | None = Extractor([_on(g, device) for g in models], device=device or
                                                     _device_of(models))
            return
        import ray

        from fewstep.engine import connect_ray

        connect_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu is None:
            use_gpu = gpus >= 1
        if use_gpu and gpus < 1:
            raise ValueError("use_gpu: the Ray cluster has no GPUs")
        self.local = None
        refs = [ray.put(to_payload(g)) for g in models]
        actor = ray.remote(Extractor).options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0)
        threads = max(1, int(cpus_per_worker))
        self.actors = [actor.remote(refs, device="cuda" if use_gpu else "cpu", threads=threads)
                       for _ in range(num_workers)]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> FeaturePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, tasks: Iterable[tuple[Any, str, tuple, int]], total: int | None,
             desc: str) -> Iterator[tuple[Any, Any]]:
        """tasks: (key, Extractor method, args, images) -> (key, result) as they finish (any order)."""
        bar = tqdm(total=total, desc=desc, unit="img", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            if self.local is not None:
                for key, method, args, count in tasks:
                    yield key, getattr(self.local, method)(*args)
                    bar.update(count)
                return
            import ray

            it, pending = iter(tasks), {}
            free = [a for a in self.actors for _ in range(2)]  # two calls in flight per actor
            while True:
                while free and (task := next(it, None)) is not None:
                    key, method, args, count = task
                    a = free.pop()
                    pending[getattr(a, method).remote(*args)] = (key, count, a)
                if not pending:
                    return
                (done,), _ = ray.wait(list(pending), num_returns=1)
                key, count, a = pending.pop(done)
                free.append(a)
                yield key, ray.get(done)
                bar.update(count)
        finally:
            bar.close()

    def image_moments(self, blocks: Iterable[np.ndarray], total: int | None,
                      desc: str = "reference features") -> Moments:
        """Moments of the Inception features of a stream of (m, H, W, C) uint8 image blocks."""
        import ray

        def tasks():
            for i, block in enumerate(blocks):
                yield i, "image_features", (block if self.local is not None else ray.put(block),), len(block)

        moments = Moments()
        for _, feats in self._run(tasks(), total, desc):
            moments.add(feats)
        return moments

    def sample_moments(self, jobs: Sequence[SampleJob], seed_block: int = SEED_BLOCK, sampler: str | None = None,
                       desc: str = "FID samples") -> Iterator[tuple[SampleJob, Moments]]:
        """(job, Moments of its samples' Inception features) as each job completes. Jobs are split into runs of
        whole blocks, handed out job by job, so only the jobs in flight hold a D x D accumulator."""
        left = {job: job.n for job in jobs}
        moments: dict[SampleJob, Moments] = {}

        def tasks():
            for job in jobs:
                nb = math.ceil(job.n / seed_block)
                per = max(1, min(math.ceil(nb / (4 * max(1, self.num_workers))), max(1, 500 // seed_block)))
                for b0 in range(0, nb, per):
                    blocks = range(b0, min(nb, b0 + per))
                    count = min(job.n, blocks.stop * seed_block) - blocks.start * seed_block
                    yield job, "sample_features", (job, blocks, seed_block, sampler), count

        for job, feats in self._run(tasks(), sum(left.values()), desc):
            moments.setdefault(job, Moments()).add(feats)
            left[job] -= len(feats)
            if not left[job]:
                yield job, moments.pop(job)


def _on(gen: Generator, device: str | None) -> Generator:
    """gen on `device` (a copy when it lives elsewhere: the caller's model stays where it is); None = as is."""
    if device is None or next(gen.model.parameters()).device.type == torch.device(device).type:
        return gen
    from fewstep.generator import Generator

    return Generator(copy.deepcopy(gen.model).to(device), gen.cfg)


def _device_of(models: Sequence[Generator]) -> str:
    return str(next(models[0].model.parameters()).device) if models else "cpu"
