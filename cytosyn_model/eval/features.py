"""Features of one image set per extractor: images read from shards or folders (encoded bytes,
decoded only by the process that extracts them), preprocessing (JPEG, crop), the cache under
``out/cache/{set}-{extractor}-{weights}-{preprocessing}-{files}/`` (features.npy float32 written batch
by batch and read memory-mapped, keys.parquet, moments.npz accumulated in float64), extraction split
over the processes of a job and joined in batch order, and seeded subsamples."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.pipeline import Writer, ordered_map, read_ahead
from cytosyn_data.io.feature_file import FeatureFileWriter, read_rows, take_rows
from cytosyn_data.io.png import to_rgb8
from cytosyn_data.io.remote import is_url
from cytosyn_data.run.state import file_identity, files_digest
from cytosyn_model.data import every_shard, shard_urls

from ..distributed import barrier
from .extractors import center_crop, jpeg_roundtrip
from .metrics import RunningMoments


def preprocessor(name: str):
    """``jpeg70`` -> JPEG round trip at quality 70; ``centercrop224`` -> central crop; ``png`` -> none."""
    m = re.fullmatch(r"jpeg(\d+)", name)
    if m:
        return jpeg_roundtrip(int(m.group(1)))
    m = re.fullmatch(r"centercrop(\d+)", name)
    if m:
        return center_crop(int(m.group(1)))
    if name == "png":
        return lambda img: img
    raise ValueError(f"unknown preprocessing {name!r} (jpegQ, centercropN, png)")


def _decode(data: bytes, where: str, to_rgb8) -> np.ndarray:

    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb8(img)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for damaged files
        raise DataError(f"{where}: corrupt image ({type(exc).__name__}: {exc})") from None


def iter_encoded(source: str | Path, limit: int | None = None):
    """(key, encoded bytes, where) of the images of a folder of shards (.png or .jpg members) or of
    PNG/JPEG files, in order, at most ``limit``; nothing is decoded."""
    if is_url(source):
        tars, src = shard_urls(str(source)), None
    else:
        src = Path(source)
        tars = sorted(src.glob("*.tar")) if src.is_dir() else ([src] if src.suffix == ".tar" else [])
    if tars:

        items = ((s["__key__"], s.get("png") or s.get("jpg"), f"{s['__url__']}: {s['__key__']}")
                 for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False, nodesplitter=every_shard))
        items = (it for it in items if it[1] is not None)
    elif src.is_dir():
        files = sorted(q for q in src.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg") and q.stem != "grid")
        items = ((p.stem, p.read_bytes(), str(p)) for p in files)
    else:
        raise FileNotFoundError(f"{src}: no shards or images here")
    yield from itertools.islice(items, limit or None)


def iter_images(source: str | Path, limit: int | None = None):
    """(key, uint8 [H, W, 3]) of :func:`iter_encoded`'s images; grey, 16-bit and RGBA images are
    converted, a corrupt one stops with the file (and key) named."""
    for key, data, where in iter_encoded(source, limit):
        yield key, _decode(data, where, to_rgb8)


def set_identity(source, limit: int | None) -> str:
    """12 hex of a hash of the set's files (name, size, mtime) and the image cap: a changed set
    (other files, rewritten shards, another ``max_images``) gets a new feature cache."""
    if is_url(source):  # the shards' URLs with their size and ETag

        h = hashlib.sha256(f"limit={limit}".encode())
        for u in shard_urls(str(source)):
            h.update(f"\n{u}\t{file_identity(u)}".encode())
        return h.hexdigest()[:12]
    src = Path(source)
    if not src.exists():
        raise DataError(f"{src}: no shards or images here (path not found)")
    files = sorted(src.glob("*.tar")) if src.is_dir() else [src]
    if src.is_dir() and not files:
        files = sorted(q for q in src.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg") and q.stem != "grid")
    return files_digest(files, f"limit={limit}")


def set_features(extractor, name: str, source, preprocess: list[str], cache: Path, batch_size: int, device,
                 weights: str | None, limit: int | None = None, rank: int = 0, world: int = 1,
                 decode_workers: int = 2) -> tuple[list[str], np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Features [N, D] float32 of one set (cached; returned memory-mapped), its keys, and its float64
    (mean, cov). Every process of a job calls it: process r extracts batches b % world == r into
    ``part-{r}``, then process 0 joins the parts in batch order (the bytes of one process's cache,
    whatever ``world``) and accumulates the moments while doing so. ``decode_workers``: threads decoding
    and preprocessing images beside the extractor (the bytes do not depend on it)."""
    spec = extractor.spec
    tag = f"{name}-{spec.name}-{spec.identity(weights)}-{'+'.join(preprocess) or 'png'}-{set_identity(source, limit)}"
    folder = cache / tag
    if not (folder / "done.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if not _extract_part(extractor, f"{name}/{spec.name}", source, preprocess, folder, batch_size, device, limit,
                             rank, world, decode_workers):  # every process counts the images: all stop together
            raise ValueError(f"set {name}: no images in {source}")
        barrier()
        if rank == 0:
            n = _join_parts(folder, batch_size, world)
            (folder / "done.json").write_text(json.dumps({"set": name, "source": str(source), "extractor": spec.name,
                                                          "preprocess": preprocess, "n": n}))
        barrier()
    keys = pl.read_parquet(folder / "keys.parquet")["key"]
    m = np.load(folder / "moments.npz")
    return keys, np.load(folder / "features.npy", mmap_mode="r"), (m["mean"], m["cov"])


