"""Faults and bad input, driven through the command lines in subprocesses: exit code, the one-line
message, and the bytes and keys left on disk (docs/reliability.md lists every case)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from conftest import tile_two_slides

from cytosyn_data.run.state import RunLock


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cytosyn_data.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line (the one-line error); there is no traceback without --debug."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def shard_keys(out: Path) -> list[str]:
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] if urls else []


def assert_consistent(out: Path) -> list[str]:
    """Every key of tiles.parquet is in the shards exactly once, and nothing else is."""
    keys = shard_keys(out)
    table = pl.read_parquet(out / "tiles.parquet")["key"].to_list()
    assert len(keys) == len(set(keys)), "a tile is duplicated in the shards"
    assert sorted(keys) == sorted(table), "shards and tiles.parquet disagree"
    return keys


# -------------------------------------------------------------------- tile
def test_failed_slide_fixed_in_place_then_rerun(tmp_path, cmu_slide):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_slide, slides / "a.svs")
    data = Path(cmu_slide).read_bytes()
    (slides / "b.svs").write_bytes(data[: len(data) // 3])  # truncated: fails
    out = tmp_path / "run"
    first = cli("tile", "--slides", slides, "--out", out, "--tiles", "all", "--shard-size", "16")
    assert first.returncode == 1, first.stderr
    assert "FAILED slides (1): b" in first.stdout
    keys = assert_consistent(out)
    assert keys and all(k.startswith("a__") for k in keys)
    shutil.copy(cmu_slide, slides / "b.svs")  # fixed in place
    second = cli("tile", "--slides", slides, "--out", out, "--tiles", "all", "--shard-size", "16")
    assert second.returncode == 0, second.stderr
    keys = assert_consistent(out)
    assert {k.split("__")[0] for k in keys} == {"a", "b"}
    assert len(keys) == 2 * len([k for k in keys if k.startswith("a__")])
    assert pl.read_parquet(out / "slides.parquet")["status"].to_list() == ["ok", "ok"]


def test_rerun_with_other_settings_is_refused_then_overwritten(tmp_path, cmu_slide):
    out = tmp_path / "run"
    assert cli("tile", "--slides", cmu_slide, "--out", out, "--tiles", "10").returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    again = cli("tile", "--slides", cmu_slide, "--out", out, "--tiles", "12")
    assert again.returncode == 1
    assert error_line(again).startswith(
        f"cytosyn-data: error: {out} holds a tile run made with other settings or inputs (settings.config.tiles: 10 -> 12): "
        "pass --overwrite to replace it, or give another --out")
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before  # untouched
    assert cli("tile", "--slides", cmu_slide, "--out", out, "--tiles", "12", "--overwrite").returncode == 0
    assert len(assert_consistent(out)) == 12


def test_second_run_on_a_locked_folder_is_refused(tmp_path, cmu_slide):
    out = tmp_path / "run"
    with RunLock(out):
        proc = cli("tile", "--slides", cmu_slide, "--out", out, "--tiles", "5")
    assert proc.returncode == 1
    assert f"{out} is in use by a running cytosyn stage (pid " in error_line(proc)
    assert not (out / "shards").exists()


def test_two_runs_at_once_never_lose_or_duplicate_a_tile(tmp_path, cmu_slide, tcga_slide):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cmu_slide},\n{tcga_slide},0.25\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cytosyn_data.cli", "tile", "--slides", str(table), "--out", str(out),
           "--tiles", "all", "--shard-size", "8"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 1]), results  # the second waits its turn or is refused
    for rc, err in results:
        if rc == 1:
            assert "is in use by a running cytosyn stage" in err
    assert len(assert_consistent(out)) == pl.read_parquet(out / "tiles.parquet").height > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "argument --workers: must be a finite number > 0, got 0"),
        (["--shard-size", "-3"], "argument --shard-size: must be a finite number > 0, got -3"),
        (["--mpp-override", "nan"], "argument --mpp-override/--mpp: must be a finite number > 0, got nan"),
        (["--mpp-override", "abc"], "argument --mpp-override/--mpp: must be a number, got 'abc'"),
        (["--tiles", "-1"], "argument --tiles: --tiles takes a positive number or 'all'"),
    ],
)
def test_bad_tile_options_exit_2(tmp_path, cmu_slide, args, message):
    proc = cli("tile", "--slides", cmu_slide, "--out", tmp_path / "run", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("tile:\n  shard_size: abc\n", "(section tile): shard_size: must be an integer, got 'abc'"),
        ("tile:\n  target_mpp: -0.5\n", "(section tile): target_mpp: must be a finite number > 0, got -0.5"),
        ("tile:\n  tissue: {close_um: 0}\n", "(section tile): tissue.close_um: must be a finite number > 0, got 0"),
        ("tile:\n  shard_sise: 10\n", "(section tile): unknown key(s) ['shard_sise']"),
        ("tile: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_tile_config_names_the_file_and_key(tmp_path, cmu_slide, yaml_text, message):
    conf = tmp_path / "tile.yaml"
    conf.write_text(yaml_text)
    proc = cli("tile", "--slides", cmu_slide, "--out", tmp_path / "run", "--config", conf)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith(f"cytosyn-data: error: {conf}") and message in line, line


def test_slide_table_with_a_bad_mpp_names_the_table_row_and_value(tmp_path, cmu_slide):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cmu_slide},0.5\n{cmu_slide},half\n")
    proc = cli("tile", "--slides", table, "--out", tmp_path / "run")
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"cytosyn-data: error: {table}, line 3: mpp 'half' is not a number")
    table.write_text(f"path,mpp\n{cmu_slide},-1\n")
    assert f"{table}, line 2: mpp '-1' must be a finite number > 0" in error_line(cli("tile", "--slides", table, "--out", tmp_path / "r2"))


def test_slide_ids_never_leave_the_output_folder(tmp_path, cmu_slide):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,slide_id\n{cmu_slide},../../escape/me now\n")
    out = tmp_path / "deep" / "run"
    assert cli("tile", "--slides", table, "--out", out, "--tiles", "3").returncode == 0
    keys = assert_consistent(out)
    assert keys and all(k.startswith("escape-me-now__") and "/" not in k for k in keys)
    assert not (tmp_path / "escape").exists() and (out / "qc" / "escape-me-now.png").exists()


def test_debug_shows_the_traceback(tmp_path, cmu_slide):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cmu_slide},half\n")
    proc = cli("tile", "--slides", table, "--out", tmp_path / "run", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SlideTableError" in proc.stderr


# ------------------------------------------------------------------- split
@pytest.fixture(scope="module")
def tile_run(tmp_path_factory, cmu_slide, tcga_slide):
    return tile_two_slides(tmp_path_factory.mktemp("faults_tiles"), cmu_slide, tcga_slide, "all", project="A")


def split_keys(folder: Path) -> list[str]:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] if urls else []


def test_split_rerun_with_another_seed_never_mixes_old_and_new(tmp_path, tile_run):
    out = tmp_path / "s"
    common = ("split", "--run", tile_run, "--out", out, "--val-in-fraction", "0.1", "--shard-size", "8")
    assert cli(*common).returncode == 0
    assert cli(*common).returncode == 0  # the same again: nothing to redo
    old = {p: p.read_bytes() for p in out.rglob("*.tar")}
    proc = cli(*common, "--seed", "1")
    assert proc.returncode == 1
    assert "settings.seed: 0 -> 1" in error_line(proc) and "pass --overwrite" in error_line(proc)
    assert {p: p.read_bytes() for p in out.rglob("*.tar")} == old
    assert cli(*common, "--seed", "1", "--overwrite").returncode == 0
    splits = pl.read_parquet(out / "splits.parquet")
    for name in ("train", "val_in", "val_out"):
        want = sorted(splits.filter(pl.col("split") == name)["key"].to_list())
        got = split_keys(out / name)
        assert sorted(got) == want and len(got) == len(set(got)), name


def test_split_with_a_missing_curation_file_refuses(tmp_path, tile_run):
    proc = cli("split", "--run", tile_run, "--out", tmp_path / "s", "--curation", tmp_path / "nope.parquet")
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"cytosyn-data: error: {tmp_path / 'nope.parquet'}: curation file not found")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--val-in-fraction", "1.5"], "argument --val-in-fraction: must be in [0, 1), got 1.5"),
    (["--guidance-tiles", "-2"], "argument --guidance-tiles: must be a finite number >= 0, got -2"),
    (["--shard-size", "0"], "argument --shard-size: must be a finite number > 0, got 0"),
])
def test_bad_split_options_exit_2(tmp_path, tile_run, args, message):
    proc = cli("split", "--run", tile_run, "--out", tmp_path / "s", *args)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(message), proc.stderr


# ---------------------------------------------------------------- features
def test_features_markers_follow_the_shard_content(tmp_path, tile_run):
    from cytosyn_data.io.tar_read import iter_tar_members
    from cytosyn_data.io.tar_write import write_tar_atomic

    d = tmp_path / "shards"
    shutil.copytree(tile_run / "shards", d)
    first = cli("features", "--shards", d, "--h0-mini-weights", "random:small", "--batch-size", "16")
    assert first.returncode == 0 and "0 already done" in first.stdout
    again = cli("features", "--shards", d, "--h0-mini-weights", "random:small", "--batch-size", "16")
    assert f"0 shard(s) written, {len(list(d.glob('*.tar')))} already done" in again.stdout
    # the same shard name with other tiles (e.g. a re-split): its features are computed anew
    victim = sorted(d.glob("*.tar"))[0]
    other = sorted((tile_run / "shards").glob("*.tar"))[-1]
    write_tar_atomic(victim, list(iter_tar_members(other)))
    third = cli("features", "--shards", d, "--h0-mini-weights", "random:small", "--batch-size", "16")
    assert "1 shard(s) written" in third.stdout
    names = [n for n, _ in iter_tar_members(victim)]
    assert sum(n.endswith(".cls.npy") for n in names) == sum(n.endswith(".png") for n in names) > 0


# ------------------------------------------------------------- train, eval
def model_cli(entry: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    code = f"import sys; from cytosyn_model.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _train_config(tmp_path: Path, **over) -> Path:
    import yaml

    root = Path(__file__).resolve().parents[1]
    d = yaml.safe_load((root / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())
    d["train"].update({"max_steps": 2, "ckpt_every": 2, "sample_every": 100, "log_every": 1, "batch_size": 2, **over})
    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_train_resume_with_another_config_lists_the_keys(tmp_path, tile_run):
    out = tmp_path / "t"
    shards = tile_run / "shards"
    assert model_cli("train_main", "--shards", shards, "--config", _train_config(tmp_path), "--out", out).returncode == 0
    changed = _train_config(tmp_path, lr=5e-4, proj_coeff_sit=1.0, max_steps=4)
    proc = model_cli("train_main", "--shards", shards, "--config", changed, "--out", out)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"cytosyn-train: error: {out / 'checkpoints' / 'step_0000002'}: the config differs from the "
                           "checkpoint's (lr: 0.0001 -> 0.0005; proj_coeff_sit: 0.5 -> 1.0); resume with --accept-config-change")
    ok = model_cli("train_main", "--shards", shards, "--config", changed, "--out", out, "--accept-config-change")
    assert ok.returncode == 0 and "step 4" in ok.stdout
    # max_steps alone may change when a run is extended
    longer = _train_config(tmp_path, lr=5e-4, proj_coeff_sit=1.0, max_steps=5)
    assert model_cli("train_main", "--shards", shards, "--config", longer, "--out", out).returncode == 0


@pytest.mark.parametrize("over, message", [
    ({"batch_size": 0}, "(section train): batch_size: must be a finite number > 0, got 0"),
    ({"lr": "fast"}, "(section train): lr: must be a number, got 'fast'"),
    ({"mixed_precision": "fp8"}, "(section train): mixed_precision: unknown value 'fp8'; valid: bf16, fp16, no"),
    ({"sit": {"size": "tiny", "dropout": 0.1}}, "(section train): unknown key(s) ['sit.dropout']"),
])
def test_bad_train_config_names_the_file_and_key(tmp_path, over, message, capsys):
    from cytosyn_model.cli import train_main  # in this process: the config is refused before anything starts

    conf = _train_config(tmp_path, **over)
    assert train_main(["--shards", str(tmp_path), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"cytosyn-train: error: {conf}") and message in line


def test_curate_apply_without_fitted_probes_stops_before_any_feature(tmp_path, capsys):
    from cytosyn_data.cli import main
    from cytosyn_data.io.png import encode_png
    from cytosyn_data.io.tar_write import write_tar_atomic

    write_tar_atomic(tmp_path / "shards" / "tiles-000000.tar", [("k.png", encode_png(np.zeros((224, 224, 3), np.uint8)))])
    assert main(["curate", "apply", "--run", str(tmp_path), "--backbone-weights", "random:small"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"cytosyn-data: error: {tmp_path / 'curate' / 'probes.npz'}: no fitted probes; run "
                           "`cytosyn-data curate fit` on this run first")
    assert not (tmp_path / "curate").exists()  # nothing computed, nothing recorded


def test_eval_unknown_metric_lists_the_valid_ones_and_cache_follows_the_images(tmp_path, tile_run):
    import yaml

    from cytosyn_data.io.png import encode_png

    conf = tmp_path / "eval.yaml"
    conf.write_text(yaml.safe_dump({"eval": {"metrics": ["fd", "fid"], "real": {"r": str(tile_run / "shards")}}}))
    proc = model_cli("eval_main", "--config", conf)
    assert proc.returncode == 2
    assert error_line(proc) == f"cytosyn-eval: error: {conf} (section eval): metrics: unknown value 'fid'; valid: cosine, fd, fd_inf, fld, kid, pr"
    gen = tmp_path / "gen"
    gen.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        (gen / f"g{i}.png").write_bytes(encode_png(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)))
    base = {"out": str(tmp_path / "e"), "real": {"r": str(tile_run / "shards")}, "generated": {"g": {"path": str(gen)}},
            "extractors": {"uni": "random:small"}, "metrics": ["fd"], "bootstrap": {"draws": 2, "n": 8},
            "batch_size": 8}
    conf.write_text(yaml.safe_dump({"eval": base}))
    assert model_cli("eval_main", "--config", conf).returncode == 0
    first = pl.read_parquet(tmp_path / "e" / "metrics.parquet").filter(pl.col("metric") == "fd")["value"][0]
    for i in range(12):  # the generated folder changes: the cached features must not be reused
        (gen / f"g{i}.png").write_bytes(encode_png(np.full((224, 224, 3), 30 + i, np.uint8)))
    assert model_cli("eval_main", "--config", conf).returncode == 0
    second = pl.read_parquet(tmp_path / "e" / "metrics.parquet").filter(pl.col("metric") == "fd")["value"][0]
    assert second != first


# ----------------------------------------------------- readers and members
def test_rgba_slides_are_composited_on_white_in_every_reader(tmp_path):
    import openslide
    import tifffile

    from cytosyn_data.wsi.pixels import composite_on_white
    from cytosyn_data.wsi.slide import open_slide

    rng = np.random.default_rng(0)
    img = np.zeros((1024, 1024, 4), np.uint8)
    for c, (lo, hi) in enumerate(((150, 230), (40, 140), (120, 210))):  # H&E pink
        img[..., c] = rng.integers(lo, hi, (1024, 1024))
    yy, xx = np.mgrid[:1024, :1024]
    img[..., 3] = np.where((xx - 512) ** 2 + (yy - 512) ** 2 < 400**2, 255, 0)
    img[600:700, 600:700, 3] = 128
    res = 1e4 / 0.5
    path = tmp_path / "rgba.tif"
    with tifffile.TiffWriter(path) as t:
        t.write(img, tile=(256, 256), photometric="rgb", extrasamples=["unassalpha"], compression="zlib",
                resolution=(res, res), resolutionunit="CENTIMETER")
    want = composite_on_white(np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 0, (1024, 1024))))
    with open_slide(path) as s:
        assert s.fast_reads
        np.testing.assert_array_equal(s.read_rgb((0, 0), 0, (1024, 1024)), want)
    assert (want[:50, :50] == 255).all()
    out = tmp_path / "run"
    assert cli("tile", "--slides", path, "--out", out, "--tiles", "all").returncode == 0
    from cytosyn_data.io.png import decode_png

    tiles = pl.read_parquet(out / "tiles.parquet")
    assert tiles.height >= 4
    pngs = {s["__key__"]: s["png"] for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)}
    for row in tiles.iter_rows(named=True):
        np.testing.assert_array_equal(decode_png(pngs[row["key"]]), want[row["y"]:row["y"] + 224, row["x"]:row["x"] + 224])


def _member_shard(tmp_path: Path, tile_run: Path, bad: bytes) -> Path:
    """A copy of the first tile shard whose first PNG member is replaced by ``bad``."""
    from cytosyn_data.io.tar_read import iter_tar_members
    from cytosyn_data.io.tar_write import write_tar_atomic

    d = tmp_path / "bad_shards"
    members = list(iter_tar_members(sorted((tile_run / "shards").glob("*.tar"))[0]))
    first = next(i for i, (n, _) in enumerate(members) if n.endswith(".png"))
    members[first] = (members[first][0], bad)
    write_tar_atomic(d / "bad-000000.tar", members)
    return d


def test_grey_16bit_and_rgba_members_are_converted_for_training(tmp_path, tile_run):
    import io

    from PIL import Image

    from cytosyn_data.io.png import decode_png
    from cytosyn_model.data import decode_sample

    rgb = decode_png(next(s["png"] for s in wds.WebDataset(sorted(str(p) for p in (tile_run / "shards").glob("*.tar")), shardshuffle=False)))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    variants = {
        "L": Image.fromarray(grey),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])),
    }
    for mode, im in variants.items():
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out = decode_sample({"__key__": "k", "__url__": "s.tar", "png": buf.getvalue()})["image"]
        expect = rgb if mode == "RGBA" else np.repeat(grey[..., None], 3, 2)
        assert str(out.dtype) == "torch.uint8"  # the model's [-1, 1] floats are made on the device (model_images)
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expect)


@pytest.mark.parametrize("bad, message", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a PNG image"),
    ("small", "tile is 100x100 px, expected 224x224"),
    ("corrupt", "corrupt PNG"),
])
def test_bad_shard_members_stop_training_with_the_shard_and_key(tmp_path, tile_run, bad, message):
    import io

    from PIL import Image

    if bad == "small":
        buf = io.BytesIO()
        Image.new("RGB", (100, 100), "pink").save(buf, format="PNG")
        bad = buf.getvalue()
    elif bad == "corrupt":
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), "pink").save(buf, format="PNG")
        bad = buf.getvalue()[:60]
    shards = _member_shard(tmp_path, tile_run, bad)
    proc = model_cli("train_main", "--shards", shards, "--config", _train_config(tmp_path, shuffle_buffer=1), "--out", tmp_path / "t")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "bad-000000.tar: " in line and message in line, line


def test_features_pipeline_bytes_do_not_depend_on_the_decode_workers(tmp_path, cmu_slide):
    """features: read ahead, decoding on W threads, the model, writing behind - the shard bytes are
    the same for W = 1 and W = 3 (and a batch smaller than the shard's tiles)."""
    import shutil

    from cytosyn_data.cli import main
    from cytosyn_data.core.pipeline import ordered_map, read_ahead

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "t"), "--tiles", "10", "--shard-size", "10"]) == 0
    for d in ("w1", "w3"):
        shutil.copytree(tmp_path / "t" / "shards", tmp_path / d)
    base = ["--h0-mini-weights", "random:small", "--batch-size", "3"]
    assert main(["features", "--shards", str(tmp_path / "w1"), *base, "--decode-workers", "1"]) == 0
    assert main(["features", "--shards", str(tmp_path / "w3"), *base, "--decode-workers", "3"]) == 0
    a = {p.name: p.read_bytes() for p in (tmp_path / "w1").glob("*.tar")}
    assert a and a == {p.name: p.read_bytes() for p in (tmp_path / "w3").glob("*.tar")}
    assert list(ordered_map(lambda x: x * x, read_ahead(range(50), depth=2), workers=4, window=3)) == [x * x for x in range(50)]

    def broken():
        yield 1
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        list(read_ahead(broken()))
