"""Tile work units over processes and Dask: one slide spread over units, lost workers, failures."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile

from conftest import write_pyramid_tiff
from cytosyn_data.cli import main
from cytosyn_data.core.executors import ClusterSpec, slurm_cluster
from cytosyn_data.run.slide_table import build_slide_table
from cytosyn_data.tile.config import TileConfig
from cytosyn_data.tile.stage import run_tile


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.tif"
    write_pyramid_tiff(path, mpp=0.25, size=2048, levels=3)
    return path


def test_one_slide_spread_over_units_and_workers_is_byte_identical(tmp_path, big_slide):
    slides = build_slide_table([big_slide])
    cfg = TileConfig(tiles=None, shard_size=3)
    one = run_tile(slides, tmp_path / "one", cfg, workers=1)
    two = run_tile(slides, tmp_path / "two", cfg, workers=2)
    assert one.n_shards >= 4 and one.n_tiles == two.n_tiles
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    a, b = (pl.read_parquet(tmp_path / d / "tiles.parquet") for d in ("one", "two"))
    assert a.equals(b) and a["shard"].n_unique() == one.n_shards
    assert not list((tmp_path / "two" / "work").rglob("staging*"))  # each PNG written once, into its shard


def _corrupt_level(path: Path, level: int) -> bytes:
    """Zero the compressed bytes of the middle tile of ``level``; returns the original file."""
    original = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        n = len(page.dataoffsets)
        off, cnt = page.dataoffsets[n // 2], page.databytecounts[n // 2]
    data = bytearray(original)
    data[off:off + cnt] = bytes(cnt)
    path.write_bytes(bytes(data))
    return original


def test_a_slide_failing_mid_write_is_cut_out_then_rewritten_when_fixed(tmp_path, cmu_slide):
    bad = tmp_path / "bad.tif"  # 4096 px: the report's 1024-px view comes from level 2, tiles from level 1
    write_pyramid_tiff(bad, mpp=0.25, size=4096, levels=3)
    table = tmp_path / "slides.csv"
    pl.DataFrame({"path": [str(cmu_slide), str(bad)], "slide_id": ["cmu", "bad"]}).write_csv(table)
    args = ["tile", "--slides", str(table), "--out", str(tmp_path / "o"), "--tiles", "all", "--shard-size", "5"]
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    original = _corrupt_level(bad, 1)  # level 1 = 0.5 MPP, the read level; detection reads level 2
    os.utime(bad, ns=(1, 1))
    assert main(args) == 1
    slides = pl.read_parquet(tmp_path / "o" / "slides.parquet").sort("slide_id")
    assert slides["status"].to_list() == ["failed", "ok"]
    assert "extraction failed" in slides["error"][0] and str(bad) in slides["error"][0]
    tiles = pl.read_parquet(tmp_path / "o" / "tiles.parquet")
    clean = pl.read_parquet(tmp_path / "clean" / "tiles.parquet")
    assert set(tiles["slide_id"]) == {"cmu"} and tiles.height == clean.filter(pl.col("slide_id") == "cmu").height
    members = [n for p in (tmp_path / "o" / "shards").glob("*.tar") for n in tifffile_free_names(p)]
    assert len(members) == 2 * tiles.height and not any(n.startswith("bad__") for n in members)
    bad.write_bytes(original)  # fixed in place: a new mtime, detected and written anew
    assert main(args) == 0
    assert shard_bytes(tmp_path / "o") == shard_bytes(tmp_path / "clean")
    assert pl.read_parquet(tmp_path / "o" / "tiles.parquet").equals(clean)


def tifffile_free_names(tar: Path) -> list[str]:
    import tarfile

    with tarfile.open(tar) as t:
        return t.getnames()


def test_dask_cluster_survives_a_killed_worker_with_identical_bytes(tmp_path, cmu_slide, tcga_slide):
    from distributed import Client, LocalCluster

    table = tmp_path / "slides.csv"
    pl.DataFrame({"path": [str(cmu_slide)] * 3 + [str(tcga_slide)], "slide_id": ["a", "b", "c", "TCGA-CR-7395-01A-01-TS1"],
                  "mpp": [None, None, None, 0.25]}, schema={"path": pl.String, "slide_id": pl.String, "mpp": pl.Float64}
                 ).write_csv(table)
    slides = build_slide_table([table])
    cfg = TileConfig(tiles=None, shard_size=4, seed=5)
    ref = run_tile(slides, tmp_path / "ref", cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        victims = sorted(client.run(os.getpid).values())
        result = {}
        run = threading.Thread(target=lambda: result.update(
            res=run_tile(slides, tmp_path / "dask", cfg, cluster=ClusterSpec("scheduler", address=cluster.scheduler_address))))
        run.start()
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "dask" / "shards").glob("*.tar")):
            time.sleep(0.005)
        os.kill(victims[0], signal.SIGKILL)  # mid-run: the nanny restarts it, the scheduler re-runs its task
        run.join(300)
        assert not run.is_alive()
    res = result["res"]
    assert res.ok and res.n_tiles == ref.n_tiles and res.backend.startswith("Dask scheduler tcp://127.0.0.1")
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "ref")
    assert pl.read_parquet(tmp_path / "dask" / "tiles.parquet").equals(pl.read_parquet(tmp_path / "ref" / "tiles.parquet"))
    assert not [p for p in (tmp_path / "dask").rglob(".*tmp-*")]


def test_cli_local_dask_cluster_gives_the_same_bytes(tmp_path, cmu_slide):
    base = ["tile", "--slides", str(cmu_slide), "--tiles", "12", "--shard-size", "5"]
    assert main(base + ["--out", str(tmp_path / "pool")]) == 0
    assert main(base + ["--out", str(tmp_path / "dask"), "--cluster", "local", "--workers", "2"]) == 0
    assert shard_bytes(tmp_path / "pool") == shard_bytes(tmp_path / "dask")
    assert "Dask LocalCluster" in (tmp_path / "dask" / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "10.0.0.1:8786"], "--scheduler: expected an address like tls://HOST:PORT"),
    (["--scheduler", "tcp://127.0.0.1:1", "--cluster", "local"], "give --scheduler (an existing cluster) or --cluster"),
    (["--cluster", "slurm", "--memory", "lots"], "--memory: expected a size like 32GiB, got 'lots'"),
    (["--cluster", "slurm", "--walltime", "4h"], "--walltime: expected HH:MM:SS, got '4h'"),
])
def test_bad_cluster_options_exit_2(tmp_path, cmu_slide, capsys, args, message):
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path)] + args) == 2
    assert message in capsys.readouterr().err


def test_slurm_cluster_job_script(tmp_path):
    spec = ClusterSpec("slurm", jobs=4, cores=16, memory="64GiB", walltime="08:00:00", queue="cpu", account="path",
                       job_extra=("--constraint=avx2",), local_directory=str(tmp_path))
    with slurm_cluster(spec) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p cpu", "#SBATCH -A path", "#SBATCH -n 1", "#SBATCH --cpus-per-task=16",
                 "#SBATCH -t 08:00:00", "#SBATCH --constraint=avx2", "--nworkers 16", "--nthreads 1"):
        assert line in script, (line, script)
    # TLS with this run's temporary credentials, handed to the jobs as files only the user reads
    assert "--protocol tls://" in script and " tls://" in script and "tcp://" not in script
    files = [script.split(f"{opt} ")[1].split()[0] for opt in ("--tls-ca-file", "--tls-cert", "--tls-key")]
    assert all(os.stat(f).st_mode & 0o077 == 0 for f in files if os.path.exists(f))
    assert np.isclose(float(script.split("--memory-limit ")[1].split("GiB")[0]), 4.0)


def test_features_on_a_dask_cluster_equal_the_local_loop(tmp_path, cmu_slide):
    import shutil

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "t"), "--tiles", "12", "--shard-size", "4"]) == 0
    for d in ("a", "b"):
        shutil.copytree(tmp_path / "t" / "shards", tmp_path / d)
    feats = ["--h0-mini-weights", "random:small", "--batch-size", "8"]
    assert main(["features", "--shards", str(tmp_path / "a"), *feats]) == 0
    assert main(["features", "--shards", str(tmp_path / "b"), *feats, "--cluster", "local", "--workers", "2"]) == 0
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.tar")}
    b = {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*.tar")}
    assert a == b and len(a) == 3 and all(b"cls.npy" in v for v in a.values())
    assert sorted(p.name for p in (tmp_path / "b" / ".features").glob("*.json")) == sorted(f"{n}.json" for n in a)


def _unit_pid(x: int) -> tuple[int, int]:
    if x == 13:
        raise ValueError("unit 13 failed")
    time.sleep(0.05)
    return x, os.getpid()


def test_local_pool_runs_units_here_and_in_its_processes_each_once():
    from cytosyn_data.core.executors import LocalPool

    pool = LocalPool(3)
    try:
        got = list(pool.map(_unit_pid, list(range(12)), "units"))
        assert sorted(x for x, _ in got) == list(range(12))
        pids = {pid for _, pid in got}
        assert os.getpid() in pids and len(pids) >= 2  # this process works too, beside the spawned ones
        with pytest.raises(ValueError, match="unit 13 failed"):
            list(pool.map(_unit_pid, list(range(10, 20)), "units"))
    finally:
        pool.close()


def test_a_dask_cluster_started_here_refuses_clients_without_its_credentials(tmp_path):
    """--cluster local (and slurm) run TLS with temporary credentials: the stage's client works, a
    client with none (tcp or tls) or with other credentials is refused."""
    from distributed import Client
    from distributed.security import Security

    from cytosyn_data.core.executors import open_executor

    with open_executor(ClusterSpec("dask-local", workers=1)) as ex:
        addr = ex.client.scheduler.address
        assert addr.startswith("tls://127.0.0.1:") and sorted(ex.map(abs, [-2, -1], "t")) == [1, 2]
        for other in (dict(address=addr.replace("tls://", "tcp://")), dict(address=addr, security=Security.temporary())):
            with pytest.raises((OSError, TimeoutError)):
                Client(timeout=3, **other).close()


def test_a_plain_tcp_scheduler_off_this_machine_needs_insecure(tmp_path, cmu_slide, capsys):
    from cytosyn_data.cli import build_parser, cluster_spec

    base = ["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "o")]
    assert main(base + ["--scheduler", "tcp://10.0.0.5:8786"]) == 2
    assert "a plain tcp:// scheduler is unauthenticated and unencrypted" in capsys.readouterr().err
    spec = cluster_spec(build_parser().parse_args(base + ["--scheduler", "tcp://10.0.0.5:8786", "--insecure"]))
    assert spec.address == "tcp://10.0.0.5:8786" and "warning: --insecure" in capsys.readouterr().err
    assert cluster_spec(build_parser().parse_args(base + ["--scheduler", "tcp://127.0.0.1:8786"])).tls is None
    assert main(base + ["--scheduler", "tls://10.0.0.5:8786", "--tls-ca-file", str(tmp_path / "ca.pem")]) == 2
    assert "--tls-ca-file, --tls-cert and --tls-key go together" in capsys.readouterr().err


def test_a_tls_scheduler_started_by_hand_as_the_allocation_template_does(tmp_path, cmu_slide):
    """pipelines/slurm/tile_dask_allocation.sbatch's commands: `cytosyn-data dask-tls`, a TLS
    `dask scheduler` and `dask worker` with those files, then `tile --scheduler tls://... --tls-*`:
    the shards equal the local pool's."""
    import socket
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    assert main(["dask-tls", str(tmp_path / "tls")]) == 0
    tls = ["--tls-ca-file", str(tmp_path / "tls" / "ca.pem"), "--tls-cert", str(tmp_path / "tls" / "cert.pem"),
           "--tls-key", str(tmp_path / "tls" / "key.pem")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sched = subprocess.Popen([bin_dir / "dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port",
                              str(port), "--no-dashboard", *tls], env=env, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([bin_dir / "dask", "worker", f"tls://127.0.0.1:{port}", "--nworkers", "2",
                               "--nthreads", "1", "--no-dashboard", *tls], env=env, stderr=subprocess.DEVNULL)
    try:
        args = ["tile", "--slides", str(cmu_slide), "--tiles", "12", "--shard-size", "4"]
        assert main(args + ["--out", str(tmp_path / "ref")]) == 0
        assert main(args + ["--out", str(tmp_path / "tls-run"), "--scheduler", f"tls://127.0.0.1:{port}", *tls]) == 0
    finally:
        worker.terminate(), sched.terminate(), worker.wait(30), sched.wait(30)
    assert shard_bytes(tmp_path / "tls-run") == shard_bytes(tmp_path / "ref") and shard_bytes(tmp_path / "ref")