def _extract_part(extractor, what: str, source, preprocess: list[str], folder: Path, batch_size: int, device,
                  limit: int | None, rank: int, world: int, decode_workers: int = 2) -> int:
    """``part-{rank}.npy`` and ``part-{rank}.keys.parquet``: the features of batches b % world == rank
    (images of the other batches are read, not decoded); returns the set's image count. A pipeline:
    images read ahead, decoded and preprocessed on ``decode_workers`` threads (in order), the
    extractor on the device (pinned, non-blocking copies), rows written behind."""
    fns = [preprocessor(p) for p in preprocess]
    seen = [0]

    def mine():  # this process's batches; every batch is counted, so all processes agree on the total
        items = iter_encoded(source, limit)
        for b in itertools.count():
            batch = list(itertools.islice(items, batch_size))
            seen[0] += len(batch)
            if not batch:
                return
            if b % world == rank:
                yield batch

    def decode(batch):
        images = []
        for key, data, where in batch:
            img = _decode(data, where, to_rgb8)
            for fn in fns:
                img = fn(img)
            images.append(np.ascontiguousarray(img))
        return [k for k, _, _ in batch], np.stack(images)

    keys = []
    with FeatureFileWriter(folder / f"part-{rank}.npy") as fw:
        writer = Writer(fw.append)
        try:
            for batch_keys, imgs in tqdm(ordered_map(decode, read_ahead(mine()), decode_workers), desc=what,
                                         unit="batch", leave=False, disable=rank != 0):
                x = torch.from_numpy(imgs)
                x = x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)
                writer.submit(extractor(x.permute(0, 3, 1, 2).float().div(255)).cpu().numpy())
                keys.extend(batch_keys)
        finally:
            writer.close()
    pl.DataFrame({"key": keys}, schema={"key": pl.String}).write_parquet(folder / f"part-{rank}.keys.parquet")
    return seen[0]


def _join_parts(folder: Path, batch_size: int, world: int) -> int:
    """features.npy, keys.parquet and moments.npz from the parts, batch b from part b % world, the
    moments added batch by batch as one process adds them; the parts are removed. One process's
    part is the feature file already: it is renamed, not copied. Returns N."""
    parts = [np.load(folder / f"part-{r}.npy", mmap_mode="r") for r in range(world)]
    part_keys = [pl.read_parquet(folder / f"part-{r}.keys.parquet")["key"] for r in range(world)]
    n = sum(len(k) for k in part_keys)
    offsets, keys, moments = [0] * world, [], None
    with contextlib.ExitStack() as stack:
        fw = stack.enter_context(FeatureFileWriter(folder / "features.npy")) if world > 1 else None
        for b in range(-(-n // batch_size)):
            r = b % world
            lo = offsets[r]
            offsets[r] = hi = min(lo + batch_size, len(part_keys[r]))
            f = read_rows(parts[r], lo, hi)
            moments = moments or RunningMoments(f.shape[1])
            moments.add(f)
            if fw is not None:
                fw.append(f)
            keys.append(part_keys[r][lo:hi])
    if world == 1:
        os.replace(folder / "part-0.npy", folder / "features.npy")
    if n:
        mu, cov = moments.mean_cov()
        np.savez(folder / "moments.npz", mean=mu, cov=cov)
        pl.concat(keys).to_frame("key").write_parquet(folder / "keys.parquet")
    del parts
    for r in range(world):
        (folder / f"part-{r}.npy").unlink(missing_ok=True)
        (folder / f"part-{r}.keys.parquet").unlink()
    return n


def subsample(x: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """At most ``n`` rows of ``x`` (a seeded choice kept in row order), read from its memory map."""
    if n is None or len(x) <= n:
        return read_rows(x, 0, len(x))
    return take_rows(x, np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False)))
