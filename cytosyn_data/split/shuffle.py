"""The split shards' global shuffle, out of core: a two-pass bucket shuffle on several workers.

Order: in each group (train, val_in, val_out, guidance) the tiles are sorted by a keyed hash
``h`` (:func:`key_hash.key_hash`, domain ``"{seed}/shuffle"``, ties by key) and cut every
``shard_size`` tiles. Buckets are equal ranges of ``h`` (at most ``MAX_BUCKETS`` in a run), so no
process ever sorts the whole group: a tile's bucket follows from its own hash.

- Pass 1, scatter (units = runs of input shards, plus one unit per slide for ``expand_px``): each
  tile shard is read once, sequentially; every member of a tile of the split is appended to its
  bucket's piece ``{unit}/b{bucket}.bin`` (JPEG re-encodes and expanded tiles as extra items). The
  unit's item index (bucket, key, h, ext, variant, seq, offset, size) is written beside its pieces,
  the unit folder appears by rename, and the unit reports its tiles per bucket.
- Pass 2, gather (a unit per bucket where output shards start): the bucket sizes give each bucket's
  first position in its group; sorting only the bucket's small index (and the head of the next
  bucket, for the shard that straddles them) gives every member its byte offset in its output tar.
  Each piece is then read once, sequentially, and each member written at its offset
  (``os.pwrite``). Output tars appear by rename; memory is the index, never the bytes.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.hashing import key_hash
from cytosyn_data.io.atomic import remove_stale_tmp, tmp_path, write_json_atomic
from cytosyn_data.io.png import jpeg_from_png
from cytosyn_data.io.tar_read import split_member, stream_members
from cytosyn_data.io.tar_write import member_header
from cytosyn_data.split.expand import expanded_pngs

GROUPS = ("train", "val_in", "val_out", "guidance")
MAX_BUCKETS = 256  # buckets per split run: a scatter unit keeps at most this many piece files open
UNIT_TILES = 200_000  # tiles per scatter unit (fewer, larger pieces); at least 2 units per worker
BLOCK, RECORD = 512, 10240
ITEM_SCHEMA = {"bucket": pl.Int32, "key": pl.String, "h": pl.UInt64, "ext": pl.String, "variant": pl.String,
               "seq": pl.Int64, "unit": pl.String, "offset": pl.Int64, "size": pl.Int64}


def group_sizes(parts: list[Path], guidance: pl.Series) -> dict[str, int]:
    """Tiles per group (train, val_in, val_out from the assignment parts; guidance)."""
    n = dict(pl.scan_parquet(parts).group_by("split").len().collect().iter_rows()) if parts else {}
    return {**{g: int(n.get(g, 0)) for g in GROUPS[:3]}, "guidance": len(guidance)}


def bucket_layout(sizes: dict[str, int], shard_size: int) -> dict[str, tuple[int, int]]:
    """group -> (first global bucket id, number of buckets): buckets of about
    ``max(2 x shard_size, total / MAX_BUCKETS)`` tiles."""
    per = max(2 * shard_size, math.ceil(sum(sizes.values()) / MAX_BUCKETS))
    out, first = {}, 0
    for g in GROUPS:
        n = max(1, math.ceil(sizes[g] / per))
        out[g], first = (first, n), first + n
    return out


def bucket_of(h: np.ndarray, first: int, n: int) -> np.ndarray:
    """Global bucket id of hashes ``h`` (63-bit) in a group of ``n`` equal hash ranges from ``first``."""
    width = np.uint64(-(-(2**63) // n))
    return (first + np.minimum(h // width, np.uint64(n - 1)).astype(np.int64)).astype(np.int32)


@dataclass(frozen=True)
class ScatterUnit:
    """Pass 1: the members of ``inputs`` (tile shards), or the expanded tiles of ``slide``, into
    bucket pieces under ``work/{name}``."""

    name: str
    work: str
    parts: tuple[str, ...]  # the assignment's tables (key, split, slide_id, shard, x, y)
    guidance: tuple[str, ...]
    buckets: tuple[tuple[str, int, int], ...]  # (group, first bucket, buckets)
    seed: int
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

    def add(self, bucket: int, key: str, h: int, ext: str, variant: str, seq: int, data: bytes) -> None:
        f = self.files.get(bucket)
        if f is None:
            f = self.files[bucket] = open(self.folder / f"b{bucket:05d}.bin", "wb", buffering=1 << 20)
        for c, v in zip(ITEM_SCHEMA, (bucket, key, h, ext, variant, seq, self.unit, f.tell(), len(data))):
            self.rows[c].append(v)
        f.write(data)

    def close(self) -> pl.DataFrame:
        for f in self.files.values():
            f.close()
        return pl.DataFrame(self.rows, schema=ITEM_SCHEMA).sort("bucket", "offset")


def scatter(unit: ScatterUnit) -> dict:
    """Run one pass-1 unit (skipped when its folder exists); returns its counts: ``found`` (tiles of
    the split met in the inputs), ``buckets`` ({bucket: tiles}), ``expanded`` ({group: tiles})."""
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


def unit_routes(unit: ScatterUnit, where: pl.Expr, columns: tuple[str, ...] = ()) -> tuple[dict, pl.DataFrame]:
    """key -> (h, [(bucket, group), ...]) for the tiles of the split matching ``where``, and those rows."""
    rows = pl.scan_parquet(list(unit.parts)).filter(where).select("key", "split", *columns).collect()
    h = key_hash(rows["key"], f"{unit.seed}/shuffle")
    layout = {g: (first, n) for g, first, n in unit.buckets}
    gb = {g: bucket_of(h, *layout[g]) for g in GROUPS[:3]}
    guided = rows["key"].is_in(pl.Series(unit.guidance, dtype=pl.String).implode()).to_numpy()
    gbg = bucket_of(h, *layout["guidance"])
    out = {}
    for i, (key, split) in enumerate(rows.select("key", "split").iter_rows()):
        to = [(int(gb[split][i]), split)] + ([(int(gbg[i]), "guidance")] if guided[i] else [])
        out[key] = (int(h[i]), to)
    return out, rows


def _scatter_shards(unit: ScatterUnit, pw: PieceWriter) -> dict:
    routes, _ = unit_routes(unit, pl.col("shard").is_in([Path(p).name for p in unit.inputs]))
    found, seq, per_bucket = set(), 0, {}
    for shard in unit.inputs:
        for name, data in stream_members(Path(shard)):
            key, ext = split_member(name)
            r = routes.get(key)
            if r is None:
                continue
            h, to = r
            if key not in found:
                found.add(key)
                for bucket, _ in to:
                    per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
            jpeg = jpeg_from_png(data, unit.jpeg_quality) if unit.jpeg_quality and ext == "png" else None
            for bucket, _ in to:
                pw.add(bucket, key, h, ext, "", seq, data)
                if jpeg is not None:
                    pw.add(bucket, key, h, "jpg", "jpeg", seq, jpeg)
            seq += 1
    return {"found": len(found), "buckets": {str(b): n for b, n in per_bucket.items()}, "expanded": {}}


def _scatter_slide(unit: ScatterUnit, pw: PieceWriter) -> dict:
    routes, rows = unit_routes(unit, pl.col("slide_id") == unit.slide["slide_id"], ("x", "y"))
    expanded: dict[str, int] = {}
    for key, png in expanded_pngs(unit.slide, rows, unit.expand_px):
        h, to = routes[key]
        for bucket, group in to:
            pw.add(bucket, key, h, "png", "expand", 0, png)
            expanded[group] = expanded.get(group, 0) + 1
    return {"found": 0, "buckets": {}, "expanded": expanded}


def scatter_units(parts: list[Path], guidance: pl.Series, layout: dict, shard_paths: list[Path], slides: pl.DataFrame,
                  work: Path, cfg, parallel: int) -> list[ScatterUnit]:
    """Runs of consecutive input shards of about ``UNIT_TILES`` tiles of the split (at least 2 units
    per worker), plus one unit per slide when ``cfg.expand_px``; names carry a digest of the inputs and
    of what routes the items (buckets, seed, variants), so a unit left by another run is never reused."""
    scan = pl.scan_parquet(parts)
    per_shard = dict(scan.group_by("shard").len().collect().iter_rows())
    paths = [p for p in shard_paths if per_shard.get(p.name)]
    sizes = np.array([per_shard[p.name] for p in paths], dtype=np.int64)
    n_units = min(len(paths), max(2 * parallel, math.ceil(int(sizes.sum()) / UNIT_TILES))) if len(paths) else 0
    cuts = np.searchsorted(np.cumsum(sizes), np.arange(1, n_units) * sizes.sum() / max(n_units, 1), side="right")
    groups = [g for g in np.split(np.arange(len(paths)), cuts) if len(g)] if n_units else []
    common = dict(work=str(work), parts=tuple(map(str, parts)), guidance=tuple(guidance.to_list()),
                  buckets=tuple((g, *layout[g]) for g in GROUPS), seed=cfg.seed, jpeg_quality=cfg.jpeg_quality,
                  expand_px=cfg.expand_px)
    what = [json.dumps({k: v for k, v in common.items() if k != "work"}, sort_keys=True)]  # what routes the items
    units = [ScatterUnit(_unit_name("s", i, [*what, *(str(paths[j]) for j in g)]), inputs=tuple(str(paths[j]) for j in g),
                         **common) for i, g in enumerate(groups)]
    if cfg.expand_px:
        want = set(scan.select(pl.col("slide_id").unique()).collect()["slide_id"].to_list())
        for i, row in enumerate(r for r in slides.sort("slide_id").to_dicts() if r["slide_id"] in want):
            units.append(ScatterUnit(_unit_name("x", i, [*what, row["slide_id"], str(row["path"])]), slide=row, **common))
    return units


def _unit_name(kind: str, i: int, inputs: list[str]) -> str:
    return f"{kind}{i:05d}-{hashlib.sha256(chr(0).join(inputs).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class GatherUnit:
    """Pass 2: the output shards ``shards`` of ``group`` (every folder variant), which start in
    bucket ``load[0]`` (first position ``prefix``) and end before position ``end`` (reaching into
    the next buckets of ``load`` when they straddle), from the pieces of the scatter units ``units``."""

    group: str
    shards: tuple[int, ...]
    prefix: int
    end: int
    load: tuple[int, ...]
    work: str
    out: str
    units: tuple[str, ...]
    variants: tuple[tuple[str, str | None], ...]  # (folder suffix, variant): ("", None), ("_jpeg70", "jpeg")
    shard_size: int

    def target(self, folder: str, shard_no: int) -> Path:
        return Path(self.out) / folder / f"{folder}-{shard_no:06d}.tar"

    def targets(self) -> list[tuple[str, int]]:
        return [(f"{self.group}{suffix}", i) for suffix, _ in self.variants for i in self.shards]


def gather_units(layout: dict, counts: dict[int, int], sizes: dict[str, int], work: Path, out: Path,
                 units: tuple[str, ...], variants, shard_size: int) -> list[GatherUnit]:
    """One unit per bucket where output shards start (an empty group writes one empty shard)."""
    res = []
    for g in GROUPS:
        first, n = layout[g]
        c = [counts.get(first + j, 0) for j in range(n)]
        if sum(c) != sizes[g]:
            raise DataError(f"split: {sum(c)} tiles of {g} routed to buckets, {sizes[g]} assigned")
        prefix = np.concatenate([[0], np.cumsum(c)]).astype(int)
        for j in range(n):
            shards = tuple(range(-(-prefix[j] // shard_size), -(-prefix[j + 1] // shard_size)))
            if sizes[g] == 0 and j == 0:
                shards = (0,)
            if not shards:
                continue
            end = min((shards[-1] + 1) * shard_size, sizes[g])
            load = tuple(first + k for k in range(j, n) if prefix[k] < end or k == j)
            res.append(GatherUnit(g, shards, int(prefix[j]), int(end), load, str(work), str(out), units, variants,
                                  shard_size))
    return res


def _header_len(name: pl.Expr, size: pl.Expr) -> pl.Expr:
    """Bytes of :func:`shards.member_header` (512 unless the name needs a PAX record)."""
    short = (name.str.len_bytes() < 100) & name.str.contains(r"^[\x00-\x7f]*$") & (size < 8**11)
    return pl.when(short).then(pl.lit(BLOCK, pl.Int64)).otherwise(pl.lit(None, pl.Int64))


def positions(items: pl.DataFrame, unit: GatherUnit) -> pl.DataFrame:
    """The base items (variant "") of the loaded buckets with ``pos``, the tile's place in its group,
    kept when it falls in this unit's shards."""
    base = items.filter(pl.col("variant") == "")
    keys = base.select("h", "key").unique().sort("h", "key").with_row_index("pos", offset=unit.prefix)
    lo = unit.shards[0] * unit.shard_size
    return base.join(keys.with_columns(pl.col("pos").cast(pl.Int64)), on=["h", "key"]).filter(
        (pl.col("pos") >= lo) & (pl.col("pos") < unit.end))


