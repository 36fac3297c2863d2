"""FID: the Frechet distance's math, the Inception pipeline on real Fashion-MNIST, and the stats cache.

Inception-v3 at 299x299 runs at ~6.6 images/s on 2 idle CPU threads (0.7/s on a box loaded by other jobs), so
the real-image tests share one module-scoped set of features of 104 images (~20 s idle, minutes when loaded).
"""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep import fid

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_test_images() -> np.ndarray:
    """(10000, 28, 28, 1) uint8 from the idx file (16-byte header)."""
    if not FMNIST_TEST.is_file():
        pytest.skip(f"{FMNIST_TEST} missing (apt-get install dataset-fashion-mnist)")
    raw = gzip.open(FMNIST_TEST).read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)


def box_blur(images: np.ndarray, k: int) -> np.ndarray:
    """Separable k x k box blur of (N, H, W, 1) uint8, edge-padded."""
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)  # (N, 1, H, W)
    x = torch.nn.functional.pad(x, (k // 2,) * 4, mode="replicate")
    x = torch.nn.functional.avg_pool2d(x, k, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_psd(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, rank))
    return a @ a.T / rank


# ---- Frechet distance math (no network) ----


def test_frechet_1d_closed_form():
    # 1-D Gaussians: d^2 = (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
    d = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert d == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


@pytest.mark.parametrize("rank", [64, 20])  # full rank, and singular like (N < D) feature covariances
def test_eigh_matches_sqrtm(rank):
    rng = np.random.default_rng(rank)
    s1, s2 = random_psd(64, rank, rng), random_psd(64, rank, rng)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    fast = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    ref = fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert fast == pytest.approx(ref, rel=1e-6, abs=1e-6)
    # ~1e-6 of round-off: sqrt of the ~1e-16-sized eigenvalues of the null space
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-5


def test_frechet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---- preprocessing ----


def test_preprocess_matches_reference_convention():
    # fid-helper's defaults: TF bilinear to 299, range [-1, 0.9921875] = uint8 / 128 - 1, gray -> 3 channels.
    feats = fid.InceptionFeatures()
    img = np.zeros((2, 28, 28, 1), np.uint8)
    img[0] = 255
    x = feats.preprocess(img)
    assert x.shape == (2, 3, 299, 299)
    assert x[0].min().item() == pytest.approx(255 / 128 - 1) and x[1].max().item() == -1.0
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 1, 1))[None]  # (1, 32, 32, 1)
    y = feats.preprocess(ramp)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert y.min().item() >= -1.0 and y.max().item() <= 255 / 128 - 1 + 1e-6
    assert (y[0, 0, 150].diff() >= -1e-6).all()  # resizing a ramp keeps it monotone


def test_features_reject_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        fid.InceptionFeatures()(np.zeros((2, 1, 28, 28), np.float32))


# ---- real images through Inception ----


@pytest.fixture(scope="module")
def real_features():
    """Features of two disjoint sets of real test images, uniform noise, and heavily blurred real images."""
    images = fashion_test_images()
    rng = np.random.default_rng(0)
    sets = {
        "a": images[:40],
        "b": images[5000:5040],
        "noise": rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8),
        "blur": box_blur(images[:12], 9),
    }
    extractor = fid.InceptionFeatures(batch_size=32, threads=2)
    n = sum(len(v) for v in sets.values())
    t0 = time.perf_counter()
    feats = {k: extractor(v) for k, v in sets.items()}
    rate = n / (time.perf_counter() - t0)
    print(f"\nInception features: {n} images at {rate:.1f} img/s (incl. one-time load)")
    return feats


def test_features_shape_and_dtype(real_features):
    a = real_features["a"]
    assert a.shape == (40, fid.FEATURE_DIM) and a.dtype == np.float64
    assert np.isfinite(a).all() and (a >= 0).all()  # pool features after ReLU


def test_fid_of_a_set_with_itself_is_zero(real_features):
    mu, sigma = fid.stats(real_features["a"])
    # Exact in math; the eigh route leaves ~1e-9 of round-off at feature scale ~Tr(sigma) ~ 1e2.
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_fid_orders_real_blur_noise(real_features):
    real = fid.stats(real_features["a"])
    d_real = fid.frechet_distance(*real, *fid.stats(real_features["b"]))
    d_blur = fid.frechet_distance(*real, *fid.stats(real_features["blur"]))
    d_noise = fid.frechet_distance(*real, *fid.stats(real_features["noise"]))
    print(f"FID real-vs-real {d_real:.1f}, vs blurred {d_blur:.1f}, vs noise {d_noise:.1f}")
    # Small-N FID has a large positive bias (measured: real 148, blurred 303, noise 458 at N=40/12/12), so the
    # claim is about the order and a clear margin, not absolute values.
    assert d_blur > 1.5 * d_real and d_noise > 2.5 * d_real


# ---- fid() and the reference-stats cache (a counting stub stands in for Inception) ----


class CountingFeatures:
    """Cheap stand-in: per-image channel statistics, and a count of images seen."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.seen += len(images)
        x = images.reshape(len(images), -1).astype(np.float64)
        return np.stack([x.mean(1), x.std(1), x[:, ::7].mean(1)], axis=1)


def test_fid_end_to_end_with_stub():
    images = fashion_test_images()[:50]
    stub = CountingFeatures()
    assert fid.fid(images, images, features=stub) == pytest.approx(0.0, abs=1e-8)
    assert stub.seen == 100
    assert fid.fid(images, 255 - images, features=stub) > 1.0


def test_reference_stats_are_cached(tmp_path):
    images = fashion_test_images()[:64]
    cache = tmp_path / "ref" / "stats.npz"
    stub = CountingFeatures()
    mu, sigma = fid.reference_stats(iter([images[:32], images[32:]]), cache, features=stub)
    assert stub.seen == 64 and cache.is_file()
    mtime = cache.stat().st_mtime_ns
    mu2, sigma2 = fid.reference_stats(images, cache, features=stub)
    assert stub.seen == 64, "second call recomputed instead of reading the cache"
    assert cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert sigma.shape == (3, 3)


def test_concurrent_writers_of_one_reference_cache_do_not_collide(tmp_path):
    """Two sweep trials computing the same held-out statistics at once once raced on one temporary file."""
    from concurrent.futures import ThreadPoolExecutor

    images = fashion_test_images()[:64]
    cache = tmp_path / "stats.npz"
    barrier = threading.Barrier(4)

    def write(_):
        stub = CountingFeatures()

        def features(x):  # every writer computes before any of them renames: the collision window, held open
            barrier.wait(timeout=30)
            return stub(x)

        return fid.reference_stats(images, cache, features=features)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(write, range(4)))
    for mu, sigma in results[1:]:
        np.testing.assert_array_equal(mu, results[0][0])
        np.testing.assert_array_equal(sigma, results[0][1])
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary file left behind


def test_reference_images_are_padded_like_the_training_data():
    from fewstep.evaluation import pad_to

    img = np.full((2, 28, 28, 1), 200, np.uint8)
    out = pad_to(img, 32)
    assert out.shape == (2, 32, 32, 1)
    assert out[:, :2].max() == 0 and out[:, 30:].max() == 0 and out[:, 2:30, 2:30].min() == 200
    with pytest.raises(ValueError, match="larger than"):
        pad_to(np.zeros((1, 40, 40, 1), np.uint8), 32)
