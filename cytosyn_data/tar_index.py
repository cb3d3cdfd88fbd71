"""Random access to WebDataset tar members without unpacking: (shard, offset, size) per member.

Used for pure re-sharding (splits) and for adding members to shards (features): bytes are
copied, never re-encoded.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import polars as pl

INDEX_SCHEMA = {"key": pl.String, "ext": pl.String, "shard": pl.String, "offset": pl.Int64, "size": pl.Int64}


def split_member(name: str) -> tuple[str, str]:
    """``{key}.{ext}`` -> (key, ext); keys hold no dots (DESIGN.md), extensions may (``cls.npy``)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def index_tar(path: Path) -> pl.DataFrame:
    """One row per regular member of the tar: key, ext, shard (path), data offset, size."""
    rows = {"key": [], "ext": [], "shard": [], "offset": [], "size": []}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member(info.name)
            rows["key"].append(key)
            rows["ext"].append(ext)
            rows["shard"].append(str(path))
            rows["offset"].append(info.offset_data)
            rows["size"].append(info.size)
    return pl.DataFrame(rows, schema=INDEX_SCHEMA)


def index_shards(paths: list[Path]) -> pl.DataFrame:
    """Index of every member of every shard (in shard and member order)."""
    parts = [index_tar(Path(p)) for p in paths]
    return pl.concat(parts) if parts else pl.DataFrame(schema=INDEX_SCHEMA)


class MemberReader:
    """Reads member bytes by (shard, offset, size), keeping a few shard files open."""

    def __init__(self, max_open: int = 64):
        self._files: dict[str, object] = {}
        self.max_open = max_open

    def read(self, shard: str, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.max_open:
                self.close()
            f = self._files[shard] = open(shard, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise IOError(f"{shard}: member at {offset} is truncated")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
