"""The split computed the direct way (whole tables in memory, per-row Python, one dict per key):
the reference that the vectorised assignment and the out-of-core bucket shuffle must reproduce.

Test-only: slow and memory-hungry by design (it is the 'naive' path of benchmarks/scale.py too).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import polars as pl

from cytosyn_data.core.hashing import key_hash_one
from cytosyn_data.core.hashing import stable_hash
from cytosyn_data.core.quotas import NULL_STRATUM, apportion
from cytosyn_data.io.png import jpeg_from_png
from cytosyn_data.io.tar_read import split_member
from cytosyn_data.io.tar_write import write_tar_atomic
from cytosyn_data.run.schemas import SPLITS_SCHEMA
from cytosyn_data.split.assign import choose_val_out, val_in_quotas
from cytosyn_data.split.config import qc_keep

# The member index and random reader the split used before its shuffle went out of core.
INDEX_SCHEMA = {"key": pl.String, "ext": pl.String, "shard": pl.String, "offset": pl.Int64, "size": pl.Int64}


def index_tar(path: Path) -> pl.DataFrame:
    """One row per regular member of the tar: key, ext, shard (path), data offset, size."""
    rows = {"key": [], "ext": [], "shard": [], "offset": [], "size": []}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member(info.name)
            rows["key"].append(key)
            rows["ext"].append(ext)
            rows["shard"].append(str(path))
            rows["offset"].append(info.offset_data)
            rows["size"].append(info.size)
    return pl.DataFrame(rows, schema=INDEX_SCHEMA)


def index_shards(paths: list[Path]) -> pl.DataFrame:
    """Index of every member of every shard (in shard and member order)."""
    parts = [index_tar(Path(p)) for p in paths]
    return pl.concat(parts) if parts else pl.DataFrame(schema=INDEX_SCHEMA)


class MemberReader:
    """Reads member bytes by (shard, offset, size), keeping a few shard files open."""

    def __init__(self, max_open: int = 64):
        self._files: dict[str, object] = {}
        self.max_open = max_open

    def read(self, shard: str, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.max_open:
                self.close()
            f = self._files[shard] = open(shard, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise IOError(f"{shard}: member at {offset} is truncated")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def overlapping_pairs(a: pl.DataFrame, b: pl.DataFrame, eps: float = 1e-6) -> set[str]:
    """Keys of ``a`` whose read window overlaps one of ``b`` on the same slide (all pairs, per slide)."""
    out = set()
    for sid in set(a["slide_id"]) & set(b["slide_id"]):
        wa, wb = (t.filter(pl.col("slide_id") == sid) for t in (a, b))
        def box(w):
            ds = w["downsample"].to_numpy()
            x0, y0 = w["level_x"].to_numpy() * ds, w["level_y"].to_numpy() * ds
            r = w["region"].to_numpy() * ds
            return x0, y0, x0 + r, y0 + r
        ax0, ay0, ax1, ay1 = (v[:, None] for v in box(wa))
        bx0, by0, bx1, by1 = (v[None, :] for v in box(wb))
        hit = ((ax0 < bx1 - eps) & (bx0 < ax1 - eps) & (ay0 < by1 - eps) & (by0 < ay1 - eps)).any(axis=1)
        out |= set(wa["key"].filter(pl.Series(hit)).to_list())
    return out


def assign_splits(slides, tiles, curation, cfg) -> pl.DataFrame:
    t = tiles.with_columns(patient=pl.coalesce("patient", "slide_id")).filter(qc_keep(tiles, cfg))
    if curation is not None:
        t = t.filter(~pl.col("key").is_in(curation.filter(~pl.col("keep"))["key"].implode()))
    held = choose_val_out(slides, cfg.val_out_fraction, cfg.seed)
    t = t.with_columns(split=pl.when(pl.col("patient").is_in(list(held))).then(pl.lit("val_out")).otherwise(pl.lit("train")))
    t = t.with_columns(_h=pl.Series([key_hash_one(f"{cfg.seed}/val_in", k) for k in t["key"]], dtype=pl.UInt64))
    t = t.with_columns(_rank=pl.col("_h").rank("ordinal").over("slide_id"))
    t = t.join(val_in_quotas(t.filter(pl.col("split") == "train"), cfg), on="slide_id", how="left")
    is_in = (pl.col("split") == "train") & (pl.col("_rank") <= pl.col("_quota").fill_null(0))
    t = t.with_columns(split=pl.when(is_in).then(pl.lit("val_in")).otherwise(pl.col("split")))
    clash = overlapping_pairs(t.filter(pl.col("split") == "val_in"), t.filter(pl.col("split") == "train"))
    t = t.filter(~pl.col("key").is_in(list(clash)))
    train = t.filter(pl.col("split") == "train").with_columns(stratum=pl.col("tss").fill_null(NULL_STRATUM))
    counts = train.group_by("stratum").len().sort("stratum")
    quotas = apportion(cfg.guidance_tiles, counts["len"].to_numpy().astype(float), counts["len"].to_numpy(),
                       np.array([stable_hash(f"{cfg.seed}/g/{s}") for s in counts["stratum"]], dtype=np.uint64))
    chosen = []
    for s, q in zip(counts["stratum"], quotas):
        part = train.filter(pl.col("stratum") == s).sort("_h", "key")
        chosen += part["key"][: int(q)].to_list()
    t = t.with_columns(guidance=pl.col("key").is_in(chosen))
    return t.select(list(SPLITS_SCHEMA)).cast(SPLITS_SCHEMA).sort("key")


def write_split_shards(splits, shard_paths, out, cfg, expanded: dict[str, bytes] | None = None) -> dict[str, int]:
    """Every split's keys sorted by the shuffle hash, members copied key by key from a full index."""
    index = index_shards(shard_paths).sort("shard", "offset")
    by_key = {k: g for (k,), g in index.group_by("key", maintain_order=True)}
    groups = {n: splits.filter(pl.col("split") == n)["key"].to_list() for n in ("train", "val_in", "val_out")}
    groups["guidance"] = splits.filter(pl.col("guidance"))["key"].to_list()
    counts = {}
    with MemberReader() as reader:
        for name, keys in groups.items():
            keys = sorted(keys, key=lambda k: (key_hash_one(f"{cfg.seed}/shuffle", k), k))
            variants = [(name, None)]
            if cfg.jpeg_quality:
                variants.append((f"{name}_jpeg{cfg.jpeg_quality}", "jpeg"))
            if expanded is not None:
                variants.append((f"{name}_expand{cfg.expand_px}", "expand"))
            for folder, kind in variants:
                keep = [k for k in keys if kind != "expand" or k in expanded]
                for i in range(max(1, -(-len(keys) // cfg.shard_size))):
                    members = []
                    for k in keys[i * cfg.shard_size:(i + 1) * cfg.shard_size]:
                        if kind == "expand" and k not in expanded:
                            continue
                        for row in by_key[k].iter_rows(named=True):
                            data = reader.read(row["shard"], row["offset"], row["size"])
                            if kind == "jpeg" and row["ext"] == "png":
                                members.append((f"{k}.jpg", jpeg_from_png(data, cfg.jpeg_quality)))
                            elif kind == "expand" and row["ext"] == "png":
                                members.append((f"{k}.png", expanded[k]))
                            else:
                                members.append((f"{k}.{row['ext']}", data))
                    write_tar_atomic(out / folder / f"{folder}-{i:06d}.tar", members)
                counts[folder] = len(keep)
    return counts
