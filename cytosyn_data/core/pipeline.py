"""Small overlapped pipelines for the GPU stages: a producer read ahead on a thread, a function mapped
over a bounded window of items on W threads in order, a consumer written behind on a thread.

Order is always kept, so a stage's output bytes do not depend on W. Threads suffice: PNG decoding
(OpenCV, Pillow, fpng), tar reads and writes, and torch's device copies release the GIL.
"""

from __future__ import annotations

import collections
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["Writer", "ordered_map", "read_ahead"]

T = TypeVar("T")
U = TypeVar("U")
_END = object()


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` produced on a thread, at most ``depth`` ahead of the consumer; its error re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for it in items:
                if stop.is_set():
                    return
                q.put(it)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(exc)
            return
        q.put(_END)

    t = threading.Thread(target=produce, daemon=True, name="cytosyn-read-ahead")
    t.start()
    try:
        while True:
            it = q.get()
            if it is _END:
                return
            if isinstance(it, BaseException):
                raise it
            yield it
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def ordered_map(fn: Callable[[T], U], items: Iterable[T], workers: int, window: int | None = None) -> Iterator[U]:
    """``fn`` over ``items`` on ``workers`` threads, results in the items' order, at most ``window``
    (default 2 x workers) in flight: memory stays bounded however long ``items`` is."""
    if workers <= 1:
        for it in items:
            yield fn(it)
        return
    window = window or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cytosyn-map") as pool:
        pending: collections.deque[Future] = collections.deque()
        try:
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class Writer:
    """Calls ``fn(item)`` on one thread, in submission order, at most ``depth`` behind: the caller goes
    on (the model computes the next batch) while the previous one is written. ``close`` waits for
    every write and raises the first error."""

    def __init__(self, fn: Callable[[T], None], depth: int = 2):
        self.fn, self.depth = fn, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cytosyn-writer")
        self._pending: collections.deque[Future] = collections.deque()

    def submit(self, item) -> None:
        self._pending.append(self._pool.submit(self.fn, item))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
