"""Text-to-image on Fashion-MNIST, measured: prompt adherence and FID of a text diffusion teacher vs its students.

    python -m pipelines.bench t2i --teacher models:/fewstep-fashion-t2i-diffusion@champion \\
        --student s4=models:/fewstep-fashion-t2i-mcd@champion --student s8=outputs/RUN/model \\
        [--teacher-steps 16 --guidance 1,2 --per-class 50 --fid-n 500 --ref-n 1000 --epochs 3 --threads 2]

1. trains a small CNN classifier on the Fashion-MNIST train split (32x32 padded, `--epochs`) and reports its test
   accuracy: the judge of prompt adherence;
2. for every model (a registry URI, resolved with $MLFLOW_TRACKING_URI, or a model directory / run output dir),
   generates `--per-class` images from the prompt "a photo of a CLASS" for each of the 10 classes and reports
   adherence = the classifier's accuracy on them (chance: 10%), plus Inception FID of `--fid-n` images (prompts
   cycling through the classes) against the first `--ref-n` test images (fewstep.fid, cached reference).
The teacher is sampled at `--teacher-steps` DDIM steps once per `--guidance` value; a student at its S steps.
Results: a table on stdout and `--out`/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep import fid
from fewstep import teacher as teachers
from fewstep.data.sources import FASHION_MNIST_CLASSES, caption
from fewstep.generator import Generator
from fewstep.tracking import resolve_uri

REF_CACHE = Path("outputs/bench_t2i")


def load_fashion(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (N, 1, 32, 32) float in [-1, 1] (28x28 padded with -1) and (N,) int64 labels: the judge
    classifier's data (the generators themselves train from shards)."""
    from fewstep.data.sources import fashion_mnist

    samples = list(fashion_mnist("train" if split == "train" else "test"))
    images = np.stack([s["image"].reshape(28, 28) for s in samples])[:, None]  # (N, 1, 28, 28) uint8
    x = torch.nn.functional.pad(torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0), (2, 2, 2, 2), value=-1.0)
    return x, torch.tensor([s["cls"] for s in samples], dtype=torch.int64)


def ref_stats(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the first n test images as the models see them (32x32, padded with black)."""
    from fewstep.data.sources import fashion_mnist

    images = np.stack([s["image"].reshape(28, 28, 1) for s in itertools.islice(fashion_mnist("test"), n)])
    return fid.reference_stats(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), REF_CACHE / f"ref_test{n}_32.npz")


PROMPTS = [caption(c) for c in FASHION_MNIST_CLASSES]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench t2i", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the text diffusion model: models:/NAME@ALIAS or a directory")
    p.add_argument("--student", action="append", default=[], metavar="NAME=REF", help="a distilled student")
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--guidance", default="1", help="comma-separated guidance values w for the teacher")
    p.add_argument("--per-class", type=int, default=50, help="images per class prompt for adherence")
    p.add_argument("--fid-n", type=int, default=500)
    p.add_argument("--ref-n", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="classifier training epochs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_t2i"))
    return p.parse_args(argv)


def classifier() -> nn.Module:
    """(N, 1, 32, 32) in [-1, 1] -> (N, 10) logits; ~30k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_classifier(epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    x, y = load_fashion("train")
    net, gen = classifier(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = load_fashion("test")
    return net.eval(), accuracy(net, xt, yt)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([net(b).argmax(1) for b in x.split(1000)])
    return float((pred == y).float().mean())


def load(ref: str) -> Generator:
    with tempfile.TemporaryDirectory() as d:
        return Generator.from_dir(teachers.model_dir(ref, resolve_uri(None), d))


def main(argv: list[str]) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net, test_acc = train_classifier(args.epochs)
    print(f"classifier: {args.epochs} epochs on the train split, test accuracy {test_acc:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    reference = ref_stats(args.ref_n)
    features = fid.InceptionFeatures(threads=args.threads, progress=True)
    runs = [(f"teacher w={w} ({args.teacher_steps} steps)", args.teacher, args.teacher_steps, float(w))
            for w in args.guidance.split(",")]
    for s in args.student:
        name, _, ref = s.partition("=")
        runs.append((name, ref, None, None))
    rows, record = [], {"classifier_test_accuracy": test_acc, "budget": {k: str(v) for k, v in vars(args).items()}}
    loaded: dict[str, Generator] = {}
    for name, ref, steps, w in runs:
        gen = loaded.setdefault(ref, load(ref))
        k = steps or gen.capabilities.steps.default([])
        t = time.perf_counter()
        labels = np.repeat(np.arange(10), args.per_class)
        images = gen.generate(len(labels), num_steps=k, seed=0, labels=[PROMPTS[i] for i in labels], guidance=w)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        adherence = accuracy(net, x, torch.from_numpy(labels))
        fid_images = gen.generate(args.fid_n, num_steps=k, seed=1, labels=[PROMPTS[i % 10] for i in range(args.fid_n)],
                                  guidance=w)
        score = fid.frechet_distance(*fid.stats(features(fid_images)), *reference)
        rows.append({"model": name, "ref": ref, "steps": k, "guidance": w, "adherence": adherence, "fid": score,
                     "eval_s": time.perf_counter() - t})
        record["runs"] = rows
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
        print(f"{name:30s} {k:3d} steps  adherence {adherence:.3f}  FID {score:7.1f}", flush=True)
    print("\n| model | steps | prompt adherence | FID |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['adherence']:.1%} | {r['fid']:.1f} |")
    print(f"(classifier test accuracy {test_acc:.1%}; {args.per_class} images per class prompt; FID {args.fid_n} vs "
          f"{args.ref_n} test images; MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI', '-')})")
