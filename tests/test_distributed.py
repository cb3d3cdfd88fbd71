"""One job over 2 CPU processes (torchrun, gloo) computes what 1 process computes with the global batch.

What users launch is what is tested: ``torchrun --nproc_per_node 2`` of the console scripts
(cytosyn-train, cytosyn-sample, cytosyn-data features) and of tests/dist_train_steps.py, a script
that drives the public Trainer on fixed global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_train_steps as steps  # noqa: E402  (its STEPS; the script itself runs under torchrun)

#: the console scripts of this environment first on PATH, as an activated venv has them
SCRIPTS_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N ARGS`` (console scripts with --no-python)."""
    # CPU processes (gloo) even on a machine with a GPU: ranks of one node cannot share one GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": SCRIPTS_PATH}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _assert_close_state(ours: dict, ref: dict, lr: float) -> None:
    assert set(ours) == set(ref)
    for k, v in ref.items():
        if not v.dtype.is_floating_point:
            assert torch.equal(ours[k], v), k
            continue
        # float32 rounding (sums over 2 x B vs 2B rows) moves weights by ~1e-7; a gradient of half
        # the batch or BN statistics of half the batch move them by several % of lr
        rms = float((ours[k].double() - v.double()).pow(2).mean().sqrt())
        assert rms <= 1e-3 * lr, f"{k}: RMS difference {rms:.3g}"


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    res = torchrun([str(HERE / "dist_train_steps.py"), str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # every rank holds bit-identical weights, BN statistics and EMA, and logged the same values
    assert set(r0["state"]) == set(r1["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["logs"] == r1["logs"]

    (tmp_path / "one").mkdir()
    res = torchrun([str(HERE / "dist_train_steps.py"), str(tmp_path / "one")], nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert one["world"] == 1
    for step, (a, b) in enumerate(zip(r0["logs"], one["logs"])):
        assert set(a) == set(b), step
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k)
    assert "gan_d" not in one["logs"][0] and "gan_d" in one["logs"][1]  # before / after gan_start_step
    _assert_close_state(r0["state"], one["state"], lr=1e-3)
    # BN running statistics: those of the global batch (half a batch would differ by far more)
    for k in ("bn.bn.running_mean", "bn.bn.running_var", "ema_bn.bn.running_mean", "ema_bn.bn.running_var"):
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["state"]["bn.bn.num_batches_tracked"], one["state"]["bn.bn.num_batches_tracked"])

    # a NaN in rank 1's batch stops both ranks, each naming the step, the term and the rank
    for r in (r0, r1):
        assert r["nan_error"].startswith(f"step {steps.STEPS + 1}: loss term 'l1' is nan on rank 1"), r["nan_error"]


# ------------------------------------------------------------------ the command lines, as launched
@pytest.fixture(scope="module")
def tiles(tmp_path_factory, cmu_slide) -> Path:
    """12 CMU-1 tiles in 3 shards of 4."""
    from cytosyn_data.cli import main

    out = tmp_path_factory.mktemp("dist_tiles")
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(out), "--tiles", "12", "--shard-size", "4"]) == 0
    return out / "shards"


def _tiny_config(path: Path, **over) -> Path:
    import yaml

    d = yaml.safe_load((HERE.parent / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())
    d["train"].update({**dict(batch_size=2, max_steps=4, ckpt_every=2, sample_every=4, log_every=1, gan_start_step=2,
                              sample_steps=2), **over})
    path.write_text(yaml.safe_dump(d))
    return path


def _log(run: Path) -> list[dict]:
    import json

    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "data_wait")}
            for line in (run / "log.jsonl").read_text().splitlines()]


