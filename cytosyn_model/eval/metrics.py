"""Metrics between feature sets (rows = samples). All accumulate in float64.

- Frechet distance (exact): ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)),
  the trace from the eigenvalues of the symmetric matrix sqrt(S1) S2 sqrt(S1) (no sqrtm).
- FLD: see :mod:`.fld` (the published algorithm of its authors).
- Precision / recall / density / coverage (prdc, Naeem et al. 2020), k = 5, float64 batched distances.
- KID (torch-fidelity's subsets and polynomial kernel); FD-infinity (Chong & Forsyth 2020).
- Sample-wise cosine similarity; bootstrap (with replacement) mean and standard deviation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from cytosyn_data.io.feature_file import read_rows


# ------------------------------------------------------------------ moments
class RunningMoments:
    """Streaming mean and covariance in float64 (no full feature matrix kept): add(batch [n, d])."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("need at least two samples for a covariance")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def mean_cov(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    m = RunningMoments(x.shape[1])
    for i in range(0, len(x), chunk):
        m.add(read_rows(x, i, i + chunk))
    return m.mean_cov()


# ----------------------------------------------------------------------- FD
def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (float64, symmetric eigen-decompositions)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, s1, s2))
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_scipy(mu1, s1, mu2, s2) -> float:
    """The usual reference (pytorch-fid): scipy.linalg.sqrtm of s1 @ s2."""
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*mean_cov(a), *mean_cov(b))


def fd_infinity(fake: np.ndarray, real_mu: np.ndarray, real_cov: np.ndarray, min_fake: int = 5000,
                num_points: int = 15, seed: int = 0) -> float:
    """FD extrapolated to infinitely many generated samples (Chong & Forsyth 2020), as their
    ``calculate_FID_infinity_path``: for N in ``linspace(min_fake, len(fake), num_points)`` (int32),
    shuffle the generated features in place (``RandomState(seed)``, one shuffle per N, cumulative) and
    take the FD of the first N against the real statistics; fit FD = a + b / N by least squares and
    return a."""
    n = len(fake)
    if n <= min_fake:
        raise ValueError(f"FD-infinity needs more than min_fake = {min_fake} generated samples, got {n}")
    rng = np.random.RandomState(seed)
    x = np.array(fake, dtype=np.float64, copy=True)
    sizes = np.linspace(min_fake, n, num_points).astype("int32")
    fds = []
    for m in sizes:
        rng.shuffle(x)
        mu, cov = x[:m].mean(0), np.cov(x[:m], rowvar=False)
        fds.append(frechet_distance(mu, cov, real_mu, real_cov))
    inv = 1.0 / sizes.astype(np.float64)
    slope, intercept = np.polyfit(inv, np.asarray(fds), 1)
    return float(intercept)


# ---------------------------------------------------------- distances (torch)
def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _sqdist64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(x), len(y)] in float64 (|x|^2 + |y|^2 - 2 x.y, clipped at 0);
    exact for integer-valued features (ties kept)."""
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.T).clamp_min_(0)


def kth_nn_radii(x: torch.Tensor, k: int = 5, chunk: int = 4096) -> torch.Tensor:
    """Distance (float64) of each row to its k-th nearest neighbour, the row itself being the 0-th
    (prdc's ``get_kth_value(distances, k + 1)``; a duplicate row is a neighbour at distance 0)."""
    x = x.double()
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        d = _sqdist64(x[i : i + chunk], x)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + i] = 0.0
        out[i : i + d.shape[0]] = d.topk(k + 1, dim=1, largest=False).values[:, -1].sqrt()
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, device=None, chunk: int = 4096) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) with k
    nearest neighbours, equal to ``prdc.compute_prdc``: distances in float64, a point is inside a
    ball when its distance is strictly below the radius (ties are outside), radii count the point
    itself as the 0-th neighbour."""
    dev = _device(device)
    r = torch.as_tensor(np.asarray(real, np.float64), device=dev)
    f = torch.as_tensor(np.asarray(fake, np.float64), device=dev)
    r_rad, f_rad = kth_nn_radii(r, k, chunk), kth_nn_radii(f, k, chunk)
    fake_in = torch.zeros(f.shape[0], dtype=torch.bool, device=dev)  # precision: fake inside any real ball
    fake_count = torch.zeros(f.shape[0], dtype=torch.float64, device=dev)  # density: number of real balls
    real_in = torch.zeros(r.shape[0], dtype=torch.bool, device=dev)  # recall: real inside any fake ball
    real_nn = torch.empty(r.shape[0], dtype=torch.float64, device=dev)  # coverage: nearest fake
    for i in range(0, r.shape[0], chunk):
        d = _sqdist64(r[i : i + chunk], f).sqrt()
        inside = d < r_rad[i : i + chunk, None]
        fake_in |= inside.any(0)
        fake_count += inside.sum(0)
        real_in[i : i + chunk] = (d < f_rad[None]).any(1)
        real_nn[i : i + chunk] = d.min(1).values
    return {
        "precision": float(fake_in.double().mean()),
        "recall": float(real_in.double().mean()),
        "density": float(fake_count.mean() / k),
        "coverage": float((real_nn < r_rad).double().mean()),
    }


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 5, device=None, chunk: int = 4096) -> tuple[float, float]:
    """Improved precision and recall: :func:`prdc`'s first two."""
    m = prdc(real, fake, k, device, chunk)
    return m["precision"], m["recall"]


def precision_recall_bruteforce(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """scipy ``cdist`` brute force with the same rules (small sets only; a naive baseline)."""
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]

    rr, rf = radii(real), radii(fake)
    p = np.mean((cdist(fake, real) < rr[None]).any(1))
    r = np.mean((cdist(real, fake) < rf[None]).any(1))
    return float(p), float(r)


# ---------------------------------------------------------------------- KID
def kid(features_1: np.ndarray, features_2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity computes it: over ``subsets``
    draws of ``subset_size`` rows of each set (``np.random.RandomState(seed)``, set 1 then set 2,
    without replacement), the unbiased MMD^2 with the kernel (x.y * gamma + coef0)^degree, gamma
    1/dim by default; returns (mean, std). ``features_1`` is torch-fidelity's input1 (generated)."""
    x1, x2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    if min(len(x1), len(x2)) < subset_size:
        raise ValueError(f"KID subset size {subset_size} is larger than a set ({len(x1)}, {len(x2)} samples)")
    g = 1.0 / x1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    m = subset_size
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = x1[rng.choice(len(x1), m, replace=False)]
        b = x2[rng.choice(len(x2), m, replace=False)]
        kaa, kbb, kab = ((u @ v.T * g + coef0) ** degree for u, v in ((a, a), (b, b), (a, b)))
        within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        mmds[i] = within - 2 * kab.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


# -------------------------------------------------------------- other metrics
def cosine_similarity_pairs(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of row i of ``a`` with row i of ``b``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def bootstrap(metric: Callable[[np.ndarray], float], pool: np.ndarray, n: int, draws: int = 50, seed: int = 0) -> tuple[float, float, list[float]]:
    """Mean and standard deviation of ``metric`` over ``draws`` resamples of ``n`` rows of ``pool``
    drawn with replacement (the bootstrap; also when the pool has no more than ``n`` rows)."""
    rng = np.random.default_rng(seed)
    values = [metric(pool[np.sort(rng.choice(len(pool), n, replace=True))]) for _ in range(draws)]
    return float(np.mean(values)), float(np.std(values)), values
