"""Training steps on fixed global batches, run by tests/test_distributed.py as 1 process (batch 2B)
and under torchrun as 2 processes (batch B each, the two halves of the same global batch).

``python dist_train_steps.py OUT [ALL_BATCH]``: builds the Trainer of :func:`config`, runs
:data:`STEPS` steps with the global batches and noise of :func:`global_step_inputs` (rank r takes rows
[r*B, (r+1)*B)), then writes ``OUT/rank{r}.pt``: the logs of each step and every module's state
(weights, latent BatchNorm statistics, EMA). A last step puts a NaN into rank 1's images (when there
are 2 ranks) and records the error every rank raises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cytosyn_model.train import NaNLossError, StepNoise, TrainConfig, Trainer

B = 2  # per rank
STEPS = 3
GAN_START = 1  # step 0 before gan_start_step (factor 0), steps 1 and 2 after it


def config(out: Path, batch: int) -> TrainConfig:
    """A 32-px VAE (f4, 8x8 latents) and a small SiT: every loss term (LPIPS too, random VGG) on CPU.

    ``adam_eps`` 1e-2: AdamW's first steps move each weight by about +-lr whatever the size of its
    gradient when |grad| >> eps, so float32 rounding of a near-zero gradient flips a whole step; with
    eps above most gradient elements a step is proportional to the gradient and two runs that differ
    by rounding stay within rounding of each other."""
    return TrainConfig(
        out=str(out), vae={"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4},
        sit={"size": "tiny", "depth": 2, "hidden": 64, "heads": 4, "input_size": 8, "encoder_depth": 1,
             "projector_dim": 48, "z_dim": 32, "cond_dim": 16, "class_dropout": 0.25},
        batch_size=batch, lr=1e-3, adam_eps=1e-2, ema_decay=0.9, gan_start_step=GAN_START, disc_channels=16,
        lpips_weight=1.0, lpips_vgg_weights="random:seed=3", lpips_lin_weights="random", num_workers=0,
    )


def global_step_inputs(step: int, n: int) -> tuple[dict, StepNoise]:
    """The global batch of ``n`` samples of ``step`` and its per-sample noise (seeded by the step)."""
    g = torch.Generator().manual_seed(1000 + step)
    batch = {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "cls": torch.randn(n, 16, generator=g),
             "tok": torch.randn(n, 16, 32, generator=g)}
    noise = StepNoise(posterior=torch.randn(n, 4, 8, 8, generator=g), t=torch.rand(n, generator=g),
                      path=torch.randn(n, 4, 8, 8, generator=g), drop=torch.rand(n, generator=g) < 0.25)
    return batch, noise


def rows(batch: dict, noise: StepNoise, lo: int, hi: int) -> tuple[dict, StepNoise]:
    return ({k: v[lo:hi] for k, v in batch.items()},
            StepNoise(noise.posterior[lo:hi], noise.t[lo:hi], noise.path[lo:hi], noise.drop[lo:hi]))


def state_of(tr: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, m in tr.modules().items() for k, v in m.state_dict().items()}


def run(out: Path) -> dict:
    from cytosyn_model.distributed import launched_world

    tr = Trainer(config(out, 2 * B // launched_world()))
    world, rank = tr.acc.num_processes, tr.acc.process_index
    logs = []
    for step in range(STEPS):
        batch, noise = global_step_inputs(step, B * 2)
        if world == 2:
            batch, noise = rows(batch, noise, rank * B, (rank + 1) * B)
        logs.append(tr.train_step(batch, noise))
    result = {"world": world, "logs": logs, "state": state_of(tr)}
    batch, noise = global_step_inputs(STEPS, B * 2)
    if world == 2:
        batch, noise = rows(batch, noise, rank * B, (rank + 1) * B)
        if rank == 1:
            batch["image"][0, 1, 2, 3] = float("nan")
    try:
        tr.train_step(batch, noise)
    except NaNLossError as exc:
        result["nan_error"] = str(exc)
    torch.save(result, out / f"rank{rank}.pt")
    return result


if __name__ == "__main__":
    run(Path(sys.argv[1]))
