"""`cytosyn-data curate`: artifact scoring with a frozen iBOT ViT-S/16 and a 5-fold linear probe.

- features: CLS (optionally concatenated with the mean patch token) of a frozen ViT-S/16
  (timm ``vit_small_patch16_224``, weights from a local iBOT/DINO checkpoint), cached per shard
  folder in ``curate/features.npy`` + ``curate/features_keys.parquet`` with the backbone identity.
- fit: 5-fold cross-validation of a scikit-learn logistic regression (standardised features),
  folds grouped by slide (no slide in two folds) and stratified by label; per-fold and mean AUC
  and balanced accuracy; the 5 fitted probes saved as plain arrays (``probes.npz``, no pickle).
- apply: artifact probability = mean of the 5 fold probabilities; ``curation.parquet`` with the
  per-fold probabilities, the mean, ``keep`` and the threshold; a report of the removed fraction per
  TSS and slide type; a contact sheet of the highest-scored tiles.
- sheet / weak-labels: contact sheets with keys for labelling, and weak labels from pixel checks
  (pen ink, background, blur) as a documented starting point.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from cytosyn_data.io.png import decode_png, encode_png
from cytosyn_data.io.feature_file import FeatureFileWriter, read_rows
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.run.schemas import NULL_STRATUM

N_FOLDS = 5


# ------------------------------------------------------------------ backbone
def build_backbone(weights):
    """The frozen iBOT ViT-S/16 (384-d CLS) of the encoder registry, with its normalisation; ``weights``
    is a local iBOT/DINO checkpoint (teacher, backbone prefixes and heads handled) or ``random:small``."""
    from cytosyn_encoders import build_encoder

    return build_encoder("ibot_vits16", weights)


@torch.no_grad()
def tile_features(encoder, pngs: list[bytes], mean_patch: bool = False, device="cpu", batch_size: int = 128) -> np.ndarray:
    """float32 [N, D] (or [N, 2D] with the mean patch token) for PNG tiles."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    outs = []
    for i in range(0, len(pngs), batch_size):
        x = torch.from_numpy(np.stack([decode_png(p) for p in pngs[i : i + batch_size]])).to(dev)
        x = x.permute(0, 3, 1, 2).float() / 255
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = encoder.tokens(x)
        f = tokens[:, 0]
        if mean_patch:
            f = torch.cat([f, tokens[:, encoder.network.num_prefix_tokens:].mean(1)], dim=-1)
        outs.append(f.float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def compute_features(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                     batch_size: int = 128) -> tuple[pl.Series, np.ndarray]:
    """Keys and float32 [N, D] features (memory-mapped) of every tile in the shards (see
    :func:`feature_cache`; the keys are read into memory, ~60 bytes per tile)."""
    x = feature_cache(shard_dir, out_dir, weights, mean_patch, device, batch_size)
    return pl.read_parquet(out_dir / "features_keys.parquet")["key"], x


def feature_cache(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                  batch_size: int = 128) -> np.ndarray:
    """float32 [N, D] features (memory-mapped) of every tile in the shards, cached in ``out_dir``
    (reused when the backbone weights and the shard files (name, size, mtime) are the same):
    ``out_dir/features.npy``, and the keys of its rows in ``out_dir/features_keys.parquet``."""
    import webdataset as wds

    from cytosyn_encoders import weights_identity

    from cytosyn_data.run.state import files_digest

    urls = sorted(str(p) for p in Path(shard_dir).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards")
    ident = f"ibot_vits16:{weights_identity(weights)}"
    ident += ("+meanpatch" if mean_patch else "") + f"+shards:{files_digest(urls)}"
    meta_path = out_dir / "features.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("backbone") == ident:
        return np.load(out_dir / "features.npy", mmap_mode="r")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_backbone(weights).to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, buf_k, buf_p = [], [], []
    with FeatureFileWriter(out_dir / "features.npy") as fw:
        for sample in tqdm(wds.WebDataset(urls, shardshuffle=False), desc="curate features", unit="tile"):
            buf_k.append(sample["__key__"])
            buf_p.append(sample["png"])
            if len(buf_p) == batch_size:
                fw.append(tile_features(model, buf_p, mean_patch, device, batch_size))
                keys.append(pl.Series(buf_k, dtype=pl.String))
                buf_k, buf_p = [], []
        if buf_p:
            fw.append(tile_features(model, buf_p, mean_patch, device, batch_size))
            keys.append(pl.Series(buf_k, dtype=pl.String))
    keys = pl.concat(keys) if keys else pl.Series("key", [], dtype=pl.String)
    pl.DataFrame({"key": keys}).write_parquet(out_dir / "features_keys.parquet")
    atomic_write_bytes(meta_path, json.dumps({"backbone": ident, "n": len(keys)}).encode())
    return np.load(out_dir / "features.npy", mmap_mode="r")


# ----------------------------------------------------------------------- fit
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
    from cytosyn_data.run.barcode import parse_slide_name

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
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

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


# ---------------------------------------------------------------------- apply
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
    import pyarrow.parquet as pq

    from cytosyn_data.io.atomic import tmp_path

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


def contact_sheet(pngs: list[bytes], labels: list[str], path: Path, cols: int = 8, thumb: int = 160) -> Path:
    """A grid of tiles with their labels (keys, scores) printed under each, as PNG."""
    rows = max(1, -(-len(pngs) // cols))
    cell_h = thumb + 28
    sheet = np.full((rows * cell_h, cols * thumb, 3), 255, np.uint8)
    for i, (png, text) in enumerate(zip(pngs, labels)):
        r, c = divmod(i, cols)
        img = cv2.resize(decode_png(png), (thumb, thumb), interpolation=cv2.INTER_AREA)
        sheet[r * cell_h : r * cell_h + thumb, c * thumb : (c + 1) * thumb] = img
        for j, line in enumerate([text[k : k + 26] for k in range(0, min(len(text), 52), 26)]):
            cv2.putText(sheet, line, (c * thumb + 2, r * cell_h + thumb + 11 + 12 * j), cv2.FONT_HERSHEY_SIMPLEX,
                        0.32, (0, 0, 0), 1, cv2.LINE_AA)
    atomic_write_bytes(path, encode_png(sheet), durable=False)
    return path


def pngs_for(shard_dir: Path, keys: list[str], tiles: pl.DataFrame | None = None) -> dict[str, bytes]:
    """PNG bytes of ``keys``: only the shards that hold them are read (tiles.parquet's ``shard``
    column; without it every shard, sequentially, until all are found)."""
    from cytosyn_data.io.tar_read import split_member, stream_members

    want, got = set(keys), {}
    shards = sorted(Path(shard_dir).glob("*.tar"))
    if tiles is not None and "shard" in tiles.columns:
        names = set(tiles.filter(pl.col("key").is_in(list(want)))["shard"].to_list())
        shards = [p for p in shards if p.name in names]
    for shard in shards:
        for name, data in stream_members(shard):
            key, ext = split_member(name)
            if ext == "png" and key in want:
                got[key] = data
        if len(got) == len(want):
            break
    return got


def removal_report(cur: pl.DataFrame | pl.LazyFrame, slides: pl.DataFrame | None = None) -> pl.DataFrame:
    """Removed fraction per TSS and slide type. A tile's slide is its key's prefix; TSS and slide type
    come from ``slides`` (slides.parquet) or else from the TCGA barcode of the slide id: a join on the
    slides, aggregated streaming (no per-tile table is built)."""
    from cytosyn_data.run.barcode import parse_slide_name

    lf = cur.lazy().with_columns(slide_id=pl.col("key").str.split("__").list.first())
    if slides is None or not {"tss", "slide_type"} <= set(slides.columns):
        sids = lf.select(pl.col("slide_id").unique()).collect()["slide_id"].to_list()
        names = [parse_slide_name(s) for s in sids]
        slides = pl.DataFrame({"slide_id": sids, "tss": [n.tss for n in names], "slide_type": [n.slide_type for n in names]},
                              schema={"slide_id": pl.String, "tss": pl.String, "slide_type": pl.String})
    lf = lf.join(slides.lazy().select("slide_id", "tss", "slide_type"), on="slide_id", how="left")
    return _removed_fractions(lf).collect()


def _removed_fractions(cur: pl.LazyFrame) -> pl.LazyFrame:
    return (
        cur.with_columns(pl.col("tss").fill_null(NULL_STRATUM), pl.col("slide_type").fill_null(NULL_STRATUM))
        .group_by("tss", "slide_type")
        .agg(tiles=pl.len(), removed=(~pl.col("keep")).sum(), removed_fraction=(~pl.col("keep")).mean())
        .sort("tss", "slide_type")
    )


# ------------------------------------------------------------------ weak labels
def weak_label(rgb: np.ndarray, blur_threshold: float = 40.0) -> str:
    """Pixel-check label for bootstrapping annotations: pen, background, blur or usable.

    pen: > 15% ink pixels (tissue.pen_mask); background: < 30% saturated pixels; blur: variance of
    the Laplacian of the grey image below ``blur_threshold``. A starting point for a person to
    correct, not ground truth.
    """
    from cytosyn_data.wsi.tissue import pen_mask

    if pen_mask(rgb).mean() > 0.15:
        return "pen"
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    if (hsv[..., 1] > 25).mean() < 0.3:
        return "background"
    if cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() < blur_threshold:
        return "blur"
    return "usable"
