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

from pathlib import Path

import polars as pl
import webdataset as wds

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.executors import ClusterSpec
from cytosyn_data.curate.backbone import CacheSpec, feature_cache, feature_cache_ranked
from cytosyn_data.curate.probes import (
    apply_probes_to_file,
    fit_probes,
    load_probes,
    patient_of,
    read_annotations,
    save_probes,
)
from cytosyn_data.curate.sheets import contact_sheet, pngs_for, removal_report, weak_label
from cytosyn_data.io.png import decode_png
from cytosyn_data.reports.guard import never_fail
from cytosyn_data.reports.html import write_report
from cytosyn_data.reports.markdown import markdown_table
from cytosyn_data.run.state import record_run
from cytosyn_encoders import weights_identity


def _tile_run(run: Path) -> Path:
    if not (run / "shards").is_dir():
        raise DataError(f"{run}: no shards/ folder; is it a tile run?")
    return run / "curate"


def fitted_probes(run: Path) -> Path:
    """``RUN/curate/probes.npz``, or a :class:`DataError` when ``curate fit`` has not written it."""
    path = _tile_run(run) / "probes.npz"
    if not path.exists():
        raise DataError(f"{path}: no fitted probes; run `cytosyn-data curate fit` on this run first")
    return path


def curate_features(run: Path, command: str, settings: dict, spec: CacheSpec, annotations: Path | None = None,
                    cluster: ClusterSpec | None = None, rank: int = 0, world: int = 1):
    """The backbone features of every tile of ``run`` (memory-mapped, cached in ``RUN/curate``), after
    recording what made this command's outputs in ``RUN/curate/run.json`` (rank 0). Shards run on the
    Dask ``cluster`` (CPU workers) or, under torchrun (``world`` > 1), over the ranks; rank 0 gets the
    merged features, the other ranks None."""
    work = _tile_run(run)
    if rank == 0:
        inputs = [f"backbone_weights: {spec.weights}"] + ([f"annotations: {annotations}"] if annotations else [])
        record_run(work, f"curate {command}", {k: str(v) for k, v in settings.items()}, inputs,
                   recorded={"backbone_weights_sha256_16": weights_identity(spec.weights)})
    if world > 1:
        return feature_cache_ranked(run / "shards", work, spec, rank, world)
    return feature_cache(run / "shards", work, spec.weights, spec.mean_patch, spec.device, spec.batch_size,
                         spec.decode_workers, cluster)


def curate_fit(run: Path, annotations: Path, x, seed: int = 0) -> pl.DataFrame:
    """Cross-validate the probe on the annotated tiles (features ``x`` of :func:`curate_features`);
    writes ``probes.npz`` and ``cv_metrics.csv``; returns the per-fold metrics."""
    work = _tile_run(run)
    ann = read_annotations(annotations)
    rows_of = pl.scan_parquet(work / "features_keys.parquet").with_row_index("i")
    pos = ann.lazy().select("key").join(rows_of, on="key", how="left", maintain_order="left").collect()
    missing = pos.filter(pl.col("i").is_null())["key"].to_list()
    if missing:
        raise DataError(f"{annotations}: {len(missing)} annotated keys are not in the shards of {run}, "
                        f"e.g. {missing[:3]}")
    tiles = pl.read_parquet(run / "tiles.parquet", columns=["key", "patient"]) if (run / "tiles.parquet").exists() else None
    res = fit_probes(x[pos["i"].to_numpy()], ann["is_artifact"].to_numpy(), patient_of(ann["key"], tiles), seed)
    save_probes(work / "probes.npz", res["probes"])
    metrics = pl.DataFrame(res["metrics"])
    metrics.write_csv(work / "cv_metrics.csv")
    return metrics


def curate_apply(run: Path, x, threshold: float) -> list[str]:
    """Score every tile with the fitted probes: ``curation.parquet``, the report, the contact sheets
    (removed: highest scores; kept: highest scores below the threshold) and the HTML page; returns
    the report's lines."""
    work = _tile_run(run)
    path = fitted_probes(run)
    probes = load_probes(path)
    if probes and probes[0][2].shape[0] != x.shape[1]:
        raise DataError(f"{path}: fitted on {probes[0][2].shape[0]}-d features, but the backbone gives "
                        f"{x.shape[1]}-d ones (other weights, or --mean-patch not as at fit time?); fit again")
    n = apply_probes_to_file(work / "features_keys.parquet", x, probes, threshold, run / "curation.parquet")
    cur = pl.scan_parquet(run / "curation.parquet")
    tiles = pl.scan_parquet(run / "tiles.parquet").select("key", "shard") if (run / "tiles.parquet").exists() else None
    rep = removal_report(cur, pl.read_parquet(run / "slides.parquet") if (run / "slides.parquet").exists() else None)
    removed = int(cur.select((~pl.col("keep")).sum()).collect().item())
    for name, part in (("top_artifacts", cur), ("kept_highest_scores", cur.filter(pl.col("keep")))):
        top = part.top_k(64, by="artifact_prob").collect().sort("artifact_prob", "key", descending=[True, False])
        shards = tiles.join(top.lazy().select("key"), on="key", how="semi").collect() if tiles is not None else None
        pngs = pngs_for(run / "shards", top["key"].to_list(), shards)
        contact_sheet([pngs[k] for k in top["key"]], [f"{p:.2f} {k}" for k, p in zip(top["key"], top["artifact_prob"])],
                      work / f"{name}.png")
    text = ["# curation report", "", f"- tiles scored: {n}; removed (mean of 5 fold probabilities >= "
            f"{threshold}): {removed}", "", markdown_table(rep.rename({"removed_fraction": "fraction"}), "{:.3f}")]
    (work / "report.md").write_text("\n".join(text) + "\n")
    if (run / "candidates.parquet").exists():
        never_fail(f"{run}/report/index.html", write_report, run)
    return text


def curate_sheet(run: Path, n: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A contact sheet of ``n`` random tiles with their keys and a label template CSV."""
    work = _tile_run(run)
    tiles = pl.read_parquet(run / "tiles.parquet", columns=["key", "shard"])
    tiles = tiles.sample(min(n, tiles.height), seed=seed, shuffle=True)
    keys = tiles["key"].to_list()[:n]
    pngs = pngs_for(run / "shards", keys, tiles)
    sheet = contact_sheet([pngs[k] for k in keys], keys, work / f"sheet_seed{seed}.png")
    template = work / f"sheet_seed{seed}.csv"
    pl.DataFrame({"key": keys, "label": [""] * len(keys)}).write_csv(template)
    return sheet, template


def curate_weak_labels(run: Path, out: Path) -> int:
    """Weak labels from pixel checks for every tile of the run's shards -> ``out`` (CSV key, label)."""
    _tile_run(run)
    urls = sorted(str(p) for p in (run / "shards").glob("*.tar"))
    rows = [(s["__key__"], weak_label(decode_png(s["png"]))) for s in wds.WebDataset(urls, shardshuffle=False)]
    pl.DataFrame(rows, schema=["key", "label"], orient="row").write_csv(out)
    return len(rows)
