"""curate / split / features on tiles cut by `cytosyn-data tile` and on the shared pen-mark images."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from cytosyn_data.cli import main
from cytosyn_data.io.png import decode_png, encode_png
from cytosyn_data.io.tar_read import iter_tar_members
from cytosyn_data.io.tar_write import write_tar_atomic

SLIDES = [  # (file, slide_id, mpp, project): two slides of one patient, two projects, four TSS
    ("cmu", "TCGA-AA-0001-01Z-00-DX1", None, "TCGA-A"),
    ("cmu", "TCGA-AA-0001-01Z-00-DX2", None, "TCGA-A"),
    ("tcga", "TCGA-AA-0002-01Z-00-DX1", 0.25, "TCGA-A"),
    ("cmu", "TCGA-BB-0003-01Z-00-DX1", None, "TCGA-A"),
    ("tcga", "TCGA-BB-0004-01Z-00-TS1", 0.25, "TCGA-B"),
    ("cmu", "TCGA-CC-0005-01Z-00-DX1", None, "TCGA-B"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cmu_slide, tcga_slide):
    out = tmp_path_factory.mktemp("run")
    paths = {"cmu": cmu_slide, "tcga": tcga_slide}
    rows = [(str(paths[f]), sid, mpp, proj) for f, sid, mpp, proj in SLIDES]
    pl.DataFrame(rows, schema=["path", "slide_id", "mpp", "project"], orient="row").write_csv(out / "t.csv")
    assert main(["tile", "--slides", str(out / "t.csv"), "--out", str(out / "run"), "--tiles", "150", "--shard-size", "25"]) == 0
    return out / "run"


def _split(run, out, *extra):
    return main(["split", "--run", str(run), "--out", str(out), "--val-out-fraction", "0.3", "--val-in-fraction", "0.2",
                 "--guidance-tiles", "12", "--shard-size", "20", *extra])


def shard_keys(folder):
    return sorted(s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False))


def test_split_has_no_patient_slide_or_area_leakage(run, tmp_path):
    assert _split(run, tmp_path / "s", "--jpeg-quality", "70") == 0
    splits = pl.read_parquet(tmp_path / "s" / "splits.parquet")
    tiles = pl.read_parquet(run / "tiles.parquet")
    assert sorted(splits["key"]) == sorted(tiles["key"])
    by = {s: splits.filter(pl.col("split") == s) for s in ("train", "val_in", "val_out")}
    assert not set(by["train"]["patient"]) & set(by["val_out"]["patient"])
    assert not set(by["train"]["slide_id"]) & set(by["val_out"]["slide_id"])
    # both slides of patient TCGA-AA-0001 are on the same side
    assert splits.filter(pl.col("patient") == "TCGA-AA-0001")["split"].is_in(["train", "val_in"]).all() or \
        (splits.filter(pl.col("patient") == "TCGA-AA-0001")["split"] == "val_out").all()
    # one patient held out in each project
    held = splits.filter(pl.col("split") == "val_out")["patient"].unique().to_list()
    assert len(held) == 2
    # val_in comes from training slides and no val_in square overlaps a train square (level-0 pixels)
    assert set(by["val_in"]["slide_id"]) <= set(by["train"]["slide_id"])
    geo = tiles.select("key", "slide_id", "x", "y", "footprint")
    vi = by["val_in"].join(geo, on=["key", "slide_id"])
    tr = by["train"].join(geo, on=["key", "slide_id"])
    for a in vi.iter_rows(named=True):
        same = tr.filter(pl.col("slide_id") == a["slide_id"])
        overlap = (same["x"] < a["x"] + a["footprint"] - 1) & (a["x"] < same["x"] + same["footprint"] - 1) & \
                  (same["y"] < a["y"] + a["footprint"] - 1) & (a["y"] < same["y"] + same["footprint"] - 1)
        assert not overlap.any()
    # guidance is a subset of train, in proportion to the TSS
    g = splits.filter(pl.col("guidance"))
    assert g.height == 12 and (g["split"] == "train").all()
    # shards hold exactly each split's keys, and the JPEG copy holds .jpg members
    for s in ("train", "val_in", "val_out"):
        assert shard_keys(tmp_path / "s" / s) == sorted(by[s]["key"])
    name, data = next(iter_tar_members(sorted((tmp_path / "s" / "train_jpeg70").glob("*.tar"))[0]))
    assert name.endswith(".jpg") and data[:2] == b"\xff\xd8"
    assert "OK, no leakage" in (tmp_path / "s" / "audit.md").read_text()


def test_split_shards_are_byte_reproducible_and_copy_bytes(run, tmp_path):
    _split(run, tmp_path / "a")
    _split(run, tmp_path / "b")
    for folder in ("train", "val_in", "val_out", "guidance"):
        a = sorted((tmp_path / "a" / folder).glob("*.tar"))
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in sorted((tmp_path / "b" / folder).glob("*.tar"))]
    src = {n: b for p in sorted((run / "shards").glob("*.tar")) for n, b in iter_tar_members(p)}
    for p in sorted((tmp_path / "a" / "train").glob("*.tar")):
        for n, b in iter_tar_members(p):
            assert src[n] == b


def test_split_removes_curated_tiles_and_expands_to_256(run, tmp_path):
    tiles = pl.read_parquet(run / "tiles.parquet")
    drop = tiles["key"][:7].to_list()
    cur = pl.DataFrame({"key": tiles["key"], "keep": ~tiles["key"].is_in(drop)})
    cur.write_parquet(tmp_path / "cur.parquet")
    assert _split(run, tmp_path / "s", "--curation", str(tmp_path / "cur.parquet"), "--expand-px", "16") == 0
    splits = pl.read_parquet(tmp_path / "s" / "splits.parquet")
    assert splits.height == tiles.height - 7 and not set(drop) & set(splits["key"])
    members = dict(iter_tar_members(sorted((tmp_path / "s" / "train_expand16").glob("*.tar"))[0]))
    src = {n: b for p in sorted((run / "shards").glob("*.tar")) for n, b in iter_tar_members(p)}
    key = next(n for n in members if n.endswith(".png"))
    big, small = decode_png(members[key]), decode_png(src[key])
    assert big.shape == (256, 256, 3)
    row = tiles.filter(pl.col("key") == key[:-4]).row(0, named=True)
    if row["read_level"] == 0 and row["resample"] == "native":
        assert np.array_equal(big[16:240, 16:240], small)  # the same centre, same pixels


def test_split_expand_and_jpeg_variants_equal_the_reference_path(run, tmp_path):
    """Two workers, expanded tiles re-read from the real slides, JPEG copies: the bucket shuffle's
    bytes equal the direct path of tests/split_oracle.py fed the same expanded PNGs."""
    import split_oracle
    from cytosyn_data.split.config import SplitConfig
    from cytosyn_data.split.expand import expanded_pngs

    assert _split(run, tmp_path / "s", "--expand-px", "16", "--jpeg-quality", "80", "--workers", "2") == 0
    splits = pl.read_parquet(tmp_path / "s" / "splits.parquet")
    slides, tiles = pl.read_parquet(run / "slides.parquet"), pl.read_parquet(run / "tiles.parquet")
    expanded = {}
    for row in slides.filter(pl.col("status") == "ok").to_dicts():
        expanded.update(expanded_pngs(row, tiles.filter(pl.col("slide_id") == row["slide_id"]), 16))
    cfg = SplitConfig(shard_size=20, jpeg_quality=80, expand_px=16)
    counts = split_oracle.write_split_shards(splits, sorted((run / "shards").glob("*.tar")), tmp_path / "ref", cfg, expanded)
    got = {p.relative_to(tmp_path / "s").as_posix(): p.read_bytes() for p in (tmp_path / "s").rglob("*.tar")}
    want = {p.relative_to(tmp_path / "ref").as_posix(): p.read_bytes() for p in (tmp_path / "ref").rglob("*.tar")}
    assert got.keys() == want.keys() and any("_expand16/" in k for k in got) and got == want
    assert json.loads((tmp_path / "s" / "counts.json").read_text()) == counts


def test_features_shapes_dtypes_keys_and_token_resize(run, tmp_path):
    import shutil

    from cytosyn_encoders.h0mini import NUM_PREFIX_TOKENS, build_h0_mini, normalize

    d = tmp_path / "shards"
    shutil.copytree(run / "shards", d)
    before = {p.name: [n for n, _ in iter_tar_members(p)] for p in d.glob("*.tar")}
    assert main(["features", "--shards", str(d), "--h0-mini-weights", "random:small", "--batch-size", "16"]) == 0
    done = {m.name[: -len(".json")]: json.loads(m.read_text()) for m in (d / ".features").glob("*.json")}
    assert set(done) == set(before) and all(v["model"].startswith("h0-mini:") for v in done.values())
    model = build_h0_mini("random:small")
    p = sorted(d.glob("*.tar"))[0]
    members = dict(iter_tar_members(p))
    keys = [n[:-4] for n in before[p.name] if n.endswith(".png")]
    # written batch by batch (25 tiles, batches of 16): each PNG is followed by its two feature members
    want = [m for n in before[p.name] for m in ([n, f"{n[:-4]}.cls.npy", f"{n[:-4]}.tok.npy"] if n.endswith(".png") else [n])]
    assert [n for n, _ in iter_tar_members(p)] == want and len(keys) > 16
    for k in keys:
        cls = np.load(io.BytesIO(members[f"{k}.cls.npy"]))
        tok = np.load(io.BytesIO(members[f"{k}.tok.npy"]))
        assert cls.dtype == np.float16 and cls.shape == (64,) and tok.dtype == np.float16 and tok.shape == (196, 64)
        assert members[f"{k}.png"] == dict(iter_tar_members(run / "shards" / p.name))[f"{k}.png"]
    k = keys[0]
    img = torch.from_numpy(decode_png(members[f"{k}.png"]).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = model.forward_features(normalize(img))
    grid = out[:, NUM_PREFIX_TOKENS:].transpose(1, 2).reshape(1, 64, 16, 16)
    ref = F.interpolate(grid, size=(14, 14), mode="bicubic", antialias=True).reshape(1, 64, 196).transpose(1, 2)
    # equal up to float16 rounding of batched (16) vs single-image matmuls
    tol = dict(rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.load(io.BytesIO(members[f"{k}.tok.npy"])).astype(np.float32), ref[0].numpy(), **tol)
    np.testing.assert_allclose(np.load(io.BytesIO(members[f"{k}.cls.npy"])).astype(np.float32), out[0, 0].numpy(), **tol)
    # a re-run skips finished shards and leaves their bytes alone
    snap = {q.name: q.read_bytes() for q in d.glob("*.tar")}
    assert main(["features", "--shards", str(d), "--h0-mini-weights", "random:small"]) == 0
    assert snap == {q.name: q.read_bytes() for q in d.glob("*.tar")}


PEN = ["tcga-red-pen.png", "tcga-green-pen.png", "wsi-blue-pen.png", "high-nuclei-score-red-pen-level1.png",
       "medium-nuclei-score-green-pen-level1.png", "no-tissue-red-pen.png", "no-tissue-green-pen.png"]
TISSUE = ["tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png", "tcga-lung-rgb.png",
          "low-nuclei-score-level1.png", "medium-nuclei-score-level1.png"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, images_dir):
    """A run folder whose shard holds 224 crops of the shared images; each image is its own 'slide'."""
    out = tmp_path_factory.mktemp("imgrun")
    members, labels = [], []
    for name in PEN + TISSUE:
        img = Image.open(images_dir / name).convert("RGB")
        if min(img.size) < 448:
            img = img.resize((448, 448), Image.Resampling.LANCZOS)
        a = np.asarray(img)
        sid = name[:-4].replace(".", "-")
        for y in (0, a.shape[0] - 224):
            for x in (0, a.shape[1] - 224):
                key = f"{sid}__x{x}_y{y}"
                members += [(f"{key}.png", encode_png(np.ascontiguousarray(a[y:y + 224, x:x + 224])))]
                labels.append((key, "pen" if name in PEN else "usable"))
    write_tar_atomic(out / "shards" / "tiles-000000.tar", members)
    pl.DataFrame(labels, schema=["key", "label"], orient="row").write_csv(out / "labels.csv")
    return out


def test_curation_grouped_five_fold_fit_and_fold_averaged_apply(image_run, capsys):
    from cytosyn_data.curate import backbone, probes

    args = ["--run", str(image_run), "--backbone-weights", "random:small"]
    assert main(["curate", "fit", *args, "--annotations", str(image_run / "labels.csv")]) == 0
    metrics = pl.read_csv(image_run / "curate" / "cv_metrics.csv")
    assert metrics["fold"].to_list() == [0, 1, 2, 3, 4] and metrics["n_test"].sum() == 48
    # folds are grouped by slide (image) and stratified: recompute them and check
    keys, x = backbone.compute_features(image_run / "shards", image_run / "curate", "random:small")
    assert isinstance(x, np.memmap) and x.shape == (len(keys), x.shape[1])
    ann = probes.read_annotations(image_run / "labels.csv")
    pos = {k: i for i, k in enumerate(keys)}
    res = probes.fit_probes(x[[pos[k] for k in ann["key"]]], ann["is_artifact"].to_numpy(), probes.slide_of(ann["key"]))
    folds = pl.DataFrame({"slide": probes.slide_of(ann["key"]), "fold": res["fold_of"], "art": ann["is_artifact"]})
    assert (folds.group_by("slide").agg(pl.col("fold").n_unique())["fold"] == 1).all()
    assert (folds.group_by("fold").agg(pl.col("art").any())["art"]).all()
    assert main(["curate", "apply", *args, "--threshold", "0.5"]) == 0
    cur = pl.read_parquet(image_run / "curation.parquet")
    assert cur.height == 48 and {f"p_fold{i}" for i in range(5)} <= set(cur.columns)
    folds_mean = cur.select([f"p_fold{i}" for i in range(5)]).to_numpy().mean(axis=1)
    np.testing.assert_allclose(cur["artifact_prob"].to_numpy(), folds_mean)
    assert (cur["keep"] == (cur["artifact_prob"] < 0.5)).all()
    assert (image_run / "curate" / "top_artifacts.png").exists()
    assert "removed" in (image_run / "curate" / "report.md").read_text()


def test_probes_are_saved_without_pickle_and_reload(tmp_path):
    from cytosyn_data.curate import probes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] > 0).astype(int)
    groups = [f"s{i % 10}" for i in range(60)]
    res = probes.fit_probes(x, y, groups)
    probes.save_probes(tmp_path / "p.npz", res["probes"])
    p1 = probes.probe_probabilities(x, res["probes"])
    p2 = probes.probe_probabilities(x, probes.load_probes(tmp_path / "p.npz"))
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(probes.probe_probabilities(x, res["probes"], chunk=7), p1)  # row chunks: same numbers
    keys = pl.Series("key", [f"k{i:03d}" for i in range(60)])
    pl.DataFrame({"key": keys}).write_parquet(tmp_path / "keys.parquet")
    assert probes.apply_probes_to_file(tmp_path / "keys.parquet", x, res["probes"], 0.5, tmp_path / "cur.parquet", chunk=16) == 60
    assert pl.read_parquet(tmp_path / "cur.parquet").equals(probes.apply_probes(keys, x, res["probes"], 0.5))
    # the feature file is written batch by batch and read back memory-mapped
    from cytosyn_data.io.feature_file import FeatureFileWriter

    with FeatureFileWriter(tmp_path / "f.npy") as fw:
        for lo in range(0, 60, 16):
            fw.append(x[lo:lo + 16])
    back = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert back.dtype == np.float32 and np.array_equal(back, x.astype(np.float32))
    from cytosyn_data.io.feature_file import read_rows

    assert np.array_equal(read_rows(back, 7, 19), back[7:19]) and np.array_equal(read_rows(back[5:], 0, 4), back[5:9])
    assert list(tmp_path.glob("*.raw")) == [] and list(tmp_path.glob(".*tmp*")) == []
    assert np.mean([m["auc"] for m in res["metrics"]]) > 0.9


def test_curation_features_pipeline_equals_the_direct_path_for_any_decode_workers(image_run, tmp_path):
    """curate's features: read ahead, decoded on W threads, the backbone, written behind - the same
    bytes for W = 1 and 3, and the same rows as the direct path (decode a batch, then the backbone)."""
    from cytosyn_data.curate import backbone
    from cytosyn_data.io.png import decode_png
    from cytosyn_data.io.tar_read import stream_members

    a = backbone.feature_cache(image_run / "shards", tmp_path / "w1", "random:small", batch_size=5, decode_workers=1)
    b = backbone.feature_cache(image_run / "shards", tmp_path / "w3", "random:small", batch_size=5, decode_workers=3)
    assert (tmp_path / "w1" / "features.npy").read_bytes() == (tmp_path / "w3" / "features.npy").read_bytes()
    pngs = [d for n, d in stream_members(image_run / "shards" / "tiles-000000.tar") if n.endswith(".png")]
    model = backbone.build_backbone("random:small")
    want = np.concatenate([backbone.image_features(model, np.stack([decode_png(p) for p in pngs[i:i + 5]]))
                           for i in range(0, len(pngs), 5)])
    assert a.shape == b.shape == want.shape and np.array_equal(np.asarray(a), want)
