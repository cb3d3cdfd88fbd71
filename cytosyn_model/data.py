"""Streaming training batches from the tile shards (WebDataset).

Shard visits (a seeded choice per process and worker) -> tar samples -> a shuffle buffer per
visit -> decode -> batches; a resumed run seeks to its sample without replaying (VisitStream). Each sample gives an
image uint8 [3, 224, 224] and, when the shards carry them, the H0-mini CLS ``cls.npy`` [768] and tokens
``tok.npy`` [196, 768] as stored (float16): compact for the copy from the loader's workers (0.45 MB per
tile instead of 1.2 MB in float32); :func:`model_images` makes the [-1, 1] floats on the device.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torchvision.io import decode_png

from cytosyn_data.core.errors import DataError
from cytosyn_data.io.atomic import write_json_atomic
from cytosyn_data.io.png import decode_tile, png_header
from cytosyn_data.io.remote import is_url, list_remote, register_with_webdataset, remote_identity
from cytosyn_data.io.tar_read import count_samples


def shard_urls(shards: str | Path | list) -> list[str]:
    """A folder of .tar shards, one .tar, a brace pattern, or a list of them -> sorted paths."""
    if isinstance(shards, (list, tuple)):
        out = []
        for s in shards:
            out.extend(shard_urls(s))
        return out
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
        return list(braceexpand.braceexpand(str(shards)))
    if not p.exists():
        raise FileNotFoundError(f"{p}: shard not found")
    return [str(p)]


def every_shard(urls):
    """A webdataset ``nodesplitter`` that gives every process every shard: reference and evaluation
    sets, which each process of a torchrun job reads whole (webdataset refuses a pipeline without one
    when WORLD_SIZE > 1)."""
    yield from urls


def decode_sample(sample: dict, size: int = 224) -> dict:
    """Raw webdataset sample -> {key, image (uint8 [3, size, size]), cls?, tok? (their stored dtype)}.

    8-bit RGB PNGs take torchvision's fast decoder; grey, palette, 16-bit and RGBA members are
    converted (cytosyn_data.io.png.decode_tile); a missing, corrupt or wrongly sized member stops with
    the shard and key named."""
    where = f"{sample.get('__url__', 'shard')}: {sample['__key__']}"
    data = sample.get("png")
    if data is None:
        raise DataError(f"{where}: no .png member")
    head = png_header(data)
    if head is not None and head[2:] == (8, 2) and head[:2] == (size, size):  # 8-bit RGB
        try:
            img = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as exc:
            raise DataError(f"{where}: corrupt PNG ({' '.join(str(exc).split())[-120:]})") from None
    else:
        img = torch.from_numpy(decode_tile(data, where, size).copy()).permute(2, 0, 1)
    out = {"key": sample["__key__"], "image": img}
    for name in ("cls", "tok"):
        raw = sample.get(f"{name}.npy")
        if raw is not None:
            out[name] = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
    return out


def model_images(images: torch.Tensor, device) -> torch.Tensor:
    """A batch's images as the model takes them: uint8 [B, 3, H, W] (the loader's) -> float32 in [-1, 1]
    on ``device``, the uint8 batch copied there non-blocking (from pinned memory, the copy overlaps);
    float images (already in [-1, 1]) are moved as they are."""
    x = images.to(device, non_blocking=True)
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "image": torch.stack([s["image"] for s in samples])}
    for name in ("cls", "tok"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class VisitStream:
    """An endless stream of samples that can start at any sample without replaying the ones before.

    The stream is a sequence of shard visits: visit j reads shard ``rng.choice(urls)`` (one
    ``random.Random(seed)`` for the whole stream) and yields its samples through a shuffle buffer
    seeded by (seed, j) and emptied at the end of the visit. A visit's samples therefore depend only
    on (seed, j), so skipping ``n`` samples draws the shard of each skipped visit and subtracts its
    sample count (headers only, :func:`cytosyn_data.io.tar_read.count_samples`, memoised), then
    replays at most one shard. The split stage's shards are already a global shuffle; the buffer
    re-orders each visit.
    """

    def __init__(self, urls: list[str], seed: int, skip: int, shuffle_buffer: int, counts: SampleCounts | None = None):
        self.urls, self.seed, self.skip, self.buffer = urls, seed, skip, shuffle_buffer
        self.counts = counts or SampleCounts()

    def __call__(self, src=None):
        rng, skip = random.Random(self.seed), self.skip
        for j in itertools.count():
            url = rng.choice(self.urls)
            if skip:
                n = self.counts(url)
                if skip >= n:
                    skip -= n
                    continue
            self.counts.flush()
            samples = wds.tarfile_to_samples()(iter([{"url": url}]))
            if self.buffer > 1:
                vis = random.Random(f"{self.seed}/{j}")
                samples = wds.filters._shuffle(samples, self.buffer, min(100, self.buffer), vis)
            for s in samples:
                if skip:
                    skip -= 1
                    continue
                yield s


class SampleCounts:
    """Samples per shard (:func:`cytosyn_data.io.tar_read.count_samples`, headers only), memoised in
    this process and, with ``path``, in a JSON file shared by the run's processes and later resumes
    (``{url: [identity, count]}``; identity = size and mtime of a local file, ETag/size of an object).
    A shard whose identity changed is counted again; a lost concurrent update only costs a recount."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.known: dict[str, list] = {}
        self.new = 0
        self._ident: dict[str, str] = {}  # one stat / HEAD per shard and process
        if self.path is not None and self.path.exists():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.known = {}

    @staticmethod
    def identity(url: str) -> str:
        if is_url(url):
            return json.dumps(remote_identity(url), sort_keys=True, default=str)
        st = Path(url).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    def __call__(self, url: str) -> int:
        ident = self._ident.get(url) or self._ident.setdefault(url, self.identity(url))
        hit = self.known.get(url)
        if hit is None or hit[0] != ident:
            self.known[url] = [ident, count_samples(url)]
            self.new += 1
        return int(self.known[url][1])

    def flush(self) -> None:
        """Write the new counts (merged with the file's current content) by temporary name and rename."""
        if self.path is None or not self.new:
            return
        merged = {**(SampleCounts(self.path).known), **self.known}
        write_json_atomic(merged, self.path)
        self.new = 0


