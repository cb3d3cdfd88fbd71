"""cytosyn as a user installs it without the repository: the wheel, in a venv of its own, run from
an empty folder with the shipped configs (``--config tile`` / ``--config tiny``).

The venv gets the wheel's own files; its dependencies (torch, timm...) come from this test
environment's site-packages through a ``.pth`` line (not as a site folder: the repository's
editable install there stays inactive), so no gigabytes are installed twice. The test checks that
every cytosyn module the commands import comes from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources (the build never writes into the repository)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("cytosyn_encoders", "cytosyn_data", "cytosyn_model"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp / "dist")], tmp, dict(os.environ))
    return next((tmp / "dist").glob("cytosyn-*.whl"))


def test_the_wheel_alone_runs_tile_split_features_train_sample_from_an_empty_folder(tmp_path, cmu_slide):
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "empty"
    work.mkdir()
    where = _run([str(py), "-c", "import cytosyn_data, cytosyn_model, cytosyn_encoders as e; "
                  "print(cytosyn_data.__file__, cytosyn_model.__file__, e.__file__)"], work, env).stdout.split()
    assert all(str(site) in w for w in where), where  # the wheel's files, not the repository's
    assert "train:" in _run(["cytosyn-data", "config", "show", "xl"], work, env).stdout
    _run(["cytosyn-data", "tile", "--slides", str(cmu_slide), "--out", "run", "--tiles", "24", "--shard-size", "12",
          "--config", "tile"], work, env)
    _run(["cytosyn-data", "split", "--run", "run", "--val-out-fraction", "0", "--guidance-tiles", "4",
          "--shard-size", "12"], work, env)
    _run(["cytosyn-data", "features", "--shards", "run/splits/train", "--h0-mini-weights", "random:small",
          "--batch-size", "8"], work, env)
    _run(["cytosyn-train", "--shards", "run/splits/train", "--config", "tiny", "--out", "train", "--max-steps", "2"],
         work, env)
    ckpt = next((work / "train" / "checkpoints").glob("step_*"))
    _run(["cytosyn-sample", "--checkpoint", str(ckpt), "--out", "samples", "--mode", "cond", "--ref-shards",
          "run/splits/train", "-n", "2", "--steps", "4", "--sampler", "heun"], work, env)
    assert (work / "samples" / "grid.png").exists()
    assert sorted(p.name for p in work.iterdir()) == ["run", "samples", "train"]  # nothing else written here
