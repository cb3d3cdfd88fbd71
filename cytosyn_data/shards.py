"""Deterministic, atomic WebDataset tar shards.

Members carry fixed metadata (mtime, uid, gid, mode, empty owner names) so that the
same members in the same order give byte-identical tars. A shard is written to a
temporary name in the same folder and renamed into place when complete.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterable

#: mtime of every member (2000-01-01T00:00:00Z); shard bytes never depend on the clock.
FIXED_MTIME = 946684800


def tmp_path(path: Path) -> Path:
    """Temporary sibling name used while ``path`` is being written."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (fsync first when ``durable``).

    The rename alone makes the write atomic for a killed process; ``durable`` also
    survives a power loss and is used for outputs, not for caches that can be rebuilt.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar_atomic(path: Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write (name, bytes) members in order to the tar ``path`` atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    n = 0
    written = 0
    with open(tmp, "wb", buffering=1 << 22) as raw:
        # the same bytes as tarfile.addfile, one write per member instead of 16 KiB chunks
        for name, data in members:
            header = _tarinfo(name, len(data)).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            pad = -len(data) % tarfile.BLOCKSIZE
            raw.write(b"".join((header, data, b"\0" * pad)))
            written += len(header) + len(data) + pad
            n += 1
        end = 2 * tarfile.BLOCKSIZE
        end += -(written + end) % tarfile.RECORDSIZE
        raw.write(b"\0" * end)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return n


def iter_tar_members(path: Path) -> Iterable[tuple[str, bytes]]:
    """Yield (name, bytes) of the regular files of a tar, in order."""
    with tarfile.open(path, mode="r") as tar:
        for info in tar:
            if info.isfile():
                yield info.name, tar.extractfile(info).read()


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files left by a killed writer in ``folder``; returns how many."""
    n = 0
    if folder.exists():
        for p in folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n
