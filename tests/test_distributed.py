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

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_train_steps as steps  # noqa: E402


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N ARGS`` (console scripts with --no-python)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
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
    one = steps.run(tmp_path / "one")
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
