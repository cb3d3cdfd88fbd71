"""Is the GPU fed? The features stage's input side (shard read, PNG decode on W threads, tar write)
against the model, on real tiles.

On CPU (any machine): a shard of real 224-px H&E tiles (the shared slides, tiled here), the real read,
decode and write of ``cytosyn-data features``' pipeline, and a stand-in model that takes exactly
``--model-rate`` tiles/s (what an H0-mini forward does on one GPU, bf16). Prints, in one run:

- the input side alone (read + decode, no model, nothing written) for W = 1, 2, 4 threads: tiles/s,
  and the ratio against W = 1 (target: >= 1.8x from 1 to 2 on a 2-core machine);
- the whole pipeline with the stand-in model for each W: tiles/s against min(model-only, input side),
  and the fraction of the time the model waited for input.

The training loader (``cytosyn_model.data.make_loader``, what ``cytosyn-train`` reads with): the same
tiles with H0-mini feature members of the real size (CLS [768] and tokens [196, 768], float16), read,
decoded and batched by 0 (this process: the baseline), 1, 2 ... DataLoader workers: images/s, images/s
per worker, and the workers one GPU needs to feed a training step of ``--step-rate`` images/s.

On a GPU (``--gpu``, when one is at hand): the real H0-mini with random weights of its full size
(or ``--h0-mini-weights FILE``), bf16: model-only tiles/s (decoded tiles already on the device), the
pipeline's tiles/s and the model's wait, and the storage write rate of the rewritten shard.

    python benchmarks/gpu_feed.py                          # CPU, stand-in model at 3,000 tiles/s
    python benchmarks/gpu_feed.py --model-rate 6000 --tiles 2048
    python benchmarks/gpu_feed.py --gpu                    # on a GPU machine
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_shard(folder: Path, n_tiles: int, shared: Path) -> Path:
    """A shard of ``n_tiles`` real tiles: the shared slides tiled, their members repeated under new keys."""
    from cytosyn_data.cli import main
    from cytosyn_data.io.tar_read import stream_members
    from cytosyn_data.io.tar_write import write_tar_atomic

    run = folder / "run"
    slides = [str(shared / "wsi" / "cmu-1-small-region.svs")]
    if main(["tile", "--slides", *slides, "--out", str(run), "--tiles", "all", "--shard-size", "1000"]) != 0:
        raise SystemExit("tiling the shared slide failed")
    pngs = [d for p in sorted((run / "shards").glob("*.tar")) for n, d in stream_members(p) if n.endswith(".png")]
    members = [(f"t{i:07d}.png", pngs[i % len(pngs)]) for i in range(n_tiles)]
    shard = folder / "feed-000000.tar"
    write_tar_atomic(shard, members)
    return shard


def input_side(shard: Path, workers: int, batch: int) -> float:
    """tiles/s of read + decode alone (no model, nothing written)."""
    from cytosyn_data.core.pipeline import ordered_map, read_ahead
    from cytosyn_data.features.stage import decode_batch, member_batches

    t, n = time.perf_counter(), 0
    for members, imgs in ordered_map(lambda b: (b, decode_batch(b, str(shard))), read_ahead(member_batches(shard, batch)),
                                     workers):
        n += 0 if imgs is None else len(imgs)
    return n / (time.perf_counter() - t)


def stand_in(rate: float, dim: int = 768):
    """A model of exactly ``rate`` tiles/s: sleeps (releasing the GIL, as a GPU forward does)."""
    cls, tok = np.zeros(dim, np.float16), np.zeros((196, dim), np.float16)

    def encode(imgs: np.ndarray):
        time.sleep(len(imgs) / rate)
        return np.repeat(cls[None], len(imgs), 0), np.repeat(tok[None], len(imgs), 0)
    return encode


def pipeline(shard: Path, encode, workers: int, batch: int, tmp: Path):
    from cytosyn_data.features.stage import rewrite_with_features

    work = tmp / f"w{workers}.tar"
    shutil.copyfile(shard, work)
    t = time.perf_counter()
    stats = rewrite_with_features(work, encode, batch, workers)
    wall = time.perf_counter() - t
    return stats, wall, work.stat().st_size


def loader_rate(shard_dir: Path, workers: int, batch: int, batches: int) -> float:
    """images/s of the training loader with ``workers`` DataLoader workers (0: this process), after
    the workers' first batch (their start-up is not counted)."""
    from cytosyn_model.data import make_loader

    it = iter(make_loader(shard_dir, batch, seed=0, num_workers=workers, shuffle_buffer=256))
    for _ in range(max(workers, 1)):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t)
    del it
    return rate


