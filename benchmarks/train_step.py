"""Images/s of REPA-E training steps (VAE + SiT + discriminator, all five phases).

    python benchmarks/train_step.py --model tiny             # CPU-sized (the shipped tiny config)
    python benchmarks/train_step.py --model xl --batch 32    # SiT-XL/2 + f8d4 VAE, bf16 on a GPU

Random tensors stand in for the H0-mini features (cls/tok), as the shards would carry them.
The naive baseline of the same run is the same step in float32 without autocast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from cytosyn_model.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def config(model: str, batch: int, precision: str) -> TrainConfig:
    name = "train_tiny.yaml" if model == "tiny" else "train_xl.yaml"
    d = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / name).read_text())["train"]
    d.update(out="/tmp/cytosyn-bench", batch_size=batch, mixed_precision=precision, gan_start_step=0,
             lpips_weight=1.0, lpips_vgg_weights="random", lpips_lin_weights="random")
    return TrainConfig.from_dict(d)


def bench(cfg: TrainConfig, steps: int, warmup: int) -> float:
    tr = Trainer(cfg)
    dim = tr.sit_cfg.cond_dim
    batch = {
        "image": torch.rand(cfg.batch_size, 3, 224, 224) * 2 - 1,
        "cls": torch.randn(cfg.batch_size, dim),
        "tok": torch.randn(cfg.batch_size, 196, tr.sit_cfg.z_dim),
    }
    for _ in range(warmup):
        tr.train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return cfg.batch_size * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "xl"], default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    fast = "bf16" if torch.cuda.is_available() else "no"
    ips = bench(config(args.model, args.batch, fast), args.steps, args.warmup)
    print(f"device: {dev}; model: {args.model}; batch {args.batch}; precision {fast}; LPIPS on (VGG-16), GAN on")
    print(f"train step: {ips:.2f} images/s")
    if fast != "no":
        base = bench(config(args.model, args.batch, "no"), args.steps, args.warmup)
        print(f"float32 baseline: {base:.2f} images/s -> bf16 speed-up {ips / base:.2f}x")


if __name__ == "__main__":
    main()
