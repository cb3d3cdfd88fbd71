"""Seconds for FD, FLD and precision/recall at N x D features (default 50,000 x 1536), against the
naive scipy path in the same run (scipy.linalg.sqrtm for FD; scipy cdist for precision/recall).

    python benchmarks/metrics.py [--n 50000] [--dim 1536] [--pr-n 50000] [--fld-n 10000] [--naive-pr-n 5000]

Precision/recall and FLD are quadratic in N; on a small CPU give smaller --pr-n / --fld-n (the
figures printed say which sizes ran). On a GPU everything runs at full size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cytosyn_model.eval.fld import fld
from cytosyn_model.eval.metrics import frechet_distance, frechet_distance_scipy, mean_cov, precision_recall, precision_recall_bruteforce


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--pr-n", type=int, default=50_000)
    ap.add_argument("--fld-n", type=int, default=10_000)
    ap.add_argument("--naive-pr-n", type=int, default=5_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(args.dim, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    real = (rng.normal(size=(args.n, args.dim)).astype(np.float32) @ mix)
    fake = (rng.normal(size=(args.n, args.dim)).astype(np.float32) @ mix) * 1.1 + 0.05
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; features {args.n} x {args.dim}")
    (m1, s1), t_mom1 = timed(lambda: mean_cov(real))
    (m2, s2), t_mom2 = timed(lambda: mean_cov(fake))
    fd, t_fd = timed(lambda: frechet_distance(m1, s1, m2, s2))
    fd_ref, t_ref = timed(lambda: frechet_distance_scipy(m1, s1, m2, s2))
    print(f"moments (float64, streaming): {t_mom1 + t_mom2:.2f} s for both sets")
    print(f"FD eigen path: {t_fd:.2f} s (= {fd:.6f}); scipy sqrtm: {t_ref:.2f} s (= {fd_ref:.6f}); "
          f"speed-up {t_ref / t_fd:.1f}x; relative difference {abs(fd - fd_ref) / abs(fd_ref):.2e}")
    n = args.pr_n
    (p, r), t_pr = timed(lambda: precision_recall(real[:n], fake[:n]))
    print(f"precision/recall/density/coverage k=5 at {n}: {t_pr:.1f} s (P={p:.3f}, R={r:.3f})")
    m = args.naive_pr_n
    _, t_ours_m = timed(lambda: precision_recall(real[:m], fake[:m]))
    _, t_naive_m = timed(lambda: precision_recall_bruteforce(real[:m], fake[:m]))
    print(f"precision/recall at {m}: batched {t_ours_m:.2f} s, naive scipy cdist {t_naive_m:.2f} s -> {t_naive_m / t_ours_m:.1f}x")
    k = args.fld_n
    val, t_fld = timed(lambda: fld(real[:k], fake[:k]))
    print(f"FLD at {k} (half train / half test, Adam up to 50 epochs, with its baseline): {t_fld:.1f} s (= {val:.3f})")


if __name__ == "__main__":
    main()