def test_cli_training_of_two_processes_resumes_exactly_and_refuses_another_world_size(tmp_path, tiles, capsys):
    from safetensors.torch import load_file

    from cytosyn_model.cli import train_main

    cfg = _tiny_config(tmp_path / "c.yaml")
    train = ["--no-python", "cytosyn-train", "--shards", str(tiles), "--config", str(cfg)]
    full = torchrun(train + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    assert full.stdout.count("cytosyn-train: step 4;") == 1  # one job: rank 0 reports it
    part = torchrun(train + ["--out", str(tmp_path / "part"), "--max-steps", "2"])
    assert part.returncode == 0, part.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["step_0000002"]
    resumed = torchrun(train + ["--out", str(tmp_path / "part")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # each rank's RNG and data stream continue: the resumed run equals the uninterrupted one
    assert [r["step"] for r in _log(tmp_path / "part")] == [1, 2, 3, 4]
    assert _log(tmp_path / "part") == _log(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000004" / "models.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step_0000004" / "models.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rng = torch.load(tmp_path / "full" / "checkpoints" / "step_0000004" / "rng.pt", weights_only=True)
    assert rng["world_size"] == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])

    # a resume by one process is refused, naming both sizes
    capsys.readouterr()
    assert train_main(["--shards", str(tiles), "--config", str(cfg), "--out", str(tmp_path / "full"), "--max-steps", "6"]) == 1
    err = capsys.readouterr().err.strip()
    assert "written by a job of 2 process(es), this job has 1" in err and len(err.splitlines()) == 1


def test_a_killed_rank_ends_the_job_within_seconds_naming_the_rank(tmp_path, tiles):
    import time

    import psutil

    cfg = _tiny_config(tmp_path / "c.yaml", max_steps=500, ckpt_every=500, sample_every=500)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": SCRIPTS_PATH}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           "cytosyn-train", "--shards", str(tiles), "--config", str(cfg), "--out", str(tmp_path / "run")]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[0][-3000:]
    workers = psutil.Process(job.pid).children(recursive=True)
    rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].kill()  # SIGKILL in the middle of training
    t0 = time.monotonic()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "rank      : 1 (local_rank: 1)" in out and "SIGKILL" in out
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_features_of_two_processes_are_byte_identical_to_one(tmp_path, tiles):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiles, one)
    shutil.copytree(tiles, two)
    stale = two / ".tiles-000001.tar.tmp-99999"  # left by a killed writer: its shard's unit clears it
    stale.write_bytes(b"partial")
    cmd = ["--no-python", "cytosyn-data", "features", "--h0-mini-weights", "random:small", "--batch-size", "3"]
    single = torchrun(cmd + ["--shards", str(one)], nproc=1)  # the same launcher and threads as the 2 processes
    assert single.returncode == 0, single.stderr[-3000:]
    res = torchrun(cmd + ["--shards", str(two)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("shard(s) written") == 2  # rank 0: shards 0 and 2, rank 1: shard 1
    shards = sorted(p.name for p in one.glob("*.tar"))
    assert shards == sorted(p.name for p in two.glob("*.tar")) and len(shards) == 3
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
        assert (two / ".features" / f"{name}.json").exists()
    assert not stale.exists() and not list(two.glob(".*.tmp-*"))


def test_curation_over_two_ranks_and_on_dask_equals_one_process(tmp_path, tiles):
    """curate apply launched as 2 torchrun ranks by pipelines/slurm/curate.sbatch (each computes its
    shards' features, a gloo barrier, rank 0 merges and applies) and on a Dask cluster of 2 CPU workers writes the features and
    curation.parquet byte-identical to one process; the per-shard parts are merged, then removed."""
    import shutil

    import numpy as np

    from cytosyn_data.cli import main
    from cytosyn_data.curate import probes
    from cytosyn_data.io.tar_read import stream_members

    def tar_names(shard):
        return [name for name, _ in stream_members(shard)]

    runs = {name: tmp_path / name for name in ("one", "two", "dask")}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 64))  # probes of the random:small backbone's 64-d CLS
    fitted = probes.fit_probes(x, (x[:, 0] > 0).astype(int), [f"s{i % 10}" for i in range(60)])["probes"]
    for run in runs.values():
        shutil.copytree(tiles.parent, run, ignore=shutil.ignore_patterns("report", "curate"))
        (run / "curate").mkdir()
        probes.save_probes(run / "curate" / "probes.npz", fitted)
    cmd = ["curate", "apply", "--backbone-weights", "random:small", "--batch-size", "3", "--threshold", "0.5"]  # the template's
    assert main([*cmd, "--run", str(runs["one"])]) == 0
    res = _sbatch("curate.sbatch", tmp_path, {  # the SLURM template: one node's torchrun agent, 2 ranks
        "SLURM_JOB_ID": str(_free_port() - 20000), "SLURM_NTASKS": "1", "GPUS_PER_NODE": "2", "RUN": str(runs["two"]),
        "WEIGHTS": "random:small", "BATCH_SIZE": "3", "MODE": "apply"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1 of 2: its shards' features are done" in res.stdout and "tiles scored: 12" in res.stdout
    assert main([*cmd, "--run", str(runs["dask"]), "--cluster", "local", "--workers", "2"]) == 0
    for name in ("two", "dask"):
        for f in ("curation.parquet", "curate/features.npy", "curate/features_keys.parquet"):
            assert (runs[name] / f).read_bytes() == (runs["one"] / f).read_bytes(), (name, f)
        assert not (runs[name] / "curate" / "parts").exists()
    assert pl.read_parquet(runs["one"] / "curation.parquet")["key"].to_list() == [  # shard, then member order
        k[: -len(".png")] for shard in sorted(tiles.glob("*.tar")) for k in tar_names(shard) if k.endswith(".png")]


def test_curation_parts_resume_where_a_rank_stopped(tmp_path, tiles):
    """A rank's finished shards are kept (markers) and skipped on a re-run; the merge refuses while a
    shard's part is missing, naming the shard; a changed shard's part is computed again."""
    import os

    from cytosyn_data.core.errors import DataError
    from cytosyn_data.curate import backbone, feature_parts

    spec = backbone.CacheSpec("random:small", batch_size=3, decode_workers=2)
    units, ident = backbone.cache_units(tiles, tmp_path, spec)
    assert feature_parts.compute_parts(units, rank=0, world=2) == {"tiles": 8, "written": 2, "skipped": 0}
    with pytest.raises(DataError, match=f"^{units[1].shard}: its curation features are missing or stale"):
        backbone.merge_cache(units, tmp_path, ident)
    for left in (".npy.tmp-1", ".raw.tmp-1", ".keys.parquet.tmp-1"):  # a killed rank's temporaries
        (tmp_path / "parts" / f".{Path(units[1].shard).name}{left}").write_bytes(b"partial")
    assert feature_parts.compute_parts(units) == {"tiles": 4, "written": 1, "skipped": 2}
    assert not list((tmp_path / "parts").glob(".*tmp*"))
    os.utime(units[2].shard)  # the shard changed: its part is stale
    assert feature_parts.compute_parts(units) == {"tiles": 4, "written": 1, "skipped": 2}
    x = backbone.merge_cache(units, tmp_path, ident)
    assert x.shape == (12, 64) and backbone.cached(tmp_path, ident) is not None and not (tmp_path / "parts").exists()


def test_sampling_over_two_processes_is_byte_identical_to_one(tmp_path, tiles, capsys):
    import yaml

    from cytosyn_model.cli import sample_main
    from cytosyn_model.train import TrainConfig, Trainer

    d = yaml.safe_load((HERE.parent / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())["train"]
    ckpt = Trainer(TrainConfig.from_dict({**d, "out": str(tmp_path / "run")})).save_checkpoint()
    args = ["--checkpoint", str(ckpt), "--ref-shards", str(tiles), "--h0-mini-weights", "random:small", "--mode", "cond",
            "-n", "7", "--steps", "3", "--sampler", "sde", "--format", "shards", "--shard-size", "3", "--batch-size", "2"]
    # the same launcher and threads (torchrun sets OMP_NUM_THREADS=1) with 1 and 2 processes: CPU
    # kernels round differently with other thread counts
    one = torchrun(["--no-python", "cytosyn-sample", *args, "--out", str(tmp_path / "one")], nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    res = torchrun(["--no-python", "cytosyn-sample", *args, "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 tiles written, 0 already there (process 0 of 2)" in res.stdout  # units 0 and 2
    assert "3 tiles written, 0 already there (process 1 of 2)" in res.stdout  # unit 1
    names = ["generated-000000.tar", "generated-000001.tar", "generated-000002.tar", "grid.png"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(names + ["run.json"])

    capsys.readouterr()
    assert sample_main(args + ["--out", str(tmp_path / "two")]) == 0  # a re-run skips the written units
    assert "0 tiles written, 7 already there" in capsys.readouterr().out
    assert sample_main([a if a != "3" else "4" for a in args] + ["--out", str(tmp_path / "two")]) == 1
    assert "settings.steps: 3 -> 4" in capsys.readouterr().err  # other settings are refused, never mixed


def test_evaluation_features_over_two_processes_equal_one(tmp_path, tiles):
    import numpy as np
    import polars as pl
    import yaml

    from cytosyn_data.io.png import decode_png, encode_png
    from cytosyn_data.io.tar_read import iter_tar_members

    gen = tmp_path / "gen"  # 'generated' tiles: mirrored copies of the real ones, named as cytosyn-sample names them
    gen.mkdir()
    for shard in sorted(tiles.glob("*.tar")):
        for name, data in iter_tar_members(shard):
            if name.endswith(".png"):
                img = np.ascontiguousarray(decode_png(data)[:, ::-1])
                (gen / f"gen__{name[:-4]}__s0_0.png").write_bytes(encode_png(img))
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        cfg = tmp_path / f"eval{nproc}.yaml"
        cfg.write_text(yaml.safe_dump({"eval": {
            "out": str(out), "real": {"cmu": str(tiles)}, "generated": {"flip": str(gen)},
            "extractors": {"inception_v3": "random:small"}, "metrics": ["fd", "pr", "cosine"], "pr_k": 2,
            "bootstrap": {"draws": 0}, "batch_size": 5}}))  # 12 images: batches of 5, 5, 2
        threads = ["--decode-workers", "3"] if nproc == 2 else []  # 2 by default on CPU: neither changes a byte
        res = torchrun(["--no-python", "cytosyn-eval", "--config", str(cfg), *threads], nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("cytosyn-eval: ") == 1  # process 0 computes and reports
        outs[nproc] = out
    assert pl.read_parquet(outs[1] / "metrics.parquet").equals(pl.read_parquet(outs[2] / "metrics.parquet"))
    caches = [sorted(p.name for p in (outs[n] / "cache").iterdir()) for n in (1, 2)]
    assert caches[0] == caches[1] and len(caches[0]) == 2
    for set_dir in caches[0]:
        for f in ("features.npy", "keys.parquet", "moments.npz"):
            a, b = (outs[n] / "cache" / set_dir / f for n in (1, 2))
            assert a.read_bytes() == b.read_bytes(), (set_dir, f)
        assert not list((outs[2] / "cache" / set_dir).glob("part-*"))


# ------------------------------------------------------------------ the SLURM templates, run as jobs
_FAKE_SRUN = """#!/bin/bash
# srun for one node: SLURM_NTASKS copies of the command, SLURM_PROCID/SLURM_LOCALID set; fails if any fails
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""


def _free_port() -> int:
    import socket

    for port in range(31000, 39999, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _sbatch(script: str, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``pipelines/slurm/{script}`` as its job would run on one node: srun and scontrol are
    stand-ins (tasks as local processes), everything else (torchrun, the console scripts) is real."""
    bin_dir, venv = tmp_path / "fake-bin", tmp_path / "venv"
    bin_dir.mkdir(exist_ok=True)
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text(_FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv), "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NNODES": "1", "NCCL_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(HERE.parent / "pipelines" / "slurm" / script)], env=full, capture_output=True,
                          text=True, timeout=300, cwd=HERE.parent)


def test_slurm_templates_train_and_sample_as_one_job(tmp_path, tiles):
    cfg = _tiny_config(tmp_path / "c.yaml", max_steps=2)
    job = _sbatch("train.sbatch", tmp_path, {"SLURM_JOB_ID": str(_free_port() - 20000), "SLURM_NTASKS": "1",
                                             "GPUS_PER_NODE": "2", "SHARDS": str(tiles), "CONFIG": str(cfg),
                                             "OUT": str(tmp_path / "train")})
    assert job.returncode == 0, job.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "step_0000002"
    assert torch.load(ckpt / "rng.pt", weights_only=True)["world_size"] == 2  # one job of 2 ranks

    job = _sbatch("sample.sbatch", tmp_path, {"SLURM_NTASKS": "2", "CHECKPOINT": str(ckpt), "REF": str(tiles),
                                              "OUT": str(tmp_path / "gen"), "N": "4", "STEPS": "3", "DEVICE": "cpu",
                                              "SHARD_SIZE": "2", "H0_MINI_WEIGHTS": "random:small"})
    assert job.returncode == 0, job.stderr[-3000:]
    assert "2 tiles written, 0 already there (process 0 of 2)" in job.stdout
    assert "2 tiles written, 0 already there (process 1 of 2)" in job.stdout
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.tar")) == ["generated-000000.tar", "generated-000001.tar"]
