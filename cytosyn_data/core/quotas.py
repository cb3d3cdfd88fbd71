"""Tile budgets stratified by TCGA tissue-source-site (TSS) and per-slide selection.

The global budget is split across TSS strata in proportion to their share of slides,
then equally across the slides of a stratum, each capped at its candidate count; what
a capped slide or stratum cannot take is handed on to the others (water filling).
Within a slide, tiles are the first ``quota`` of a permutation drawn from a generator
seeded by (global seed, stable hash of slide_id): adding a slide never changes which
tiles another slide would pick for a given quota.
"""

from __future__ import annotations

import numpy as np

from cytosyn_data.core.hashing import stable_hash

NULL_STRATUM = "(none)"


def apportion(total: int, weights: np.ndarray, caps: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Split ``total`` integer units by ``weights``, each share capped at ``caps``.

    Water filling: entries whose proportional share would exceed their cap take the cap
    and the rest is shared over the others by weight; largest-remainder rounding, ties
    broken by ascending ``tiebreak``. Returns int64 shares with sum == min(total, caps.sum()).
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    tiebreak = np.asarray(tiebreak)
    total = int(min(total, caps.sum()))
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    capped = np.zeros(len(weights), dtype=bool)
    while True:  # water filling: entries whose exact share reaches their cap take the cap
        free = ~capped & (weights > 0)
        rest = total - int(caps[capped].sum())
        exact = np.zeros(len(weights))
        if free.any():
            exact[free] = rest * weights[free] / weights[free].sum()
        newly = free & (exact >= caps)
        if not newly.any():
            break
        capped |= newly
    share = np.where(capped, caps, np.floor(exact).astype(np.int64))
    left = total - int(share.sum())
    if left > 0:  # largest remainder, ties by ascending tiebreak
        frac = np.where(capped, -1.0, exact - np.floor(exact))
        share[np.lexsort((tiebreak, -frac))[:left]] += 1
    return share


def allocate_quotas(
    strata: list[str], n_candidates: np.ndarray, slide_ids: list[str], budget: int | None, seed: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Per-slide tile quotas and per-stratum totals for a global ``budget``.

    ``strata``: stratum of each slide (TSS or NULL_STRATUM); ``n_candidates``: per slide.
    ``budget`` None takes every candidate.
    """
    n_candidates = np.asarray(n_candidates, dtype=np.int64)
    if budget is None:
        quotas = n_candidates.copy()
    else:
        names = sorted(set(strata))
        idx = np.array([names.index(s) for s in strata], dtype=np.int64)
        n_slides = np.bincount(idx, minlength=len(names)).astype(np.float64)
        caps = np.bincount(idx, weights=n_candidates, minlength=len(names)).astype(np.int64)
        tb = np.array([stable_hash(f"{seed}:{s}") for s in names], dtype=np.uint64)
        per_stratum = apportion(budget, n_slides, caps, tb)
        quotas = np.zeros(len(strata), dtype=np.int64)
        for k in range(len(names)):
            members = np.flatnonzero(idx == k)
            tbs = np.array([stable_hash(f"{seed}:{slide_ids[i]}") for i in members], dtype=np.uint64)
            quotas[members] = apportion(
                int(per_stratum[k]), np.ones(len(members)), n_candidates[members], tbs
            )
    totals: dict[str, int] = {}
    for s, q in zip(strata, quotas):
        totals[s] = totals.get(s, 0) + int(q)
    return quotas, dict(sorted(totals.items()))


def select_tiles(slide_id: str, n_candidates: int, quota: int, seed: int) -> np.ndarray:
    """Indices (into the slide's candidates, sorted ascending) of ``quota`` tiles, no replacement."""
    if quota >= n_candidates:
        return np.arange(n_candidates, dtype=np.int64)
    rng = np.random.default_rng([seed, stable_hash(slide_id)])
    return np.sort(rng.permutation(n_candidates)[:quota]).astype(np.int64)


def shard_order(keys: list[str], seed: int) -> np.ndarray:
    """A global shuffle of tile keys: sort by a keyed hash, so shards mix many slides."""
    h = np.array([stable_hash(f"{seed}/{k}") for k in keys], dtype=np.uint64)
    return np.lexsort((np.array(keys, dtype=object).astype(str), h))
