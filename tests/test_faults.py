"""Faults and bad input, driven through the command lines in subprocesses: exit code, the one-line
message, and the bytes and keys left on disk (docs/reliability.md lists every case)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import webdataset as wds

from cytosyn_data.run_state import RunLock


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
