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

import ctypes
import ctypes.util
import functools
import hashlib
import json
import platform
import time
from pathlib import Path

import cv2
import polars as pl

from cytosyn_data.core.secrets import redact_text
from cytosyn_data.io.atomic import atomic_write_bytes, write_parquet_atomic
from cytosyn_data.io.tar_write import TarAppender
from cytosyn_data.run.records import SlideRead
from cytosyn_data.run.schemas import QC_SCHEMA, TILES_SCHEMA, WRITTEN_SCHEMA
from cytosyn_data.tile.plan import ShardUnit
from cytosyn_data.tile.render import open_reader, plan_from_info, render_tiles


def unit_is_current(unit: ShardUnit) -> bool:
    plans = Path(unit.plans_dir)
    digest = plans / f"{unit.name}.sha256"
    return ((Path(unit.shard_dir) / unit.name).exists() and (plans / f"{unit.name}.parquet").exists()
            and digest.exists() and digest.read_text() == unit.digest)


@functools.cache
def keep_freed_memory() -> None:
    """Once per process, on glibc: let malloc keep up to 128 MiB of freed memory instead of
    returning it to the system at once. The kernel allocates and frees ~0.7 MB per tile (the JPEG
    decoder's buffers, the region, the resized tile); with glibc's adaptive defaults the top of the
    heap is trimmed and touched again tile after tile, ~40 page faults per tile, ~5% of the stage's
    CPU time (benchmarks/tile_throughput.py). Memory stays bounded by the band cache's peak."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # set first: a fixed trim threshold ends the adaptive mmap one
    libc.mallopt(m_trim_threshold, 128 * 2**20)


def write_shard(unit: ShardUnit) -> dict:
    """Write one shard (see the module doc); returns name, status, tile count, failed slides, seconds."""
    t0 = time.perf_counter()
    keep_freed_memory()
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
                where = unit.slides[sid].url or unit.slides[sid].path
                failed[sid] = redact_text(f"{where}: extraction failed: {type(exc).__name__}: {exc}")
        done = pl.DataFrame(written, schema=WRITTEN_SCHEMA, orient="row")
        table = rows.join(done, on="key", how="inner", maintain_order="left").select(list(TILES_SCHEMA))
        write_parquet_atomic(table.cast(TILES_SCHEMA), plans / f"{unit.name}.parquet")
        tar.commit()
    if not failed and unit.complete:
        atomic_write_bytes(plans / f"{unit.name}.sha256", unit.digest.encode(), durable=False)
    status = "partial" if failed or not unit.complete else "written"
    return {"name": unit.name, "status": status, "n": len(written), "failed": failed,
            "seconds": time.perf_counter() - t0}


def _write_segment(tar: TarAppender, seg: pl.DataFrame, info: SlideRead, settings: dict, written: list) -> None:
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


#: tiles rendered before their QC measures are taken together (tile_kernel.qc_of_halves)
QC_BATCH = 64
_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(..., sort_keys=True) without a new encoder per call


def _render_rows(tar: TarAppender, seg: pl.DataFrame, info: SlideRead, plan, encoder: str, written: list) -> None:
    with open_reader(info) as reader:
        for batch in seg.iter_slices(QC_BATCH):
            pngs, qcs = render_tiles(reader, batch["x"].to_list(), batch["y"].to_list(), plan, encoder)
            for row, png, qc in zip(batch.iter_rows(named=True), pngs, qcs.tolist()):
                sha = hashlib.sha256(png).hexdigest()
                qc = [round(v, 4) for v in qc]
                tar.add(f"{row['key']}.png", png)
                tar.add(f"{row['key']}.json", _JSON.encode({**row, "sha256": sha, **dict(zip(QC_SCHEMA, qc))}).encode())
                written.append((row["key"], sha, *qc))
