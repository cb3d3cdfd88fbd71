"""What made an output folder (``run.json``), input identities, and the lock of a running stage.

``run.json`` holds the stage's settings, the code version and the identity of every input. A re-run
compares: the same -> finished work is skipped; different settings or input list -> one
:class:`RunStateError` naming what changed and how to proceed (``--overwrite`` or another ``--out``).
Inputs whose content changed in place (same path, other size or mtime) are redone by the stage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

from cytosyn_data.core.errors import RunStateError
from cytosyn_data.core.secrets import redact_text
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.remote import is_url, remote_identity

RUN_FILE = "run.json"


def code_version() -> str:
    """The installed cytosyn version (recorded, not compared: a code change alone does not refuse)."""
    try:
        return version("cytosyn")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def file_identity(path: str | Path) -> dict:
    """Size (bytes) and mtime (ns) of a local file, or size and ETag of an object at an fsspec URL:
    how a stage notices a file changed in place."""
    if is_url(path):
        return remote_identity(str(path))
    if Path(path).is_dir():  # a DICOM series: its files together
        stats = [p.stat() for p in sorted(Path(path).iterdir()) if p.is_file()]
        return {"size": sum(st.st_size for st in stats), "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
                "files": len(stats)}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def files_digest(files, extra: str = "") -> str:
    """12 hex of a hash of ``extra`` and every file's resolved path, size and mtime: the key of a
    cache derived from those files (a changed, added or removed file gives a new key)."""
    h = hashlib.sha256(extra.encode())
    for f in sorted(Path(p) for p in files):
        ident = file_identity(f)
        h.update(f"\n{f.resolve()}\t{ident['size']}\t{ident['mtime_ns']}".encode())
    return h.hexdigest()[:12]


def _describe(prev: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(prev) | set(new)):
        a, b = prev.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _describe(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v) -> str:
    if isinstance(v, list):
        return f"{len(v)} items"
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _list_changes(prev: list, new: list, what: str) -> list[str]:
    a, b = set(prev), set(new)
    out = []
    if b - a:
        out.append(f"{what} added: {', '.join(sorted(b - a)[:5])}{' ...' if len(b - a) > 5 else ''}")
    if a - b:
        out.append(f"{what} removed: {', '.join(sorted(a - b)[:5])}{' ...' if len(a - b) > 5 else ''}")
    return out


def check_run_file(out: Path, stage: str, settings: dict, inputs: list[str], overwrite: bool,
                   clear, recorded: dict | None = None) -> None:
    """Compare ``out/run.json`` with this run's ``settings`` and ``inputs`` (the list of input names).

    New folder: write it. Same: return (the stage skips finished work). Different: with
    ``overwrite``, call ``clear()`` (which removes the old outputs) and write the new file; else
    raise :class:`RunStateError` naming what changed. ``recorded`` (e.g. the size and mtime of each
    input file) is stored but not compared: the stage redoes the inputs that changed in place."""
    path = out / RUN_FILE
    new = {"stage": stage, "settings": settings, "inputs": sorted(inputs), "code_version": code_version()}
    if recorded:
        new["recorded"] = recorded
    new = json.loads(json.dumps(new))
    if path.exists():
        prev = json.loads(path.read_text())
        changes = _describe(prev.get("settings", {}), new["settings"], "settings.")
        changes += _list_changes(prev.get("inputs", []), new["inputs"], "inputs")
        if prev.get("stage", stage) != stage:
            changes.insert(0, f"stage: {prev.get('stage')} -> {stage}")
        if not changes:
            if (prev.get("code_version"), prev.get("recorded")) != (new["code_version"], new.get("recorded")):
                _write(path, new)
            return
        if not overwrite:
            raise RunStateError(
                f"{out} holds a {prev.get('stage', stage)} run made with other settings or inputs "
                f"({'; '.join(changes[:6])}{'; ...' if len(changes) > 6 else ''}): pass --overwrite to replace "
                "it, or give another --out"
            )
        clear()
    _write(path, new)


def record_run(out: Path, stage: str, settings: dict, inputs: list[str], recorded: dict | None = None) -> None:
    """Write ``out/run.json`` for a stage whose outputs are recomputed whole on every run (eval,
    curate): what made the folder's current contents, without comparing with an earlier run."""
    obj = {"stage": stage, "settings": settings, "inputs": sorted(inputs), "code_version": code_version()}
    if recorded:
        obj["recorded"] = recorded
    out.mkdir(parents=True, exist_ok=True)
    _write(out / RUN_FILE, json.loads(json.dumps(obj, default=str)))


def _write(path: Path, obj: dict) -> None:
    """Write run.json; any credential in a recorded URL or message is redacted first."""
    atomic_write_bytes(path, redact_text(json.dumps(obj, indent=1, sort_keys=True)).encode())


class RunLock:
    """An exclusive lock on ``out/{name}`` held while a stage writes there; a second run on the same
    folder is refused with the holder's pid (``fcntl.flock``: released when the process dies)."""

    def __init__(self, out: Path, name: str = ".lock"):
        self.path = Path(out) / name
        self._fh = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunStateError(
                f"{self.path.parent} is in use by a running cytosyn stage ({holder}); wait for it to end "
                "or give another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
