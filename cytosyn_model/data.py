"""Streaming training batches from the tile shards (WebDataset).

Resampled shards (shard shuffle, seeded per process and worker) -> tar samples -> sample
shuffle buffer -> optional skip (exact resume) -> decode -> batches. Each sample gives an
image in [-1, 1] [3, 224, 224] and, when the shards carry them, the H0-mini CLS
``cls.npy`` [768] and tokens ``tok.npy`` [196, 768].
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds


def shard_urls(shards: str | Path | list) -> list[str]:
    """A folder of .tar shards, one .tar, a brace pattern, or a list of them -> sorted paths."""
    if isinstance(shards, (list, tuple)):
        out = []
        for s in shards:
            out.extend(shard_urls(s))
        return out
    from cytosyn_data.remote import is_url, list_remote, register_with_webdataset

    if is_url(shards):  # s3://bucket/run/splits/train/ (a prefix) or one .tar URL, read through fsspec
        urls = [str(shards)] if str(shards).endswith(".tar") else list_remote(str(shards), {".tar"})
        if not urls:
            raise FileNotFoundError(f"{shards}: no .tar shards under this URL")
        register_with_webdataset(urls)
        return urls
    p = Path(shards)
    if p.is_dir():
        urls = sorted(str(q) for q in p.rglob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{p}: no .tar shards in this folder")
        return urls
    if "{" in str(shards):
        import braceexpand

        return list(braceexpand.braceexpand(str(shards)))
    if not p.exists():
        raise FileNotFoundError(f"{p}: shard not found")
    return [str(p)]


def decode_sample(sample: dict, size: int = 224) -> dict:
    """Raw webdataset sample -> {key, image (float [-1, 1], [3, size, size]), cls?, tok?}.

    8-bit RGB PNGs take torchvision's fast decoder; grey, palette, 16-bit and RGBA members are
    converted (cytosyn_data.png.decode_tile); a missing, corrupt or wrongly sized member stops with
    the shard and key named."""
    from cytosyn_data.errors import DataError
    from cytosyn_data.png import decode_tile, png_header

    where = f"{sample.get('__url__', 'shard')}: {sample['__key__']}"
    data = sample.get("png")
    if data is None:
        raise DataError(f"{where}: no .png member")
    head = png_header(data)
    if head is not None and head[2:] == (8, 2) and head[:2] == (size, size):  # 8-bit RGB
        from torchvision.io import decode_png

        try:
            img = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as exc:
            raise DataError(f"{where}: corrupt PNG ({' '.join(str(exc).split())[-120:]})") from None
    else:
        img = torch.from_numpy(decode_tile(data, where, size).copy()).permute(2, 0, 1)
    img = img.float() / 127.5 - 1.0
    out = {"key": sample["__key__"], "image": img}
    for name in ("cls", "tok"):
        raw = sample.get(f"{name}.npy")
        if raw is not None:
            out[name] = torch.from_numpy(np.load(io.BytesIO(raw)).astype(np.float32))
    return out


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "image": torch.stack([s["image"] for s in samples])}
    for name in ("cls", "tok"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class _Skip:
    """Drop the first ``n`` samples of the stream (fast-forward on resume, before decoding)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, src):
        for i, s in enumerate(src):
            if i >= self.n:
                yield s


def make_loader(
    shards,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    batches_done: int = 0,
) -> torch.utils.data.DataLoader:
    """Infinite loader of batches for process ``rank``.

    Stream r is seeded by (seed, rank, r); batches come from the W workers in turn, so after
    ``batches_done`` batches stream r has made ceil((batches_done - r) / W) of them, which it
    skips on resume (worker w reads stream (w + batches_done) mod W): a resumed run sees
    exactly the batches it would have seen.
    """
    urls = shard_urls(shards)
    nw = max(num_workers, 1)

    def role() -> int:
        # the DataLoader always starts with worker 0: rotate the streams so that the stream
        # owed the next batch is read by worker 0
        info = torch.utils.data.get_worker_info()
        return ((info.id if info is not None else 0) + batches_done) % nw

    def worker_skip(src):
        done = max(0, -(-(batches_done - role()) // nw))
        yield from _Skip(done * batch_size)(src)

    def stream_seed() -> int:
        return (seed * 1_000_003 + rank * 1009 + role()) % (2**31)

    class _Shards(wds.ResampledShards):
        def __iter__(self):  # seed per (seed, rank, worker), independent of the host
            rng = random.Random(stream_seed())
            while True:
                yield {"url": rng.choice(urls)}

    class _Shuffle:
        def __call__(self, src):
            yield from wds.filters._shuffle(src, shuffle_buffer, min(100, shuffle_buffer), random.Random(stream_seed() + 1))

    pipeline = wds.DataPipeline(
        _Shards(urls),
        wds.tarfile_to_samples(),
        _Shuffle() if shuffle_buffer > 1 else (lambda src: src),
        worker_skip,
        wds.map(decode_sample),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG (exact resume)
    )
