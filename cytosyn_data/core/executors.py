"""Where work units run: this process, a local process pool, or a Dask distributed cluster.

Every backend has one method, ``map(fn, items, desc)``, that yields ``fn(item)`` for each item
as units complete, with a progress bar. Units are idempotent (their output appears by atomic
rename and is skipped when current), so a unit Dask re-runs after losing a worker is harmless.

- ``LocalPool(workers)``: this process and ``workers - 1`` spawned processes (``concurrent.futures``);
- ``DaskCluster(client)``: an existing scheduler (``--scheduler tcp://HOST:PORT``), a
  ``LocalCluster`` on 127.0.0.1 (``--cluster local``) or SLURM jobs started with dask-jobqueue
  (``--cluster slurm --jobs N``, see ``pipelines/slurm/``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import importlib
import multiprocessing
import os
import pickle
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cytosyn_data.core.errors import UsageError


@dataclass(frozen=True)
class ClusterSpec:
    """How to reach or start a cluster; ``kind`` is ``local`` (process pool), ``dask-local``,
    ``scheduler`` (``address``) or ``slurm``. Memory like ``"16GiB"``, walltime ``"HH:MM:SS"``."""

    kind: str = "local"
    workers: int = 1
    address: str | None = None
    jobs: int = 1
    cores: int = 8
    memory: str = "32GiB"
    walltime: str = "04:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra: tuple[str, ...] = ()
    local_directory: str | None = None
    tls: tuple[str, str, str] | None = None  # (CA, certificate, key) files for a tls:// --scheduler
    dashboard: str | None = None  # the scheduler's dashboard address (None: off, or 127.0.0.1 only)
    shared_temp_directory: str | None = None  # where --cluster slurm writes its temporary TLS files for the jobs


class LocalPool:
    """Units in this process and in ``workers - 1`` spawned processes kept for the whole run.

    This process is one of the ``workers``: it runs units on a thread of its own while its main
    thread only hands out units, one at a time to each process and to that thread, as they finish.
    The pool's processes import the stage's modules (``warm``) while this one starts working. One
    process fewer to start and import is ~0.5 CPU-second less on every run, which on a single slide
    is much of what keeps ``--workers 2`` from a 2x speed-up (benchmarks/tile_throughput.py)."""

    def __init__(self, workers: int, warm: tuple[str, ...] = ()):
        self.workers = workers
        self.name = f"local pool, {workers} process(es)"
        self._ex = self._here = None
        if workers > 1:
            # spawn, not fork: forking a process that runs polars' thread pool can deadlock
            self._ex = ProcessPoolExecutor(max_workers=workers - 1, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(workers - 1):
                self._ex.submit(_import_modules, warm)
            self._here = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cytosyn-unit")

    def map(self, fn, items: list, desc: str):
        if self._ex is None or len(items) <= 1:
            for it in tqdm(items, desc=desc, unit="unit"):
                yield fn(it)
            return
        pending, away, here = collections.deque(items), set(), set()
        try:
            with tqdm(total=len(items), desc=desc, unit="unit") as bar:
                while pending or away or here:
                    while pending and len(away) < self.workers - 1:
                        away.add(self._ex.submit(fn, pending.popleft()))
                    if pending and not here:
                        here.add(self._here.submit(_run_on_a_copy, fn, pending.popleft()))
                    done, _ = wait(away | here, return_when=FIRST_COMPLETED)
                    for f in done:
                        away.discard(f)
                        here.discard(f)
                        bar.update()
                        yield f.result()
        finally:
            for f in away | here:
                f.cancel()
            wait(here)  # a unit of this process is never left running behind the caller

    def close(self) -> None:
        """Let the processes go without waiting for them to exit (~0.15 s): the caller goes on with
        its own work meanwhile, and Python joins them at exit."""
        if self._ex is not None:
            self._here.shutdown(wait=True, cancel_futures=True)
            self._ex.shutdown(wait=False, cancel_futures=True)


def _run_on_a_copy(fn, item):
    """``fn`` on a pickled copy of ``item``, as a spawned process would get it: the unit shares
    nothing with the caller, which goes on using its own objects meanwhile."""
    return fn(pickle.loads(pickle.dumps(item)))


def _import_modules(names: tuple[str, ...]) -> None:
    for n in names:
        importlib.import_module(n)


class DaskCluster:
    """Units as Dask tasks; a task whose worker dies is re-run elsewhere by the scheduler."""

    def __init__(self, client, name: str):
        self.client = client
        self.name = name

    def map(self, fn, items: list, desc: str):
        from distributed import as_completed as dask_completed  # optional: the 'dask' extra

        if not items:
            return
        futs = self.client.map(fn, items, pure=False, retries=2)
        try:
            for f in tqdm(dask_completed(futs), total=len(futs), desc=desc, unit="unit"):
                yield f.result()
        finally:
            self.client.cancel(futs)


@contextlib.contextmanager
def open_executor(spec: ClusterSpec, warm: tuple[str, ...] = ()):
    """The backend for ``spec``; pools and clusters this call starts are closed on exit. ``warm``:
    modules the local pool's workers import as soon as they start."""
    if spec.kind == "local":
        pool = LocalPool(spec.workers, warm)
        try:
            yield pool
        finally:
            pool.close()
        return
    try:
        from distributed import Client, LocalCluster  # optional: the 'dask' extra
    except ImportError:
        raise UsageError("--scheduler/--cluster need dask distributed: pip install 'cytosyn[dask]'") from None
    if spec.kind == "scheduler":
        with Client(spec.address, timeout="30s", security=scheduler_security(spec)) as client:
            yield DaskCluster(client, f"Dask scheduler {spec.address}")
    elif spec.kind == "dask-local":
        security = temporary_security()  # other users of this machine reach 127.0.0.1 too
        with LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          protocol="tls://", security=security, dashboard_address=spec.dashboard,
                          local_directory=spec.local_directory) as cluster, \
                Client(cluster, security=security) as client:
            yield DaskCluster(client, f"Dask LocalCluster (TLS), {spec.workers} worker(s)")
    elif spec.kind == "slurm":
        with slurm_cluster(spec) as cluster, Client(cluster, security=cluster.security) as client:
            cluster.scale(jobs=spec.jobs)
            yield DaskCluster(client, f"Dask on SLURM, {spec.jobs} job(s) x {spec.cores} cores")
    else:
        raise UsageError(f"unknown cluster kind {spec.kind!r}")


