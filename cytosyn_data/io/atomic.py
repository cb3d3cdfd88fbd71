"""Atomic writes: a file appears whole under its name or not at all (temporary name in the same
folder, then rename), and the clearing of temporaries left by a killed writer."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path


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


def write_parquet_atomic(df, path: Path) -> None:
    """Write a polars DataFrame to ``path`` via a temporary name and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    df.write_parquet(tmp, statistics=False)
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path, durable: bool = False) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=1, sort_keys=True).encode(), durable)


def remove_stale_tmp(folder: Path, name: str | None = None) -> int:
    """Delete temporary files left by a killed writer in ``folder`` (only those of the file ``name``
    when given: a writer that owns one file never touches another writer's); returns how many."""
    n = 0
    if folder.exists():
        for p in folder.glob(f".{glob.escape(name)}.tmp-*" if name else ".*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n
