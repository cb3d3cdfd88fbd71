"""Images/s of sampling (SDE 250 steps and ODE Heun 50 steps, CFG 2.5 on [0, 0.75]) + VAE decode.

    python benchmarks/sample.py --model tiny --n 8
    python benchmarks/sample.py --model xl --n 64      # on a GPU

A random-init model of the named size stands in for a checkpoint (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from cytosyn_model.generate import Generator
from cytosyn_model.sit import SiT, SiTConfig
from cytosyn_model.latent_norm import LatentNorm
from cytosyn_model.vae import AutoencoderKL, VAEConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "xl"], default="tiny")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sde-steps", type=int, default=250)
    ap.add_argument("--heun-steps", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tiny":
        sit = SiT(SiTConfig(size="tiny", encoder_depth=2, projector_dim=128, cond_dim=64, z_dim=64))
        vae = AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1))
    else:
        sit, vae = SiT(SiTConfig(size="XL")), AutoencoderKL(VAEConfig())
    gen = Generator(sit.eval().to(dev), vae.eval().to(dev), LatentNorm().eval().to(dev), dev)
    cond = torch.randn(args.n, sit.cfg.cond_dim)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: {args.model}; n={args.n}; batch {args.batch}; dtype {dtype}")
    for sampler, steps in (("sde", args.sde_steps), ("heun", args.heun_steps)):
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            gen.generate(cond, args.n, batch_size=args.batch, sampler=sampler, steps=steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"{sampler} {steps} steps, CFG 2.5 on [0, 0.75]: {args.n / dt:.3f} images/s ({dt:.1f} s)")


if __name__ == "__main__":
    main()