def training_loader(shard: Path, args, tmp: Path) -> None:
    """The loader's images/s for each worker count, on the shard with feature members of the real size."""
    folder = tmp / "train"
    folder.mkdir()
    work = folder / "train-000000.tar"
    shutil.copyfile(shard, work)
    from cytosyn_data.features.stage import rewrite_with_features

    rewrite_with_features(work, stand_in(1e9), args.batch, 2)  # cls [768] + tok [196, 768] float16 members
    base = None
    for w in args.loader_workers:
        rate = loader_rate(folder, w, args.loader_batch, args.loader_batches)
        base = base or rate
        per = rate / max(w, 1)
        need = -(-args.step_rate // per)
        print(f"training loader, {w} worker(s){' (this process)' if w == 0 else ''}: {rate:,.0f} images/s "
              f"({rate / base:.2f}x 0 workers), {per:,.0f} per worker; a step of {args.step_rate:,.0f} images/s "
              f"per GPU needs >= {need:.0f} worker(s)")


def gpu(shard: Path, args, tmp: Path) -> None:
    import torch

    from cytosyn_data.features.stage import encode_images
    from cytosyn_encoders.h0mini import build_h0_mini

    device = torch.device("cuda")
    model = build_h0_mini(args.h0_mini_weights).to(device).eval()
    encode = lambda imgs: encode_images(model, imgs, device, torch.bfloat16)  # noqa: E731
    imgs = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    encode(imgs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        encode(imgs)
    torch.cuda.synchronize()
    only = 20 * args.batch / (time.perf_counter() - t)
    print(f"GPU {torch.cuda.get_device_name()}: H0-mini model-only {only:,.0f} tiles/s (batch {args.batch}, bf16)")
    for w in args.workers:
        stats, wall, size = pipeline(shard, encode, w, args.batch, tmp)
        print(f"  W={w}: pipeline {stats.tiles / wall:,.0f} tiles/s = {stats.tiles / wall / only:.2f} of model-only; "
              f"model waited {stats.wait_fraction:.0%}; wrote {size / wall / 2**20:,.0f} MiB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model-rate", type=float, default=3000.0, help="stand-in model speed, tiles/s")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--loader-batch", type=int, default=32)
    ap.add_argument("--loader-batches", type=int, default=24)
    ap.add_argument("--step-rate", type=float, default=1000.0,
                    help="images/s one GPU's training step consumes (an assumption to state, not measured here)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--h0-mini-weights", default="random")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard = make_shard(tmp, args.tiles, args.shared)
        size = shard.stat().st_size
        print(f"shard: {args.tiles} real tiles, {size / 2**20:.0f} MiB ({size / args.tiles / 1024:.0f} KiB/tile)")
        base = None
        for w in args.workers:
            rate = input_side(shard, w, args.batch)
            base = base or rate
            print(f"input side (read + decode), W={w}: {rate:,.0f} tiles/s ({rate / base:.2f}x W=1)")
        training_loader(shard, args, tmp)
        if args.gpu:
            return gpu(shard, args, tmp)
        encode = stand_in(args.model_rate)
        for w in args.workers:
            stats, wall, size = pipeline(shard, encode, w, args.batch, tmp)
            ideal = min(args.model_rate, input_side(shard, w, args.batch))
            print(f"pipeline W={w}, stand-in model at {args.model_rate:,.0f} tiles/s: {stats.tiles / wall:,.0f} tiles/s "
                  f"= {stats.tiles / wall / ideal:.2f} of min(model, input side); model waited {stats.wait_fraction:.0%}; "
                  f"wrote {size / wall / 2**20:,.0f} MiB/s")


if __name__ == "__main__":
    sys.exit(main())
