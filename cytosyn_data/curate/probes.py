"""The artifact probe: 5-fold cross-validation of a scikit-learn logistic regression (standardised
features), folds grouped by patient and stratified by label; the 5 fitted probes saved as plain
arrays (``probes.npz``, no pickle); artifact probability = mean of the 5 fold probabilities."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from cytosyn_data.io.atomic import atomic_write_bytes, tmp_path
from cytosyn_data.io.feature_file import read_rows
from cytosyn_data.run.barcode import parse_slide_name

N_FOLDS = 5


def read_annotations(path: str | Path) -> pl.DataFrame:
    """key, label (usable / artifact / an artifact class), with is_artifact = label != usable."""
    path = Path(path)
    df = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
    if not {"key", "label"} <= set(df.columns):
        raise ValueError(f"{path}: annotations need columns key and label (have {df.columns})")
    return df.select("key", pl.col("label").cast(pl.String)).with_columns(is_artifact=pl.col("label") != "usable")


def slide_of(keys) -> list[str]:
    return [k.split("__")[0] for k in keys]


def patient_of(keys, tiles: pl.DataFrame | None = None) -> list[str]:
    """The cross-validation group of each key: its patient (from ``tiles.parquet`` when given, else
    from a TCGA barcode in the slide id), or its slide when no patient is known. A patient's
    slides then never straddle a training and a held-out fold."""
    known = {}
    if tiles is not None and "patient" in tiles.columns:
        sub = tiles.filter(pl.col("key").is_in(pl.Series(list(keys), dtype=pl.String).implode()))
        known = dict(zip(sub["key"].to_list(), sub["patient"].to_list()))
    out = []
    for k, sid in zip(keys, slide_of(keys)):
        out.append(known.get(k) or parse_slide_name(sid).patient or sid)
    return out


def fit_probes(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int = 0, c: float = 1.0) -> dict:
    """Grouped, stratified 5-fold CV of a standardised logistic regression.

    Returns fold assignments, per-fold AUC / balanced accuracy on the held-out fold, and the
    5 probes as arrays (mean, scale, coef, intercept).
    """
    cv = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    fold_of = np.full(len(y), -1)
    probes, metrics = [], []
    for f, (tr, te) in enumerate(cv.split(x, y, groups)):
        fold_of[te] = f
        if len(set(y[tr])) < 2:
            raise ValueError(f"fold {f}: its training part holds one class only; annotate more slides")
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(scaler.transform(x[tr]), y[tr])
        p = clf.predict_proba(scaler.transform(x[te]))[:, 1]
        auc = roc_auc_score(y[te], p) if len(set(y[te])) == 2 else float("nan")
        bacc = balanced_accuracy_score(y[te], p >= 0.5)
        metrics.append({"fold": f, "n_test": int(len(te)), "auc": float(auc), "balanced_accuracy": float(bacc)})
        probes.append((scaler.mean_, scaler.scale_, clf.coef_[0], clf.intercept_[0]))
    return {"fold_of": fold_of, "metrics": metrics, "probes": probes}


def save_probes(path: Path, probes: list) -> None:
    arrays = {}
    for i, (m, s, w, b) in enumerate(probes):
        arrays.update({f"mean{i}": m, f"scale{i}": s, f"coef{i}": w, f"intercept{i}": np.array([b])})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_probes(path: Path) -> list:
    z = np.load(path, allow_pickle=False)
    n = len([k for k in z.files if k.startswith("coef")])
    return [(z[f"mean{i}"], z[f"scale{i}"], z[f"coef{i}"], float(z[f"intercept{i}"][0])) for i in range(n)]


def probe_probabilities(x: np.ndarray, probes: list, chunk: int = 16384) -> np.ndarray:
    """[N, folds] artifact probabilities of each fold's probe (logistic of the linear score), in
    float64 over row chunks: ``x`` may be a memory-mapped feature file larger than memory."""
    out = np.empty((len(x), len(probes)), dtype=np.float64)
    for lo in range(0, len(x), chunk):
        xc = read_rows(x, lo, lo + chunk).astype(np.float64)
        for j, (m, s, w, b) in enumerate(probes):
            out[lo : lo + chunk, j] = 1.0 / (1.0 + np.exp(-(((xc - m) / s) @ w + b)))
    return out


def apply_probes(keys: list[str], x: np.ndarray, probes: list, threshold: float) -> pl.DataFrame:
    """curation table: key, p_fold0..4, artifact_prob (fold mean), keep, threshold."""
    p = probe_probabilities(x, probes)
    mean = p.mean(axis=1)
    cols = {"key": keys, **{f"p_fold{i}": p[:, i] for i in range(p.shape[1])}}
    return pl.DataFrame(cols).with_columns(
        artifact_prob=pl.Series(mean), keep=pl.Series(mean < threshold), threshold=pl.lit(threshold)
    )


def apply_probes_to_file(keys_path: Path, x: np.ndarray, probes: list, threshold: float, out: Path,
                         chunk: int = 65_536) -> int:
    """The curation table of every tile written chunk by chunk to ``out`` (same rows as
    :func:`apply_probes`; keys read from ``keys_path``, features in row chunks): memory is one chunk.
    Returns the row count."""
    keys = pl.scan_parquet(keys_path)
    n = keys.select(pl.len()).collect().item()
    tmp = tmp_path(Path(out))
    writer = None
    try:
        for lo in range(0, max(n, 1), chunk):
            part = apply_probes(keys.slice(lo, chunk).collect()["key"], read_rows(x, lo, lo + chunk), probes, threshold)
            if writer is None:
                writer = pq.ParquetWriter(tmp, part.to_arrow().schema)
            writer.write_table(part.to_arrow())
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    return n
