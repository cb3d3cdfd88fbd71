"""Slides and outputs at fsspec URLs (``s3://bucket/key``, ``https://...``, ``gs://...``).

Credentials and the endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for an S3-compatible store such as MinIO or Ceph).

Remote slides are copied whole into a bounded local cache (:class:`SlideCache`): downloaded under
a temporary name and renamed, keyed by URL and the object's ETag/size, evicted least recently used
once the cache is over its size limit (slides in use are never evicted). :func:`localized`
hands the stage groups of work whose slides fit the cache while the next group downloads.
:func:`publish` uploads a finished output folder; :func:`register_with_webdataset` lets the
training, feature and evaluation readers stream shards from such URLs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from webdataset.gopen import gopen_schemes

from cytosyn_data.core.errors import DataError, UsageError
from cytosyn_data.core.secrets import redact_text, redact_url


def is_url(path) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; S3 endpoint from AWS_ENDPOINT_URL[_S3]."""
    try:
        import fsspec  # optional: the 'remote' extra
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
        raise DataError(f"{redact_url(url)}: no such object") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network: one line naming the URL
        raise DataError(redact_text(f"{url}: cannot stat: {type(exc).__name__}: {exc}")) from None
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
        """The cached copy's name: from the URL without its credentials (a re-signed URL of the same
        object finds its copy)."""
        h = hashlib.sha256(redact_url(url).encode()).hexdigest()[:16]
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
            raise DataError(redact_text(f"{url}: download failed: {type(exc).__name__}: {exc}")) from None
        os.replace(tmp, local)
        meta.write_text(json.dumps(ident))
        with self._lock:
            self.downloaded += local.stat().st_size
        return local

    def evict(self, in_use: set[Path], limit: int | None = None) -> None:
        """Delete least recently used slides, except ``in_use``, until the cache holds at most ``limit``
        bytes (default: its size limit)."""
        limit = self.max_bytes if limit is None else limit
        with self._lock:
            entries = []
            for meta in self.folder.glob("*.json"):
                slide = meta.with_name(meta.name[: -len(".json")])
                if slide.exists():
                    entries.append((meta.stat().st_mtime, slide, meta))
            total = sum(s.stat().st_size for _, s, _ in entries)
            for _, slide, meta in sorted(entries, key=lambda e: e[0]):
                if total <= limit:
                    break
                if slide in in_use:
                    continue
                total -= slide.stat().st_size
                slide.unlink()
                meta.unlink()


def localized(items: list, urls_of, localize, cache: SlideCache | None, sizes: dict[str, int]):
    """Yield consecutive groups of ``items`` with their remote inputs in the local cache.

    ``urls_of(item)``: the slide paths an item reads; ``localize(item, {url: local path})``: the item
    reading local copies. A group's slides fit half the cache (at least one item per group); the
    next group downloads while the caller works on this one, and slides of earlier groups are
    evicted as the cache fills. Without remote inputs (or a cache) the items come as one group."""
    if cache is None or not any(is_url(u) for it in items for u in urls_of(it)):
        if items:
            yield items
        return
    groups, cur, cur_urls = [], [], {}
    for it in items:
        new = {u: sizes.get(u, 0) for u in urls_of(it) if is_url(u) and u not in cur_urls}
        if cur and sum(cur_urls.values()) + sum(new.values()) > cache.max_bytes // 2:
            groups.append((cur, list(cur_urls)))
            cur, cur_urls = [], {}
            new = {u: sizes.get(u, 0) for u in urls_of(it) if is_url(u)}
        cur.append(it)
        cur_urls.update(new)
    groups.append((cur, list(cur_urls)))

    def get(urls):  # a slide that cannot be fetched maps to its error message: its unit reports it
        out = {}
        for u in urls:
            try:
                out[u] = cache.fetch(u)
            except DataError as exc:
                out[u] = str(exc)
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(get, groups[0][1])
        for i, (group, _) in enumerate(groups):
            local = nxt.result()
            # room for the next group (<= half the cache) beside this one: the cache stays within its limit
            cache.evict({v for v in local.values() if isinstance(v, Path)}, cache.max_bytes // 2)
            nxt = pool.submit(get, groups[i + 1][1]) if i + 1 < len(groups) else None
            yield [localize(it, local) for it in group]


def publish(local_out: Path, url: str, skip: tuple[str, ...] = ("work/",)) -> dict[str, int]:
    """Upload a finished output folder to ``url``: files new or changed since the last publish
    (``.published.json`` keeps their size and mtime), tables last so that their presence means the
    shards are complete, and remote files the folder no longer has are deleted."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    record_path = local_out / ".published.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    files = sorted(p for p in local_out.rglob("*") if p.is_file() and not p.name.startswith("."))
    rel = [p.relative_to(local_out).as_posix() for p in files]
    keep = [(p, r) for p, r in zip(files, rel) if not r.startswith(skip)]
    keep.sort(key=lambda pr: (pr[1].endswith((".parquet", ".json", ".md")), pr[1]))  # tables last
    sent = 0
    for p, r in keep:
        st = p.stat()
        ident = [st.st_size, st.st_mtime_ns]
        if record.get(r) != ident or not fs.exists(f"{root}/{r}"):
            fs.put_file(str(p), f"{root}/{r}")
            record[r] = ident
            sent += 1
    names = {r for _, r in keep}
    removed = 0
    for r in [r for r in record if r not in names]:
        fs.rm_file(f"{root}/{r}") if fs.exists(f"{root}/{r}") else None
        del record[r]
        removed += 1
    record_path.write_text(json.dumps(record, sort_keys=True))
    return {"uploaded": sent, "removed": removed, "files": len(keep)}


def open_for_webdataset(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """A webdataset ``gopen`` handler reading through fsspec (s3://, gs://, ...)."""
    fs, path = filesystem(url)
    return fs.open(path, mode, block_size=1 << 24)


def register_with_webdataset(urls: list[str]) -> None:
    """Let webdataset open the schemes of ``urls`` through fsspec (s3 has no handler of its own)."""
    for u in urls:
        scheme = u.split("://", 1)[0]
        if is_url(u) and scheme not in ("http", "https", "pipe"):
            gopen_schemes[scheme] = open_for_webdataset
