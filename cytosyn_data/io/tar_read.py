"""Reading WebDataset tar shards fast: members streamed in one sequential pass, samples counted
from the headers alone (the split's shuffle, features, curation sheets, training resume).
"""

from __future__ import annotations

import itertools
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

from cytosyn_data.io.remote import filesystem, is_url


def split_member(name: str) -> tuple[str, str]:
    """``{key}.{ext}`` -> (key, ext); keys hold no dots (DESIGN.md), extensions may (``cls.npy``)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


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
    try:
        for name, _, data in _members(Path(path), True, chunk):
            done += 1
            yield name, data
    except _OtherHeader:  # GNU long names and the like: tarfile parses them (the members not yet given)
        yield from itertools.islice(iter_tar_members(path), done, None)


class _OtherHeader(Exception):
    pass


def _members(path: Path, read: bool, chunk: int = 1 << 22):
    """(name, size, data) of the regular members of a tar; ``read=False`` seeks over the data (one
    seek per member, data None). Raises :class:`_OtherHeader` at a header type it does not parse."""
    with open(path, "rb", buffering=chunk) as f:
        pax: dict[str, str] = {}
        while True:
            head = f.read(BLOCK)
            if len(head) < BLOCK or head == bytes(BLOCK):
                return
            kind = head[156:157]
            if kind not in (b"0", b"\0", b"x", b"5"):
                raise _OtherHeader(kind)
            size = int(pax["size"]) if "size" in pax else int(head[124:136].strip(b"\0 ") or b"0", 8)
            data = None
            if read or kind == b"x":
                data = f.read(size)
                if len(data) < size:
                    raise IOError(f"{path}: member truncated")
                f.seek(-size % BLOCK, 1)
            else:
                f.seek(size + (-size % BLOCK), 1)
            if kind == b"x":
                pax = _pax_fields(data)
                continue
            name = pax.get("path") or _ustar_name(head)
            pax = {}
            if kind != b"5":
                yield name, size, data


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
    if is_url(str(path)):
        fs, p = filesystem(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "shard.tar"
            fs.get_file(p, str(local))
            return count_samples(local)
    try:
        names = [name for name, _, _ in _members(Path(path), False)]
    except _OtherHeader:  # GNU long names and the like: let tarfile parse them
        names = [name for name, _ in iter_tar_members(Path(path))]
    n, last = 0, None
    for name in names:
        key = split_member(name)[0]
        n, last = n + (key != last), key
    return n


def iter_tar_members(path: Path) -> Iterable[tuple[str, bytes]]:
    """Yield (name, bytes) of the regular files of a tar, in order."""
    with tarfile.open(path, mode="r") as tar:
        for info in tar:
            if info.isfile():
                yield info.name, tar.extractfile(info).read()
