"""Shard writing of the tile stage: one work unit = one tar shard, each PNG written once.

A unit streams its tiles through the kernel straight into ``shards/.{name}.tmp-PID``, writes
the shard's tiles.parquet rows (plan + sha256, QC) to ``work/shard_plans/{name}.parquet``, renames the tar into
place and then records the unit's plan digest (``{name}.sha256``). A unit is skipped when the
tar, the results and a matching digest all exist, so a re-executed unit (a killed worker, a
re-run) rewrites the same bytes and never duplicates a tile. A slide that fails half-way is cut
out of the shard (the tar is truncated back to where its tiles began) and reported; the stage
then rewrites its other shards without that slide (``complete=False``). The digest of such a
shard is not recorded, so the next run writes it again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import cv2
import polars as pl

from .shards import TarAppender, atomic_write_bytes, write_parquet_atomic
from .tile_kernel import QC_SCHEMA, open_reader, plan_from_info, render_tile
from .tile_plan import TILES_SCHEMA, WRITTEN_SCHEMA, ShardUnit


def unit_is_current(unit: ShardUnit) -> bool:
    plans = Path(unit.plans_dir)
    digest = plans / f"{unit.name}.sha256"
    return ((Path(unit.shard_dir) / unit.name).exists() and (plans / f"{unit.name}.parquet").exists()
            and digest.exists() and digest.read_text() == unit.digest)


def write_shard(unit: ShardUnit) -> dict:
    """Write one shard (see the module doc); returns name, status, tile count, failed slides, seconds."""
    t0 = time.perf_counter()
    if unit.complete and unit_is_current(unit):
        return {"name": unit.name, "status": "skipped", "n": unit.n_rows, "failed": {}, "seconds": 0.0}
    plans = Path(unit.plans_dir)
    (plans / f"{unit.name}.sha256").unlink(missing_ok=True)
    written: list[tuple] = []  # (key, sha256, *QC) per tile, WRITTEN_SCHEMA
    failed: dict[str, str] = {}
    rows = unit.load_rows()
    with TarAppender(Path(unit.shard_dir) / unit.name) as tar:
        for (sid,), seg in rows.group_by("slide_id", maintain_order=True):
            mark, n0 = tar.tell(), len(written)
            try:
                _write_segment(tar, seg, unit.slides[sid], unit.settings, written)
            except Exception as exc:  # noqa: BLE001 - one slide's failure is recorded, the rest is written
                tar.truncate(mark)
                del written[n0:]
                where = unit.slides[sid].get("url", unit.slides[sid]["path"])
                failed[sid] = f"{where}: extraction failed: {type(exc).__name__}: {exc}"
        done = pl.DataFrame(written, schema=WRITTEN_SCHEMA, orient="row")
        table = rows.join(done, on="key", how="inner", maintain_order="left").select(list(TILES_SCHEMA))
        write_parquet_atomic(table.cast(TILES_SCHEMA), plans / f"{unit.name}.parquet")
        tar.commit()
    if not failed and unit.complete:
        atomic_write_bytes(plans / f"{unit.name}.sha256", unit.digest.encode(), durable=False)
    status = "partial" if failed or not unit.complete else "written"
    return {"name": unit.name, "status": status, "n": len(written), "failed": failed,
            "seconds": time.perf_counter() - t0}


def _write_segment(tar: TarAppender, seg: pl.DataFrame, info: dict, settings: dict, written: list) -> None:
    """Append ``{key}.png`` and ``{key}.json`` (the tiles.parquet row) for each row of one slide.

    OpenCV runs single-threaded meanwhile: its thread pool costs more than it gives on 224-px
    tiles, and parallelism comes from the units."""
    plan = plan_from_info(info, settings["tile_size"], settings["target_mpp"], settings["resample"])
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        _render_rows(tar, seg, info, plan, settings["png_encoder"], written)
    finally:
        cv2.setNumThreads(threads)


def _render_rows(tar: TarAppender, seg: pl.DataFrame, info: dict, plan, encoder: str, written: list) -> None:
    with open_reader(info) as reader:
        for row in seg.iter_rows(named=True):
            png, qc = render_tile(reader, row["x"], row["y"], plan, encoder)
            sha = hashlib.sha256(png).hexdigest()
            qc = {k: round(v, 4) for k, v in zip(QC_SCHEMA, qc)}
            tar.add(f"{row['key']}.png", png)
            tar.add(f"{row['key']}.json", json.dumps({**row, "sha256": sha, **qc}, sort_keys=True).encode())
            written.append((row["key"], sha, *qc.values()))
