"""The split shards' global shuffle, out of core: a two-pass bucket shuffle on several workers.

Order: in each group (train, val_in, val_out, guidance) the tiles are sorted by a keyed hash
(:func:`key_hash.key_order`, domain ``"{seed}/shuffle"``, ties by key) and cut every
``shard_size`` tiles; runs of consecutive output shards form buckets (at most ``MAX_BUCKETS``).

- Pass 1, scatter (units = runs of input shards, plus one unit per slide for ``expand_px``): each
  tile shard is read once, sequentially; every member of a routed tile is appended to its bucket's
  piece ``u{unit}/b{bucket}.bin`` (JPEG re-encodes and expanded tiles as extra items). The unit's
  item index (bucket, key, ext, variant, pos, seq, offset, size) is written beside the pieces and
  the unit folder appears by rename.
- Pass 2, gather (units = buckets): sorting only the bucket's small index gives every member its
  byte offset in its output tar; each piece is then read once, sequentially, and each member written
  at its offset (``os.pwrite``). Output tars appear by rename; memory is the index, not the bytes.

The bytes equal sorting every tile in memory and copying members in that order (the reference
path, tests/split_oracle.py), for any number of units, buckets or workers. Units are idempotent, so
a crash, a re-run or a Dask retry never duplicates a tile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .errors import DataError
from .key_hash import key_order
from .png import jpeg_from_png
from .shards import member_header, remove_stale_tmp, tmp_path, write_json_atomic
from .tar_index import split_member, stream_members

GROUPS = ("train", "val_in", "val_out", "guidance")
MAX_BUCKETS = 256  # buckets per split run: a scatter unit keeps at most this many piece files open
UNIT_TILES = 200_000  # tiles per scatter unit (fewer, larger pieces); at least 2 units per worker
BLOCK, RECORD = 512, 10240
ITEM_SCHEMA = {"bucket": pl.Int32, "key": pl.String, "ext": pl.String, "variant": pl.String, "pos": pl.Int64,
               "seq": pl.Int64, "unit": pl.String, "offset": pl.Int64, "size": pl.Int64}


def route_table(splits: pl.DataFrame, tiles: pl.DataFrame, seed: int, shard_size: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Where each tile goes. routes: key, group, pos (place in the group's order), bucket, and the
    tile's shard, slide_id, x, y (one row per tile and group); buckets: bucket, group,
    first_shard, n_shards."""
    keys = {g: splits.filter(pl.col("split") == g)["key"] for g in GROUPS[:3]}
    keys["guidance"] = splits.filter(pl.col("guidance"))["key"]
    n_shards = {g: max(1, -(-len(k) // shard_size)) for g, k in keys.items()}
    per_bucket = max(1, math.ceil(sum(n_shards.values()) / MAX_BUCKETS))
    parts, buckets, b0 = [], [], 0
    for g, k in keys.items():
        pos = np.arange(len(k), dtype=np.int64)
        order = key_order(k, f"{seed}/shuffle")
        parts.append(pl.DataFrame({"key": k.gather(order), "group": g, "pos": pos,
                                   "bucket": (b0 + pos // shard_size // per_bucket).astype(np.int32)}))
        nb = -(-n_shards[g] // per_bucket)
        buckets += [{"bucket": b0 + j, "group": g, "first_shard": j * per_bucket,
                     "n_shards": min(per_bucket, n_shards[g] - j * per_bucket)} for j in range(nb)]
        b0 += nb
    routes = pl.concat(parts).join(tiles.select("key", "shard", "slide_id", "x", "y"), on="key", how="left")
    return routes.sort("shard", "pos"), pl.DataFrame(buckets, schema={"bucket": pl.Int32, "group": pl.String,
                                                                        "first_shard": pl.Int64, "n_shards": pl.Int64})


@dataclass(frozen=True)
class ScatterUnit:
    """Pass 1: the members of ``inputs`` (tile shards), or the expanded tiles of ``slide``, into
    bucket pieces under ``work/{name}``."""

    name: str
    work: str
    routes: str
    inputs: tuple[str, ...] = ()
    slide: dict | None = None  # a slides.parquet row: this unit renders expanded tiles
    jpeg_quality: int | None = None
    expand_px: int = 0


class PieceWriter:
    """Appends items to one piece file per bucket and keeps their index."""

    def __init__(self, folder: Path, unit: str):
        self.folder, self.unit = folder, unit
        self.files: dict[int, object] = {}
        self.rows = {c: [] for c in ITEM_SCHEMA}

    def add(self, bucket: int, key: str, ext: str, variant: str, pos: int, seq: int, data: bytes) -> None:
        f = self.files.get(bucket)
        if f is None:
            f = self.files[bucket] = open(self.folder / f"b{bucket:05d}.bin", "wb", buffering=1 << 20)
        for c, v in zip(ITEM_SCHEMA, (bucket, key, ext, variant, pos, seq, self.unit, f.tell(), len(data))):
            self.rows[c].append(v)
        f.write(data)

    def close(self) -> pl.DataFrame:
        for f in self.files.values():
            f.close()
        return pl.DataFrame(self.rows, schema=ITEM_SCHEMA).sort("bucket", "offset")


def scatter(unit: ScatterUnit) -> dict:
    """Run one pass-1 unit (skipped when its folder exists); returns its counts: ``found`` (tiles
    of the routes met in the inputs), ``expanded`` ({group: tiles})."""
    done = Path(unit.work) / unit.name
    if (done / "done.json").exists():
        return json.loads((done / "done.json").read_text())
    tmp = tmp_path(done)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pw = PieceWriter(tmp, unit.name)
    try:
        counts = _scatter_slide(unit, pw) if unit.slide is not None else _scatter_shards(unit, pw)
    finally:
        items = pw.close()
    items.write_parquet(tmp / "index.parquet", statistics=True, row_group_size=50_000)
    write_json_atomic(counts, tmp / "done.json")
    try:
        os.rename(tmp, done)
    except OSError:  # another worker finished the same unit first: its output is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _routes_by_key(routes: pl.DataFrame) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for k, b, p in routes.select("key", "bucket", "pos").iter_rows():
        out.setdefault(k, []).append((b, p))
    return out


def _scatter_shards(unit: ScatterUnit, pw: PieceWriter) -> dict:
    names = [Path(p).name for p in unit.inputs]
    routes = _routes_by_key(pl.scan_parquet(unit.routes).filter(pl.col("shard").is_in(names)).collect())
    found, seq = set(), 0
    for shard in unit.inputs:
        for name, data in stream_members(Path(shard)):
            key, ext = split_member(name)
            to = routes.get(key)
            if to is None:
                continue
            found.add(key)
            jpeg = jpeg_from_png(data, unit.jpeg_quality) if unit.jpeg_quality and ext == "png" else None
            for bucket, pos in to:
                pw.add(bucket, key, ext, "", pos, seq, data)
                if jpeg is not None:
                    pw.add(bucket, key, "jpg", "jpeg", pos, seq, jpeg)
            seq += 1
    return {"found": len(found), "expanded": {}}


def _scatter_slide(unit: ScatterUnit, pw: PieceWriter) -> dict:
    from .split_expand import expanded_pngs

    sid = unit.slide["slide_id"]
    rows = pl.scan_parquet(unit.routes).filter(pl.col("slide_id") == sid).collect()
    routes, groups = _routes_by_key(rows), dict(zip(rows["bucket"], rows["group"]))
    expanded: dict[str, int] = {}
    for key, png in expanded_pngs(unit.slide, rows.unique("key"), unit.expand_px):
        for bucket, pos in routes[key]:
            pw.add(bucket, key, "png", "expand", pos, 0, png)
            expanded[groups[bucket]] = expanded.get(groups[bucket], 0) + 1
    return {"found": 0, "expanded": expanded}


def scatter_units(routes: pl.DataFrame, shard_paths: list[Path], slides: pl.DataFrame, work: Path, cfg,
                  parallel: int) -> list[ScatterUnit]:
    """Runs of consecutive input shards of about ``UNIT_TILES`` routed tiles (at least 2 units per
    worker), plus one unit per slide when ``cfg.expand_px``; names carry a digest of the inputs."""
    per_shard = dict(routes.group_by("shard").len().iter_rows())
    paths = [p for p in shard_paths if per_shard.get(p.name)]
    sizes = np.array([per_shard[p.name] for p in paths], dtype=np.int64)
    n_units = min(len(paths), max(2 * parallel, math.ceil(int(sizes.sum()) / UNIT_TILES))) if len(paths) else 0
    cuts = np.searchsorted(np.cumsum(sizes), np.arange(1, n_units) * sizes.sum() / max(n_units, 1), side="right")
    groups = [g for g in np.split(np.arange(len(paths)), cuts) if len(g)] if n_units else []
    common = dict(work=str(work), routes=str(work / "routes.parquet"), jpeg_quality=cfg.jpeg_quality,
                  expand_px=cfg.expand_px)
    units = [ScatterUnit(_unit_name("s", i, [str(paths[j]) for j in g]), inputs=tuple(str(paths[j]) for j in g), **common)
             for i, g in enumerate(groups)]
    if cfg.expand_px:
        want = set(routes["slide_id"].unique().to_list())
        for i, row in enumerate(r for r in slides.sort("slide_id").to_dicts() if r["slide_id"] in want):
            units.append(ScatterUnit(_unit_name("x", i, [row["slide_id"], str(row["path"])]), slide=row, **common))
    return units


def _unit_name(kind: str, i: int, inputs: list[str]) -> str:
    return f"{kind}{i:05d}-{hashlib.sha256(chr(0).join(inputs).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class GatherUnit:
    """Pass 2: output shards ``first_shard .. first_shard + n_shards - 1`` of ``group`` (every
    folder variant) from the pieces of ``bucket`` in the scatter units ``units``."""

    bucket: int
    group: str
    first_shard: int
    n_shards: int
    work: str
    out: str
    units: tuple[str, ...]
    variants: tuple[tuple[str, str | None], ...]  # (folder suffix, variant): ("", None), ("_jpeg70", "jpeg")
    shard_size: int

    def target(self, folder: str, shard_no: int) -> Path:
        return Path(self.out) / folder / f"{folder}-{shard_no:06d}.tar"

    def targets(self) -> list[tuple[str, int]]:
        return [(f"{self.group}{suffix}", self.first_shard + i) for suffix, _ in self.variants for i in range(self.n_shards)]


def _header_len(name: pl.Expr, size: pl.Expr) -> pl.Expr:
    """Bytes of :func:`shards.member_header` (512 unless the name needs a PAX record)."""
    short = (name.str.len_bytes() < 100) & name.str.contains(r"^[\x00-\x7f]*$") & (size < 8**11)
    return pl.when(short).then(pl.lit(BLOCK, pl.Int64)).otherwise(pl.lit(None, pl.Int64))


def layout(items: pl.DataFrame, unit: GatherUnit) -> pl.DataFrame:
    """Every member of the bucket's output shards: folder, shard_no, name, source (unit, offset,
    size) and out_offset (of its header in the output tar), in output order."""
    base = items.filter(pl.col("variant") == "")
    frames = []
    for suffix, variant in unit.variants:
        rows = base
        if variant is not None:  # the variant's item replaces the png member; expand drops tiles without one
            sub = items.filter(pl.col("variant") == variant).select(
                "key", unit_v="unit", offset_v="offset", size_v="size", ext_v="ext")
            rows = base.join(sub, on="key", how="inner" if variant == "expand" else "left")
            swap = (pl.col("ext") == "png") & pl.col("unit_v").is_not_null()
            rows = rows.with_columns(*(pl.when(swap).then(pl.col(f"{c}_v")).otherwise(pl.col(c)).alias(c)
                                       for c in ("unit", "offset", "size", "ext")))
        frames.append(rows.select("pos", "seq", "key", "ext", "unit", "offset", "size",
                                  folder=pl.lit(f"{unit.group}{suffix}"), shard_no=pl.col("pos") // unit.shard_size))
    lay = pl.concat(frames).sort("folder", "pos", "seq").with_columns(name=pl.col("key") + "." + pl.col("ext"))
    lay = lay.with_columns(hlen=_header_len(pl.col("name"), pl.col("size")))
    if lay["hlen"].null_count():
        lay = lay.with_columns(hlen=pl.Series([h or len(member_header(n, s)) for h, n, s in
                                                lay.select("hlen", "name", "size").iter_rows()], dtype=pl.Int64))
    stride = pl.col("hlen") + pl.col("size") + (-pl.col("size")) % BLOCK
    return lay.with_columns(out_offset=(stride.cum_sum() - stride).over("folder", "shard_no"), stride=stride)


def gather(unit: GatherUnit) -> int:
    """Run one pass-2 unit (output shards that exist are kept); returns the members written."""
    todo = [(f, i) for f, i in unit.targets() if not unit.target(f, i).exists()]
    if not todo:
        return 0
    index = [str(Path(unit.work) / u / "index.parquet") for u in unit.units]
    items = (pl.scan_parquet(index).filter(pl.col("bucket") == unit.bucket).collect() if index
             else pl.DataFrame(schema=ITEM_SCHEMA))
    lay = layout(items, unit)
    want = pl.DataFrame({"folder": [f for f, _ in todo], "shard_no": [i for _, i in todo]},
                        schema={"folder": pl.String, "shard_no": pl.Int64})
    lay = lay.join(want, on=["folder", "shard_no"], how="semi")
    fds = {}
    for folder, i in todo:
        unit.target(folder, i).parent.mkdir(parents=True, exist_ok=True)
        fds[(folder, i)] = os.open(tmp_path(unit.target(folder, i)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _copy_members(lay, unit, fds)
        ends = dict(((f, i), e) for f, i, e in lay.group_by("folder", "shard_no").agg(pl.col("stride").sum()).iter_rows())
        for (folder, i), fd in fds.items():
            end = ends.get((folder, i), 0)
            os.pwrite(fd, bytes(2 * BLOCK + (-(end + 2 * BLOCK) % RECORD)), end)
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    for folder, i in todo:
        os.replace(tmp_path(unit.target(folder, i)), unit.target(folder, i))
    return lay.height


def _copy_members(lay: pl.DataFrame, unit: GatherUnit, fds: dict) -> None:
    """Read each piece once, in order, writing every member (header, data, padding) at its offset."""
    for (src,), part in lay.sort("unit", "offset").group_by("unit", maintain_order=True):
        with open(Path(unit.work) / src / f"b{unit.bucket:05d}.bin", "rb", buffering=1 << 20) as f:
            last, data = -1, b""
            for off, size, name, folder, i, out in part.select(
                    "offset", "size", "name", "folder", "shard_no", "out_offset").iter_rows():
                if off != last:
                    f.seek(off)
                    data, last = f.read(size), off
                    if len(data) != size:
                        raise DataError(f"{f.name}: piece truncated at {off}")
                os.pwrite(fds[(folder, i)], member_header(name, size) + data + bytes(-size % BLOCK), out)


def shuffle_to_shards(splits: pl.DataFrame, tiles: pl.DataFrame, slides: pl.DataFrame, shard_paths: list[Path],
                      out: Path, cfg, ex, parallel: int) -> dict:
    """Write ``out/{group}{suffix}/{group}{suffix}-{i:06d}.tar`` for every group and variant;
    returns counts per folder and the seconds of each pass."""
    import time

    work = out / ".shuffle"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    routes, buckets = route_table(splits, tiles, cfg.seed, cfg.shard_size)
    routes.write_parquet(work / "routes.parquet", statistics=True, row_group_size=100_000)
    units = scatter_units(routes, shard_paths, slides, work, cfg, parallel)
    t1 = time.perf_counter()
    results = list(ex.map(scatter, units, "split: scatter"))
    _check_found(splits, routes, results, work, units)
    t2 = time.perf_counter()
    variants = _variants(cfg)
    for suffix, _ in variants:
        for g in GROUPS:
            remove_stale_tmp(out / f"{g}{suffix}")
    gunits = [GatherUnit(b, g, first, n, str(work), str(out), tuple(u.name for u in units), variants, cfg.shard_size)
              for b, g, first, n in buckets.iter_rows()]
    members = sum(ex.map(gather, gunits, "split: gather"))
    t3 = time.perf_counter()
    shutil.rmtree(work)
    return {"counts": _counts(splits, results, cfg, variants), "members": members,
            "seconds": {"route": t1 - t0, "scatter": t2 - t1, "gather": t3 - t2}}


def _variants(cfg) -> tuple[tuple[str, str | None], ...]:
    out = [("", None)]
    if cfg.jpeg_quality:
        out.append((f"_jpeg{cfg.jpeg_quality}", "jpeg"))
    if cfg.expand_px:
        out.append((f"_expand{cfg.expand_px}", "expand"))
    return tuple(out)


def _counts(splits: pl.DataFrame, results: list[dict], cfg, variants) -> dict[str, int]:
    sizes = {g: splits.filter(pl.col("split") == g).height for g in GROUPS[:3]}
    sizes["guidance"] = int(splits["guidance"].sum())
    counts = {}
    for suffix, variant in variants:
        for g in GROUPS:
            counts[f"{g}{suffix}"] = (sum(r["expanded"].get(g, 0) for r in results) if variant == "expand"
                                      else sizes[g])
    return counts


def _check_found(splits: pl.DataFrame, routes: pl.DataFrame, results: list[dict], work: Path, units) -> None:
    """Every tile of the split must have been met in the tile shards."""
    if sum(r["found"] for r in results) >= splits.height:
        return
    index = [str(work / u.name / "index.parquet") for u in units if u.slide is None]
    seen = pl.scan_parquet(index).select("key").unique().collect() if index else pl.DataFrame({"key": []}, schema={"key": pl.String})
    missing = splits.join(seen, on="key", how="anti")["key"].sort()
    if missing.len():
        raise DataError(f"{len(missing)} tiles of tiles.parquet are not in the tile shards (or not in the shard "
                        f"tiles.parquet names), e.g. {missing.head(3).to_list()}")
