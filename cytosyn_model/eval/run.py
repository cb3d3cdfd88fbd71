"""`cytosyn-eval`: features of real and generated tile sets per extractor, metrics, report and plots.

Config (a YAML file, section ``eval``; ``cytosyn-data config show eval`` prints an example)::

    out: runs/eval
    real: {val_in: splits/val_in, val_out: splits/val_out}     # shard folders or PNG folders
    real_train: splits/train        # optional: FLD bandwidths are fitted on it (else half of each real set)
    generated: {sde250: {path: gen/sde250, steps: 250}}
    extractors: {inception_v3: /weights/inception.pth, uni: /weights/uni.bin}
    metrics: [fd, fd_inf, fld, pr, kid, cosine]   # pr: precision, recall, density, coverage (k = pr_k, 5)
    bootstrap: {draws: 50, n: 50000}                         # of the FD of each generated set
    preprocess: {real: [], generated: []}                    # jpeg70, centercrop224, ...
    batch_size: 64
    decode_workers: 4                # threads decoding images beside the extractor (default: CPUs per GPU, max 8)
    seed: 0

Features are cached per (set, extractor identity incl. weights, preprocessing) under
``out/cache/``; their mean and covariance are accumulated in float64 while streaming (features.py).
This module holds the config, the pairing of generated and real tiles and the metrics of each pair;
report.py writes what a person reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cytosyn_data.core.checks import non_negative, one_of, positive
from cytosyn_data.core.errors import DataError, UsageError
from cytosyn_data.core.executors import default_decode_workers, rank_device
from cytosyn_data.io.feature_file import take_rows

from .extractors import REGISTRY, build_extractor
from .features import preprocessor, set_features, subsample
from .fld import fld, fld_and_gap, memorisation_scores
from .metrics import bootstrap, cosine_similarity_pairs, fd_infinity, frechet_distance, kid, mean_cov, prdc
from .report import write_outputs

METRICS = ("fd", "fd_inf", "fld", "pr", "kid", "cosine")

METRICS_SCHEMA = {"metric": pl.String, "extractor": pl.String, "set": pl.String, "reference": pl.String,
                  "value": pl.Float64, "std": pl.Float64}


@dataclass
class EvalConfig:
    out: str = "runs/eval"
    real: dict = field(default_factory=dict)
    real_train: str | None = None
    generated: dict = field(default_factory=dict)
    extractors: dict = field(default_factory=dict)  # name -> weight spec (local file, or random:small)
    metrics: list = field(default_factory=lambda: ["fd", "fld", "pr", "cosine"])
    pr_k: int = 5  # nearest neighbours of precision/recall/density/coverage (prdc, dgm-eval)
    kid: dict = field(default_factory=lambda: {"subsets": 100, "subset_size": 1000})  # torch-fidelity's
    fd_inf: dict = field(default_factory=lambda: {"min_fake": 5000, "num_points": 15})  # Chong & Forsyth's
    bootstrap: dict = field(default_factory=lambda: {"draws": 50, "n": 50000})
    preprocess: dict = field(default_factory=lambda: {"real": [], "generated": []})
    batch_size: int = 64
    decode_workers: int | None = None  # threads decoding images beside the extractor (None: the CPUs per GPU, max 8)
    device: str | None = None
    seed: int = 0
    max_images: int | None = None
    max_points: int | None = 50_000  # rows (seeded choice) per set for the k-NN / kernel / mixture metrics

    @classmethod
    def from_dict(cls, d: dict, where: str = "eval config") -> "EvalConfig":
        """Build and validate; errors name ``where`` (e.g. the YAML file) and the key."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        cfg = cls(**d)
        for m in cfg.metrics:
            one_of(m, f"{where}: metrics", METRICS)
        for name in cfg.extractors:
            one_of(name, f"{where}: extractors", REGISTRY)
        positive(cfg.batch_size, f"{where}: batch_size", int)
        positive(cfg.pr_k, f"{where}: pr_k", int)
        for k, v in (cfg.bootstrap or {}).items():
            one_of(k, f"{where}: bootstrap", ("draws", "n"))
            (non_negative if k == "draws" else positive)(v, f"{where}: bootstrap.{k}", int)  # draws 0: no bootstrap
        for k, v in (cfg.fd_inf or {}).items():
            one_of(k, f"{where}: fd_inf", ("min_fake", "num_points"))
            positive(v, f"{where}: fd_inf.{k}", int)
        for k, v in (cfg.kid or {}).items():
            one_of(k, f"{where}: kid", ("subsets", "subset_size", "seed"))
            if k != "seed":
                positive(v, f"{where}: kid.{k}", int)
        for k in ("max_images", "max_points", "decode_workers"):
            if getattr(cfg, k) is not None:
                positive(getattr(cfg, k), f"{where}: {k}", int)
        for side, names in (cfg.preprocess or {}).items():
            for name in names:
                try:
                    preprocessor(name)
                except ValueError as exc:
                    raise UsageError(f"{where}: preprocess.{side}: {exc}") from None
        return cfg


def reference_key(generated_key: str) -> str | None:
    """``gen__{refkey}__s{seed}_{i}`` (cytosyn-sample's cond mode) -> refkey."""
    parts = generated_key.split("__")
    return "__".join(parts[1:-1]) if len(parts) >= 4 and parts[0] == "gen" else None


