"""Slides and outputs at fsspec URLs (``s3://bucket/key``, ``https://...``, ``gs://...``).

Credentials and the endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for an S3-compatible store such as MinIO or Ceph).

Remote slides are copied whole into a bounded local cache (:class:`SlideCache`): downloaded under
a temporary name and renamed, keyed by URL and the object's ETag/size, evicted least recently used
once the cache is over its size limit (slides in use are never evicted). :func:`fetch_in_waves`
hands the stage groups of slides that fit the cache while the next group downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import DataError, UsageError


def is_url(path) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; S3 endpoint from AWS_ENDPOINT_URL[_S3]."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: remote paths need fsspec: pip install 'cytosyn[remote]'") from None
    options = {}
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UsageError(f"{url}: {exc} (pip install 'cytosyn[remote]')") from None


def remote_identity(url: str) -> dict:
    """Size (bytes) and ETag (or mtime) of a remote object: how a stage notices it changed."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"{url}: no such object") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network: one line naming the URL
        raise DataError(f"{url}: cannot stat: {type(exc).__name__}: {exc}") from None
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("updated")
    return {"size": int(info.get("size") or 0), "etag": str(tag).strip('"') if tag is not None else None}


def list_remote(url: str, extensions: set[str]) -> list[str]:
    """Slide URLs under a folder-like ``url`` (recursive), sorted; files with ``extensions`` only."""
    fs, path = filesystem(url)
    proto = url.split("://", 1)[0]
    found = [p for p in fs.find(path) if Path(p).suffix.lower() in extensions]
    return sorted(f"{proto}://{p}" for p in found)


def remote_is_dir(url: str) -> bool:
    if url.endswith("/"):
        return True
    fs, path = filesystem(url)
    try:
        return fs.isdir(path)
    except Exception:  # noqa: BLE001 - an object that cannot be listed is treated as a file
        return False


class SlideCache:
    """A local folder of downloaded slides, at most ``max_bytes`` beyond the slides in use."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.downloaded = 0  # bytes fetched by this cache object

    def local_path(self, url: str) -> Path:
        h = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.folder / f"{h}-{Path(url.split('?')[0]).name}"

    def fetch(self, url: str) -> Path:
        """The local copy of ``url`` (downloaded unless a current copy is cached)."""
        ident = remote_identity(url)
        local = self.local_path(url)
        meta = local.with_name(local.name + ".json")
        if local.exists() and meta.exists() and json.loads(meta.read_text()) == ident:
            os.utime(meta)  # most recently used
            return local
        fs, path = filesystem(url)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            fs.get_file(path, str(tmp))
        except Exception as exc:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: download failed: {type(exc).__name__}: {exc}") from None
        os.replace(tmp, local)
        meta.write_text(json.dumps(ident))
        with self._lock:
            self.downloaded += local.stat().st_size
        return local

    def evict(self, in_use: set[Path]) -> None:
        """Delete least recently used slides, except ``in_use``, until the cache fits its limit."""
        with self._lock:
            entries = []
            for meta in self.folder.glob("*.json"):
                slide = meta.with_name(meta.name[: -len(".json")])
                if slide.exists():
                    entries.append((meta.stat().st_mtime, slide, meta))
            total = sum(s.stat().st_size for _, s, _ in entries)
            for _, slide, meta in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if slide in in_use:
                    continue
                total -= slide.stat().st_size
                slide.unlink()
                meta.unlink()


def fetch_in_waves(urls: list[str], cache: SlideCache, sizes: dict[str, int]):
    """Yield ``{url: local path}`` for consecutive groups of ``urls`` whose sizes fit half the cache
    (at least one slide per group); the next group downloads while the caller works on this one."""
    waves, cur, cur_bytes = [], [], 0
    for u in urls:
        if cur and cur_bytes + sizes[u] > cache.max_bytes // 2:
            waves.append(cur)
            cur, cur_bytes = [], 0
        cur.append(u)
        cur_bytes += sizes[u]
    if cur:
        waves.append(cur)

    def get(wave):
        return {u: cache.fetch(u) for u in wave}

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(get, waves[0]) if waves else None
        for i in range(len(waves)):
            t = time.perf_counter()
            local = nxt.result()
            wait = time.perf_counter() - t
            cache.evict(set(local.values()))
            nxt = pool.submit(get, waves[i + 1]) if i + 1 < len(waves) else None
            yield local, wait
