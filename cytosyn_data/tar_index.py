"""Random access to WebDataset tar members without unpacking: (shard, offset, size) per member.

Used for pure re-sharding (splits) and for adding members to shards (features): bytes are
copied, never re-encoded.
"""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import polars as pl

from .shards import iter_tar_members

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


def _pax_fields(data: bytes) -> dict[str, str]:
    """Records ``"{len} {key}={value}\n"`` of a PAX extended header."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        n = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1 : i + n - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += n
    return out


def stream_members(path: Path, chunk: int = 1 << 22):
    """Yield (name, bytes) of the regular members of a tar in order, reading it once sequentially.

    Parses ustar headers and PAX ``path``/``size`` records directly (about 10x faster than
    ``tarfile`` iteration on shards of small members); other header types go through ``tarfile``.
    """
    done = 0
    with open(path, "rb", buffering=chunk) as f:
        pax: dict[str, str] = {}
        while True:
            head = f.read(BLOCK)
            if len(head) < BLOCK or head == bytes(BLOCK):
                return
            kind = head[156:157]
            if kind not in (b"0", b"\0", b"x", b"5"):
                yield from itertools.islice(iter_tar_members(path), done, None)
                return
            size = int(pax.get("size") or head[124:136].strip(b"\0 ") or b"0", 8 if "size" not in pax else 10)
            data = f.read(size)
            f.seek(-size % BLOCK, 1)
            if len(data) < size:
                raise IOError(f"{path}: member truncated")
            if kind == b"x":
                pax = _pax_fields(data)
                continue
            name = pax.get("path") or _ustar_name(head)
            pax = {}
            if kind != b"5":
                done += 1
                yield name, data


BLOCK = tarfile.BLOCKSIZE


def _ustar_name(head: bytes) -> str:
    name = head[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if head[257:262] == b"ustar":
        prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            return f"{prefix}/{name}"
    return name


def count_samples(path: str | Path) -> int:
    """WebDataset samples (runs of consecutive members sharing a key) in a tar, reading only the
    headers of a local file (one seek per member); URLs are streamed through fsspec."""
    from .remote import filesystem, is_url

    if is_url(str(path)):
        fs, p = filesystem(str(path))
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "shard.tar"
            fs.get_file(p, str(local))
            return count_samples(local)
    try:
        names = [name for name, _ in _walk_headers(Path(path))]
    except _OtherHeader:  # GNU long names and the like: let tarfile parse them
        names = [name for name, _ in iter_tar_members(Path(path))]
    n, last = 0, None
    for name in names:
        key = split_member(name)[0]
        n, last = n + (key != last), key
    return n


class _OtherHeader(Exception):
    pass


def _walk_headers(path: Path):
    """(name, size) of the regular members of a tar, seeking over the data (no member is read)."""
    with open(path, "rb") as f:
        pax: dict[str, str] = {}
        while True:
            head = f.read(BLOCK)
            if len(head) < BLOCK or head == bytes(BLOCK):
                return
            kind = head[156:157]
            size = int(pax["size"]) if "size" in pax else int(head[124:136].strip(b"\0 ") or b"0", 8)
            if kind == b"x":
                pax = _pax_fields(f.read(size))
                f.seek(-size % BLOCK, 1)
                continue
            if kind not in (b"0", b"\0", b"5"):
                raise _OtherHeader(kind)
            name = pax.get("path") or _ustar_name(head)
            pax = {}
            f.seek(size + (-size % BLOCK), 1)
            if kind != b"5":
                yield name, size


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
