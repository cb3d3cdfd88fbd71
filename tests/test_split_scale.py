"""The scalable split (vectorised assignment, out-of-core bucket shuffle on several workers) gives
the same splits, audit and shard bytes as the direct in-memory path (tests/split_oracle.py)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import polars as pl
import pytest
import split_oracle

from cytosyn_data.cli import main
from cytosyn_data.core.hashing import key_hash, key_hash_one
from cytosyn_data.io.tar_read import stream_members
from cytosyn_data.io.tar_write import write_tar_atomic
from cytosyn_data.run.synthetic import make_run
from cytosyn_data.split import assign as split_assign
from cytosyn_data.split import shuffle as split_shuffle
from cytosyn_data.split.assign import assign_splits
from cytosyn_data.split.audit import audit
from cytosyn_data.split.config import SplitConfig
from cytosyn_data.split.stage import run_split


def test_key_hash_matches_its_scalar_definition_and_is_pinned():
    rng = np.random.default_rng(0)
    keys = ["", "a", "é/ü", "TCGA-AB-1234-01Z-00-DX1__x1024_y2048"]
    keys += ["".join(chr(c) for c in rng.integers(32, 1200, rng.integers(0, 70))) for _ in range(300)]
    got = key_hash(keys, "7/val_in")
    assert got.tolist() == [key_hash_one("7/val_in", k) for k in keys]
    assert got.max() < 2**63
    # pinned: the splits of a run must not change with a numpy or polars upgrade
    assert key_hash(["TCGA-AB-1234-01Z-00-DX1__x0_y0"], "0/shuffle").tolist() == [
        key_hash_one("0/shuffle", "TCGA-AB-1234-01Z-00-DX1__x0_y0")] == [6360243092799461537]
    s = pl.Series(keys)
    assert (key_hash(s.slice(7, 50), "x") == key_hash(s, "x")[7:57]).all()


def test_stream_members_reads_ustar_pax_and_gnu_tars(tmp_path):
    members = [(f"k{i}.png", bytes([i % 256]) * (i * 37 % 1500)) for i in range(300)]
    members += [("x" * 150 + ".json", b"{}"), ("\u00e9t\u00e9.png", b"z" * 600)]
    write_tar_atomic(tmp_path / "a.tar", members)
    assert list(stream_members(tmp_path / "a.tar")) == members
    with tarfile.open(tmp_path / "g.tar", "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members[-5:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert list(stream_members(tmp_path / "g.tar")) == members[-5:]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """3,000 tiles on 60 slides in 15 shards; a few val_in candidates nudged onto their neighbours."""
    run = make_run(tmp_path_factory.mktemp("syn") / "run", 3000, tiles_per_slide=50, shard_size=200)
    tiles = pl.read_parquet(run / "tiles.parquet")
    shift = pl.col("key").str.contains("x448_y0$") | pl.col("key").str.contains("x896_y448$")
    tiles = tiles.with_columns(level_x=pl.when(shift).then(pl.col("level_x") - 100).otherwise("level_x"))
    tiles.write_parquet(run / "tiles.parquet")
    return run


CFG = SplitConfig(val_out_fraction=0.2, val_in_fraction=0.2, guidance_tiles=37, seed=3, shard_size=97)


def test_vectorised_assignment_equals_the_direct_path(syn):
    slides, tiles = pl.read_parquet(syn / "slides.parquet"), pl.read_parquet(syn / "tiles.parquet")
    cur = tiles.select("key", keep=pl.col("qc_blur") > 20)
    for cfg in (CFG, SplitConfig(val_in_fraction=0.05, guidance_tiles=500, seed=9, min_blur=100.0)):
        want = split_oracle.assign_splits(slides, tiles, cur, cfg)
        got = assign_splits(slides, tiles, cur, cfg)
        assert got.equals(want)
        a = audit(got, tiles)
        assert a["ok"] and a["guidance"] == want["guidance"].sum() > 0
        assert a["sizes"]["len"].sum() == want.height
    # nudged tiles that fell in val_in were excluded rather than left overlapping
    assert split_oracle.overlapping_pairs(got.filter(pl.col("split") == "val_in").join(tiles.drop("slide_id"), on="key"),
                                          got.filter(pl.col("split") == "train").join(tiles.drop("slide_id"), on="key")) == set()


def _tars(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


@pytest.fixture(scope="module")
def reference(syn, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = SplitConfig(**{**CFG.__dict__, "jpeg_quality": 70})
    splits = split_oracle.assign_splits(pl.read_parquet(syn / "slides.parquet"), pl.read_parquet(syn / "tiles.parquet"),
                                        None, cfg)
    counts = split_oracle.write_split_shards(splits, sorted((syn / "shards").glob("*.tar")), out, cfg)
    return out, counts


@pytest.mark.parametrize("workers,buckets,backend", [(2, "default", []), (1, "few", []), (1, "tiny", []),
                                                     (2, "default", ["--cluster", "local"])])
def test_bucket_shuffle_gives_the_reference_bytes(syn, reference, tmp_path, monkeypatch, workers, buckets, backend):
    layout = split_shuffle.bucket_layout
    if buckets == "few":  # several output shards per bucket
        monkeypatch.setattr(split_shuffle, "MAX_BUCKETS", 3)
    if buckets == "tiny":  # buckets of ~38 tiles: each 97-tile shard spans three or four of them
        monkeypatch.setattr(split_shuffle, "bucket_layout", lambda sizes, size: layout(sizes, size // 5))
    monkeypatch.setattr(split_assign, "CHUNK_TILES", 700)  # the assignment in chunks of whole slides
    if backend:
        pytest.importorskip("distributed")
    args = ["split", "--run", str(syn), "--out", str(tmp_path / "s"), "--val-out-fraction", "0.2",
            "--val-in-fraction", "0.2", "--guidance-tiles", "37", "--seed", "3", "--shard-size", "97",
            "--jpeg-quality", "70", "--workers", str(workers), *backend]
    assert main(args) == 0
    ref, counts = reference
    got = _tars(tmp_path / "s")
    assert got.keys() == _tars(ref).keys() and len(got) > 20
    assert got == _tars(ref)
    assert not (tmp_path / "s" / ".shuffle").exists()
    import json

    assert json.loads((tmp_path / "s" / "counts.json").read_text()) == counts
    cfg = SplitConfig(**{**CFG.__dict__, "jpeg_quality": 70})
    want = split_oracle.assign_splits(pl.read_parquet(syn / "slides.parquet"), pl.read_parquet(syn / "tiles.parquet"),
                                      None, cfg)
    assert pl.read_parquet(tmp_path / "s" / "splits.parquet").sort("key").equals(want)
    assert "verdict: OK" in (tmp_path / "s" / "audit.md").read_text()
    # a re-run after losing shards and with a stale scatter unit left behind rewrites only those, same bytes
    victims = sorted((tmp_path / "s").rglob("*.tar"))[::7]
    for v in victims:
        v.unlink()
    (tmp_path / "s" / ".shuffle" / ".junk.tmp-1").mkdir(parents=True)
    assert main(args) == 0
    assert _tars(tmp_path / "s") == got


def test_missing_member_is_named(syn, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in ("slides.parquet", "tiles.parquet"):
        (run / f).write_bytes((syn / f).read_bytes())
    (run / "shards").mkdir()
    for p in sorted((syn / "shards").glob("*.tar"))[1:]:
        (run / "shards" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(Exception, match=r"tiles of tiles.parquet are not in the tile shards.*TCGA-"):
        run_split(run, tmp_path / "s", CFG)
