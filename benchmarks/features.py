"""Images/s of H0-mini feature extraction (CLS + 14x14 tokens) over tile shards.

    python benchmarks/features.py [--shards DIR] [--n 64] [--batch 32]

Uses the full H0-mini architecture with random weights (speed does not depend on the weights).
Compared in the same run with the naive loop: one image at a time, float32.
On a GPU the batched path runs in bf16 (target: >= 3000 images/s on one H100).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from cytosyn_data.features.stage import encode_tiles
from cytosyn_encoders.h0mini import build_h0_mini

ROOT = Path(__file__).resolve().parents[1]


def tiles(shards: Path | None, n: int) -> list[bytes]:
    if shards is not None:
        urls = sorted(str(p) for p in shards.glob("*.tar"))
        out = [s["png"] for s in wds.WebDataset(urls, shardshuffle=False)]
    else:
        from cytosyn_data.io.png import encode_png

        rng = np.random.default_rng(0)
        out = [encode_png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(16)]
    return [out[i % len(out)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path, default=ROOT / "demo_out" / "tiles" / "shards")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    pngs = tiles(args.shards if args.shards.exists() else None, args.n)
    model = build_h0_mini("random").to(dev)  # full-size random H0-mini: speed does not depend on weights
    encode_tiles(model, pngs[: args.batch], dev, args.batch, dtype)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    encode_tiles(model, pngs, dev, args.batch, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    fast = args.n / (time.perf_counter() - t)
    m = min(args.n, 16)
    t = time.perf_counter()
    encode_tiles(model, pngs[:m], dev, 1, torch.float32)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    naive = m / (time.perf_counter() - t)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; H0-mini ViT-B/14 reg4, 224 px; batch {args.batch}, {dtype}")
    print(f"batched: {fast:.1f} images/s (PNG decode + forward + token resize)")
    print(f"naive (batch 1, float32): {naive:.1f} images/s -> {fast / naive:.2f}x")


if __name__ == "__main__":
    main()