def slurm_cluster(spec: ClusterSpec):
    """A dask-jobqueue ``SLURMCluster`` (one Dask worker process per core, one thread each)."""
    try:
        from dask_jobqueue import SLURMCluster  # optional: the 'dask' extra
    except ImportError:
        raise UsageError("--cluster slurm needs dask-jobqueue: pip install 'cytosyn[dask]'") from None
    if spec.shared_temp_directory:
        Path(spec.shared_temp_directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    return SLURMCluster(
        cores=spec.cores,
        processes=spec.cores,
        memory=spec.memory,
        walltime=spec.walltime,
        queue=spec.queue,
        account=spec.account,
        job_extra_directives=list(spec.job_extra),
        local_directory=spec.local_directory or "$TMPDIR",
        security=temporary_security(),  # TLS with credentials made for this run, handed to the jobs as files
        shared_temp_directory=spec.shared_temp_directory,
        scheduler_options={"dashboard_address": spec.dashboard} if spec.dashboard else {"dashboard": False},
    )


def temporary_security():
    """Dask TLS with a certificate made for this run (``Security.temporary``): only processes given it
    (this client, the workers it starts) can talk to the scheduler, and the traffic is encrypted."""
    from distributed.security import Security  # optional: the 'dask' extra

    return Security.temporary()


def write_tls_files(folder: str | Path) -> tuple[Path, Path, Path]:
    """Temporary TLS credentials as files for a scheduler, workers and clients started by hand (a
    SLURM allocation): ``folder/ca.pem``, ``cert.pem``, ``key.pem``, readable by the user alone."""
    from distributed.security import Security  # optional: the 'dask' extra

    sec = Security.temporary()
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    out = []
    for name, pem in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert), ("key.pem", sec.tls_client_key)):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        out.append(folder / name)
    return tuple(out)


def scheduler_security(spec: ClusterSpec):
    """The TLS credentials for an existing ``--scheduler``: the given files, else Dask's own config
    (``distributed.comm.tls.*``; None lets the client read it)."""
    if spec.tls is None:
        return None
    from distributed.security import Security  # optional: the 'dask' extra

    ca, cert, key = spec.tls
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


def launched_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun / accelerate launch / srun wrappers set them; (0, 1) when not
    launched."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_device(requested: str | None = None) -> str:
    """The torch device of this process: ``requested``, else CUDA when present, else the CPU. Under
    torchrun / accelerate launch (``LOCAL_RANK`` set) a bare ``cuda`` with several visible GPUs
    becomes ``cuda:{LOCAL_RANK mod count}``, so the ranks of a node do not share GPU 0."""
    import torch  # heavy: only the GPU stages call this

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    local = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local is not None and torch.cuda.device_count() > 1:
        device = f"cuda:{int(local) % torch.cuda.device_count()}"
    return device


def default_decode_workers() -> int:
    """PNG-decoding threads per process of a GPU stage: the CPUs per visible GPU (at most 8), or 2 on a
    CPU-only machine."""
    import torch  # heavy: only the GPU stages call this

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return min(8, max(1, (os.cpu_count() or 2) // gpus)) if gpus else 2


def rank_barrier(timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait until every rank of a torchrun / accelerate job gets here (a gloo barrier: CPU tensors,
    across nodes, on torchrun's MASTER_ADDR/PORT). A process group already started is used as it is;
    one started here is closed again. ``timeout_s``: how long a rank that finished its share may wait
    for the slowest (a failed rank ends the job through torchrun). Without a launch, nothing."""
    if launched_rank()[1] <= 1:
        return
    import torch.distributed as dist  # heavy: only the GPU stages call this

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        dist.barrier()
    finally:
        if own:
            dist.destroy_process_group()
