"""`cytosyn-data split`: train / val_in / val_out, a guidance subset, split shards, leakage audit.

- val_out: whole patients held out (a patient's slides never straddle the sides): about
  ``val_out_fraction`` of the patients of each project (at least one per project that has two
  or more), picked round-robin over TSS strata in a seeded hash order.
- val_in: tiles of training slides held out of training (``val_in_fraction`` per slide), checked
  geometrically (level-0 squares) never to overlap a training tile.
- guidance: a TSS-stratified subset of the training tiles (they stay in train; ``guidance`` flag).
- Tiles removed by curation (``curation.parquet`` keep == false), and tiles outside the per-tile QC
  thresholds (``min_blur``, ``max_pen``, ``min_qc_tissue`` on tiles.parquet's QC columns), are left
  out of every split.
Shards per split under ``splits/{split}/`` are a pure re-sharding of the tile shards (bytes
copied, members in a keyed-hash global shuffle, fixed tar metadata): byte-reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import polars as pl

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.executors import ClusterSpec, open_executor
from cytosyn_data.io.atomic import atomic_write_bytes, tmp_path
from cytosyn_data.reports.guard import never_fail
from cytosyn_data.reports.html import write_report
from cytosyn_data.run.schemas import SPLITS_SCHEMA
from cytosyn_data.run.state import RunLock, check_run_file, file_identity
from cytosyn_data.split.assign import Assigned, assign_run
from cytosyn_data.split.audit import audit_parts, write_audit
from cytosyn_data.split.config import SplitConfig
from cytosyn_data.split.shuffle import shuffle_to_shards


def _split_inputs(run: Path, cur_path: Path | None) -> list[str]:
    """Identity (size, mtime) of every input of a split: the tile tables, the shards, the curation."""
    files = [run / "slides.parquet", run / "tiles.parquet", *sorted((run / "shards").glob("*.tar"))]
    if cur_path is not None:
        files.append(cur_path)
    out = []
    for f in files:
        ident = file_identity(f)
        out.append(f"{f.relative_to(run) if f.is_relative_to(run) else f} size={ident['size']} mtime_ns={ident['mtime_ns']}")
    return out


def clear_split_outputs(run: Path, out: Path) -> None:
    """Remove what a split wrote: the split shard folders, splits.parquet, audit, counts, run.json."""
    for d in out.iterdir() if out.exists() else []:
        if d.is_dir() and (d.name.split("_")[0] in ("train", "val", "guidance") or d.name in (".shuffle", ".assign")):
            shutil.rmtree(d)
    for f in (out / "audit.md", out / "counts.json", out / "run.json", out / "splits.parquet", run / "splits.parquet"):
        f.unlink(missing_ok=True)


def run_split(tile_run: str | Path, out: str | Path | None = None, cfg: SplitConfig = SplitConfig(),
              curation: str | Path | None = None, overwrite: bool = False, cluster: ClusterSpec = ClusterSpec()) -> dict:
    """Assign splits for a tile run folder and write ``splits.parquet``, split shards and ``splits/audit.md``.

    ``curation``: a curation table (a missing file is an error); default ``RUN/curation.parquet``
    when it exists. ``out/run.json`` records the settings and the identity of every input: a
    re-run with other ones is refused unless ``overwrite`` clears the old split first. ``cluster``:
    where the shuffle's units run (local pool by default; the bytes do not depend on it)."""
    run = Path(tile_run)
    out = Path(out) if out else run / "splits"
    if curation is not None and not Path(curation).exists():
        raise DataError(f"{curation}: curation file not found (give an existing curation.parquet, or leave --curation out)")
    for need in ("slides.parquet", "tiles.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    cur_path = Path(curation) if curation else (run / "curation.parquet" if (run / "curation.parquet").exists() else None)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        check_run_file(out, "split", dataclasses.asdict(cfg), _split_inputs(run, cur_path), overwrite,
                       lambda: clear_split_outputs(run, out))
        return _run_split(run, out, cfg, cur_path, cluster)


def write_splits_table(a: Assigned, path: Path) -> None:
    """splits.parquet streamed from the parts (in tiles.parquet's slide order, not sorted by key)."""
    scan = pl.scan_parquet(a.parts).with_columns(guidance=pl.col("key").is_in(a.guidance.implode()))
    tmp = tmp_path(path)
    scan.select(list(SPLITS_SCHEMA)).cast(SPLITS_SCHEMA).sink_parquet(tmp, statistics=False)
    os.replace(tmp, path)


def _run_split(run: Path, out: Path, cfg: SplitConfig, cur_path: Path | None, cluster: ClusterSpec) -> dict:
    t0 = time.perf_counter()
    a = assign_run(run, out / ".assign", cfg, cur_path)
    t1 = time.perf_counter()
    splits_path = run / "splits.parquet" if out == run / "splits" else out / "splits.parquet"
    write_splits_table(a, splits_path)
    result = audit_parts(pl.scan_parquet(splits_path), a.overlaps)
    write_audit(out / "audit.md", result)
    t2 = time.perf_counter()
    slides = pl.read_parquet(run / "slides.parquet")
    with open_executor(cluster, warm=("cytosyn_data.split.shuffle",)) as ex:
        shuffled = shuffle_to_shards(a.parts, a.guidance, slides, sorted((run / "shards").glob("*.tar")), out, cfg, ex,
                                     max(cluster.workers, cluster.jobs * cluster.cores if cluster.kind == "slurm" else 1))
    shutil.rmtree(out / ".assign")
    atomic_write_bytes(out / "counts.json", json.dumps(shuffled["counts"], indent=1, sort_keys=True).encode())
    result.update(counts=shuffled["counts"], removed_by_qc=a.n_tiles - a.n_qc_kept, tiles=a.n_tiles,
                  seconds={"assign": t1 - t0, "audit": t2 - t1, **shuffled["seconds"]})
    if out == run / "splits":  # the run's page shows the splits
        never_fail(f"{run}/report/index.html", write_report, run)
    return result