def reference_pairs(real_keys: list[str], gen_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(real row, generated row) of each generated tile whose reference tile is in the real set (a
    join, not a dict of every real key)."""
    gen = pl.DataFrame({"ref": [reference_key(k) for k in gen_keys]}, schema={"ref": pl.String}).with_row_index("gi")
    real = pl.DataFrame({"ref": pl.Series(real_keys, dtype=pl.String)}).with_row_index("ri")
    pairs = gen.join(real, on="ref", how="inner").sort("gi")
    return pairs["ri"].to_numpy(), pairs["gi"].to_numpy()


def _pair_metrics(cfg: EvalConfig, names: tuple, g: tuple, r: tuple, train, out: Path, dev) -> list[tuple]:
    """Metric rows of one (extractor, generated set, real set). ``g``/``r``: keys, features (memory
    map), mean, covariance and the ``max_points`` subsample of each set."""
    (gkeys, gf, gmu, gcov, gs), (rkeys, rf, rmu, rcov, rs) = g, r
    rows = []
    if "fd" in cfg.metrics:
        std, b = None, cfg.bootstrap or {}
        if b.get("draws", 0) > 1:
            _, std, _ = bootstrap(lambda x: frechet_distance(*mean_cov(x), rmu, rcov), gf, b.get("n", len(gf)),
                                  b["draws"], cfg.seed)
        rows.append(("fd", *names, frechet_distance(gmu, gcov, rmu, rcov), std))
    if "pr" in cfg.metrics:
        m = prdc(rs, gs, cfg.pr_k, device=dev)
        rows += [(name, *names, m[name], None) for name in ("precision", "recall", "density", "coverage")]
    if "fd_inf" in cfg.metrics:
        lo, pts = int(cfg.fd_inf.get("min_fake", 5000)), int(cfg.fd_inf.get("num_points", 15))
        if len(gf) <= lo:
            raise DataError(f"fd_inf: generated set {names[1]} has {len(gf)} images; FD-infinity needs more than "
                            f"fd_inf.min_fake = {lo}")
        rows.append(("fd_inf", *names, fd_infinity(gf, rmu, rcov, lo, pts, cfg.seed), None))
    if "kid" in cfg.metrics:
        size = min(int(cfg.kid.get("subset_size", 1000)), len(rs), len(gs))
        mean, std = kid(gs, rs, int(cfg.kid.get("subsets", 100)), size, seed=int(cfg.kid.get("seed", 2020)))
        rows.append(("kid", *names, mean, std))
    if "fld" in cfg.metrics and train is None:
        rows.append(("fld", *names, fld(rs, gs, seed=cfg.seed, device=dev), None))
    elif "fld" in cfg.metrics:  # the memorisation gap and per-sample scores need the training set
        value, gap = fld_and_gap(rs, gs, real_train=train, seed=cfg.seed, device=dev)
        rows += [("fld", *names, value, None), ("fld_gap", *names, gap, None)]
        scores = memorisation_scores(train, rs, gf, cfg.seed, dev)  # all generated samples, as the reference
        pl.DataFrame({"key": gkeys, "memorisation": scores}).write_parquet(out / "memorisation_{}_{}_{}.parquet".format(*names))
    if "cosine" in cfg.metrics:
        ri, gi = reference_pairs(rkeys, gkeys)
        if len(ri):
            rows.append(("cosine", *names, cosine_similarity_pairs(take_rows(rf, ri), take_rows(gf, gi)), None))
    return rows


def evaluate(cfg: EvalConfig, rank: int = 0, world: int = 1) -> pl.DataFrame | None:
    """Every metric for every (extractor, generated set, real set); writes metrics.parquet, report.md,
    plots. In a job of ``world`` processes each extracts its share of every set's features
    (:func:`set_features`) and process 0 computes the metrics and writes the outputs (the others
    return None)."""
    out = Path(cfg.out)
    cache = out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(rank_device(cfg.device))
    rows = []
    pre_r, pre_g = cfg.preprocess.get("real", []), cfg.preprocess.get("generated", [])
    for ename, weights in cfg.extractors.items():
        extractor = build_extractor(ename, weights).to(dev)

        def feats(name, source, pre):
            return set_features(extractor, name, source, pre, cache, cfg.batch_size, dev, weights, cfg.max_images,
                                rank, world, cfg.decode_workers or default_decode_workers())

        real = {n: feats(n, p, pre_r) for n, p in cfg.real.items()}
        train = None
        if cfg.real_train and "fld" in cfg.metrics:
            train = subsample(feats("real_train", cfg.real_train, pre_r)[1], cfg.max_points, cfg.seed)
        gens = {g: feats(f"gen_{g}", v["path"] if isinstance(v, dict) else v, pre_g) for g, v in cfg.generated.items()}
        if rank != 0:
            continue
        for gname, (gkeys, gf, (gmu, gcov)) in gens.items():
            gs = subsample(gf, cfg.max_points, cfg.seed + 1)  # k-NN, kernel and mixture metrics: <= max_points rows
            for rname, (rkeys, rf, (rmu, rcov)) in real.items():
                rs = subsample(rf, cfg.max_points, cfg.seed + 2)
                rows += _pair_metrics(cfg, (ename, gname, rname), (gkeys, gf, gmu, gcov, gs), (rkeys, rf, rmu, rcov, rs),
                                      train, out, dev)
    if rank != 0:
        return None
    df = pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")
    df.write_parquet(out / "metrics.parquet")
    write_outputs(cfg, df, out)
    return df