def layout(items: pl.DataFrame, unit: GatherUnit) -> pl.DataFrame:
    """Every member of the unit's output shards: folder, shard_no, name, source (unit, bucket,
    offset, size) and out_offset (of its header in the output tar), in output order."""
    base = positions(items, unit)
    frames = []
    for suffix, variant in unit.variants:
        rows = base
        if variant is not None:  # the variant's item replaces the png member; expand drops tiles without one
            sub = items.filter(pl.col("variant") == variant).select(
                "key", unit_v="unit", bucket_v="bucket", offset_v="offset", size_v="size", ext_v="ext").unique("key")
            rows = base.join(sub, on="key", how="inner" if variant == "expand" else "left")
            swap = (pl.col("ext") == "png") & pl.col("unit_v").is_not_null()
            rows = rows.with_columns(*(pl.when(swap).then(pl.col(f"{c}_v")).otherwise(pl.col(c)).alias(c)
                                       for c in ("unit", "bucket", "offset", "size", "ext")))
        frames.append(rows.select("pos", "seq", "key", "ext", "unit", "bucket", "offset", "size",
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
    items = (pl.scan_parquet(index).filter(pl.col("bucket").is_in(list(unit.load))).collect() if index
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
    for (src, bucket), part in lay.sort("unit", "bucket", "offset").group_by("unit", "bucket", maintain_order=True):
        with open(Path(unit.work) / src / f"b{bucket:05d}.bin", "rb", buffering=1 << 20) as f:
            last, data = -1, b""
            for off, size, name, folder, i, out in part.select(
                    "offset", "size", "name", "folder", "shard_no", "out_offset").iter_rows():
                if off != last:
                    f.seek(off)
                    data, last = f.read(size), off
                    if len(data) != size:
                        raise DataError(f"{f.name}: piece truncated at {off}")
                os.pwrite(fds[(folder, i)], member_header(name, size) + data + bytes(-size % BLOCK), out)


def shuffle_to_shards(parts: list[Path], guidance: pl.Series, slides: pl.DataFrame, shard_paths: list[Path],
                      out: Path, cfg, ex, parallel: int) -> dict:
    """Write ``out/{group}{suffix}/{group}{suffix}-{i:06d}.tar`` for every group and variant from the
    assignment's tables ``parts`` and the guidance keys; returns counts per folder and the seconds
    of each pass."""
    work = out / ".shuffle"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = group_sizes(parts, guidance)
    buckets = bucket_layout(sizes, cfg.shard_size)
    units = scatter_units(parts, guidance, buckets, shard_paths, slides, work, cfg, parallel)
    t1 = time.perf_counter()
    results = list(ex.map(scatter, units, "split: scatter"))
    _check_found(parts, sizes, results, work, units)
    t2 = time.perf_counter()
    counts: dict[int, int] = {}
    for r in results:
        for b, n in r["buckets"].items():
            counts[int(b)] = counts.get(int(b), 0) + n
    variants = _variants(cfg)
    for suffix, _ in variants:
        for g in GROUPS:
            remove_stale_tmp(out / f"{g}{suffix}")
    gunits = gather_units(buckets, counts, sizes, work, out, tuple(u.name for u in units), variants, cfg.shard_size)
    members = sum(ex.map(gather, gunits, "split: gather"))
    t3 = time.perf_counter()
    shutil.rmtree(work)
    return {"counts": _counts(sizes, results, variants), "members": members,
            "seconds": {"route": t1 - t0, "scatter": t2 - t1, "gather": t3 - t2}}


def _variants(cfg) -> tuple[tuple[str, str | None], ...]:
    out = [("", None)]
    if cfg.jpeg_quality:
        out.append((f"_jpeg{cfg.jpeg_quality}", "jpeg"))
    if cfg.expand_px:
        out.append((f"_expand{cfg.expand_px}", "expand"))
    return tuple(out)


def _counts(sizes: dict[str, int], results: list[dict], variants) -> dict[str, int]:
    counts = {}
    for suffix, variant in variants:
        for g in GROUPS:
            counts[f"{g}{suffix}"] = (sum(r["expanded"].get(g, 0) for r in results) if variant == "expand"
                                      else sizes[g])
    return counts


def _check_found(parts: list[Path], sizes: dict[str, int], results: list[dict], work: Path, units) -> None:
    """Every tile of the split must have been met in the tile shards."""
    want = sum(sizes[g] for g in GROUPS[:3])
    if sum(r["found"] for r in results) >= want:
        return
    index = [str(work / u.name / "index.parquet") for u in units if u.slide is None]
    seen = (pl.scan_parquet(index).select("key").unique() if index
            else pl.LazyFrame(schema={"key": pl.String}))
    missing = pl.scan_parquet(parts).select("key").join(seen, on="key", how="anti").collect()["key"].sort()
    if missing.len():
        raise DataError(f"{len(missing)} tiles of tiles.parquet are not in the tile shards (or not in the shard "
                        f"tiles.parquet names), e.g. {missing.head(3).to_list()}")