def make_loader(
    shards,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    batches_done: int = 0,
    count_cache: str | Path | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Infinite loader of batches for process ``rank``.

    Stream r is seeded by (seed, rank, r); batches come from the W workers in turn, so after
    ``batches_done`` batches stream r has made ceil((batches_done - r) / W) of them, which it
    seeks past on resume (:class:`VisitStream`; worker w reads stream (w + batches_done) mod W):
    a resumed run sees exactly the batches it would have seen, after reading at most one shard.
    ``count_cache``: a JSON file keeping the shards' sample counts between resumes (see
    :class:`SampleCounts`). ``pin_memory``: batches in page-locked memory, so that a CUDA trainer's
    non-blocking copy overlaps its step.
    """
    urls = shard_urls(shards)
    nw = max(num_workers, 1)

    def role() -> int:
        # the DataLoader always starts with worker 0: rotate the streams so that the stream
        # owed the next batch is read by worker 0
        info = torch.utils.data.get_worker_info()
        return ((info.id if info is not None else 0) + batches_done) % nw

    def stream(src=None):
        done = max(0, -(-(batches_done - role()) // nw))
        stream_seed = (seed * 1_000_003 + rank * 1009 + role()) % (2**31)
        yield from VisitStream(urls, stream_seed, done * batch_size, shuffle_buffer, SampleCounts(count_cache))()

    pipeline = wds.DataPipeline(
        stream,
        wds.map(decode_sample),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG (exact resume)
    )
