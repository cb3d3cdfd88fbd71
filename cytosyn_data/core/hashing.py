"""A keyed 63-bit hash of many strings at once (numpy over Arrow buffers, no per-row Python).

Per-tile decisions of the split (val_in ranks, guidance order, the global shuffle of the split
shards) hash every tile key: at 40M keys a Python call per key costs minutes, this costs seconds.
The function is defined here, not by a library, so that it never changes with a package version
(polars' ``hash`` may): FNV-1a over the UTF-8 bytes of ``f"{domain}/{key}"``, the length mixed in,
then the splitmix64 finaliser for avalanche, shifted to 63 bits. :func:`key_hash_one` is the
same function for one string in plain Python (the reference the vectorised one is tested against).
:func:`stable_hash`: a blake2b hash of one string (per-slide and per-stratum orders).
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pyarrow as pa

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_M64 = (1 << 64) - 1
#: keys hashed per numpy pass (bounds the temporaries to a few tens of MiB)
CHUNK = 1 << 20


def _splitmix_one(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def key_hash_one(domain: str, key: str) -> int:
    """The hash of one key (pure Python; slow, for tests and single lookups)."""
    h = _FNV_OFFSET
    data = f"{domain}/{key}".encode()
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return _splitmix_one(h ^ len(data)) >> 1


def _prefix_state(domain: str) -> tuple[int, int]:
    """FNV state after ``f"{domain}/"`` and its byte length (shared by every key)."""
    h = _FNV_OFFSET
    data = f"{domain}/".encode()
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h, len(data)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_chunk(arr: pa.Array, state: int, prefix_len: int) -> np.ndarray:
    arr = arr.cast(pa.large_binary())
    if arr.null_count:
        raise ValueError("key_hash: null keys")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), state, dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    top = max(len(data) - 1, 0)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = lengths > j
            byte = data[np.minimum(starts + j, top)].astype(np.uint64)
            h = np.where(live, (h ^ byte) * prime, h)
        h = _splitmix(h ^ (lengths + prefix_len).astype(np.uint64))
    return h >> np.uint64(1)


def key_hash(keys: pl.Series | list[str], domain: str) -> np.ndarray:
    """uint64 hashes (63 bits used) of ``f"{domain}/{key}"`` for every key, in order."""
    s = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
    state, prefix_len = _prefix_state(domain)
    out = np.empty(len(s), dtype=np.uint64)
    for lo in range(0, len(s), CHUNK):
        out[lo : lo + CHUNK] = _hash_chunk(s.slice(lo, CHUNK).to_arrow(), state, prefix_len)
    return out


def stable_hash(text: str) -> int:
    """A 63-bit hash of ``text`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1
