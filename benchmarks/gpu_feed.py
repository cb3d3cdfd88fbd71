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

On a GPU (``--gpu``, when one is at hand): the real stages, bf16, with random weights of the full
networks (or ``--h0-mini-weights FILE`` / ``--ibot-weights FILE``), each W against baselines measured
in the same run: the storage write rate (a plain fsynced write), H0-mini's model-only tiles/s (decoded
tiles in memory, copies included), then the ``features`` rewrite's tiles/s as a fraction of
min(model-only, storage write), the model's wait, the write rate and the GPU's utilisation; then
iBOT's model-only tiles/s and curation's part (``compute_part``) as a fraction of it. ``--real cpu``
runs the same code on the CPU (with ``random:small`` weights: a check that the path works).

    python benchmarks/gpu_feed.py                          # CPU, stand-in model at 3,000 tiles/s
    python benchmarks/gpu_feed.py --model-rate 6000 --tiles 2048
    python benchmarks/gpu_feed.py --gpu                    # on a GPU machine
    python benchmarks/gpu_feed.py --real cpu --h0-mini-weights random:small --ibot-weights random:small --tiles 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
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


def storage_write_rate(folder: Path, nbytes: int) -> float:
    """bytes/s of a plain sequential write of ``nbytes`` into ``folder``, fsynced: the storage's own rate
    (the baseline of a stage whose output is its write)."""
    block = os.urandom(1 << 22)
    path = folder / "write-probe.bin"
    blocks = max(1, nbytes // len(block))
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(blocks):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rate = blocks * len(block) / (time.perf_counter() - t)
    path.unlink()
    return rate


class GpuUse:
    """The GPU's mean utilisation while a stage runs (``torch.cuda.utilization``, sampled every 50 ms
    on a thread); None where it cannot be read (no NVML, or not CUDA)."""

    def __init__(self, device: str):
        import torch

        self.samples: list[int] = []
        self.ok = device.startswith("cuda")
        if self.ok:
            try:
                torch.cuda.utilization(torch.device(device))
            except Exception:  # noqa: BLE001 - no pynvml: the figure is left out, not faked
                self.ok = False
        self.device, self._stop = device, threading.Event()

    def __enter__(self):
        import torch

        def sample():
            while not self._stop.wait(0.05):
                self.samples.append(torch.cuda.utilization(torch.device(self.device)))
        self._t = threading.Thread(target=sample, daemon=True) if self.ok else None
        if self._t:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t:
            self._t.join()

    def text(self) -> str:
        return f"GPU busy {np.mean(self.samples):.0f}%" if self.samples else "GPU utilisation not readable"


def timed(fn, reps: int, device: str) -> float:
    """Seconds per call of ``fn`` after one warm-up call, synchronised on CUDA."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def real_models(shard: Path, args, tmp: Path) -> None:
    """The real stages on ``args.real``: H0-mini features (shard rewritten with CLS and tokens) and
    curation's iBOT features (a part), each against model-only and storage-write baselines."""
    import torch

    from cytosyn_data.curate.feature_parts import PartUnit, build_backbone, compute_part, image_features
    from cytosyn_data.features.stage import encode_images
    from cytosyn_encoders.h0mini import build_h0_mini

    device = args.real
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    imgs = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    h0 = build_h0_mini(args.h0_mini_weights).to(device).eval()
    h0_only = args.batch / timed(lambda: encode_images(h0, imgs, torch.device(device), dtype), 10, device)
    probe = tmp / "rewritten"
    probe.mkdir()
    write = storage_write_rate(probe, max(shard.stat().st_size * 3, 1 << 26))
    print(f"{name}: storage write {write / 2**20:,.0f} MiB/s (fsynced, {probe})")
    print(f"H0-mini ({args.h0_mini_weights}, {dtype}): model-only {h0_only:,.0f} tiles/s (batch {args.batch}, copies included)")
    for w in args.workers:
        with GpuUse(device) as use:
            stats, wall, size = pipeline(shard, lambda x: encode_images(h0, x, torch.device(device), dtype), w,
                                         args.batch, tmp)
        bound = min(h0_only, write / (size / stats.tiles))
        print(f"  features W={w}: {stats.tiles / wall:,.0f} tiles/s = {stats.tiles / wall / bound:.2f} of min(model-only, "
              f"storage write {write / (size / stats.tiles):,.0f} tiles/s); model waited {stats.wait_fraction:.0%}; "
              f"wrote {size / wall / 2**20:,.0f} MiB/s; {use.text()}")
    h0 = None  # its GPU memory freed before iBOT
    ibot = build_backbone(args.ibot_weights).to(device)
    ibot_only = args.batch / timed(lambda: image_features(ibot, imgs, False, device), 10, device)
    print(f"iBOT ViT-S/16 ({args.ibot_weights}): model-only {ibot_only:,.0f} tiles/s")
    for w in args.workers:
        parts = tmp / f"parts-{w}"
        unit = PartUnit(str(shard), str(parts), args.ibot_weights, False, "bench", args.batch, device, w)
        parts.mkdir()
        with GpuUse(device) as use:
            t = time.perf_counter()
            n = compute_part(unit)["tiles"]
            wall = time.perf_counter() - t
        print(f"  curation W={w}: {n / wall:,.0f} tiles/s = {n / wall / ibot_only:.2f} of model-only; {use.text()}")


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
    ap.add_argument("--gpu", action="store_const", const="cuda", dest="real",
                    help="the real H0-mini and iBOT stages on the GPU (same as --real cuda)")
    ap.add_argument("--real", metavar="DEVICE", help="the real model stages on DEVICE (cpu: a check of the code path)")
    ap.add_argument("--h0-mini-weights", default="random", help="'random' (full size), random:small, or a file")
    ap.add_argument("--ibot-weights", default="random", help="'random' (full size), random:small, or a file")
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
        if args.real:
            return real_models(shard, args, tmp)
        encode = stand_in(args.model_rate)
        for w in args.workers:
            stats, wall, size = pipeline(shard, encode, w, args.batch, tmp)
            ideal = min(args.model_rate, input_side(shard, w, args.batch))
            print(f"pipeline W={w}, stand-in model at {args.model_rate:,.0f} tiles/s: {stats.tiles / wall:,.0f} tiles/s "
                  f"= {stats.tiles / wall / ideal:.2f} of min(model, input side); model waited {stats.wait_fraction:.0%}; "
                  f"wrote {size / wall / 2**20:,.0f} MiB/s")


if __name__ == "__main__":
    sys.exit(main())
