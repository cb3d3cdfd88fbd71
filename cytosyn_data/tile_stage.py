"""`cytosyn-data tile`: slides -> tissue candidates -> stratified selection -> PNG shards.

Pure function :func:`run_tile` over explicit inputs (slide table, config, output folder).
Work is resumable and crash-safe. Three phases, each of whose outputs is written to a
temporary name and renamed when complete:

1. detect (per slide): open, resolve MPP, read plan, tissue mask, candidates
   -> ``work/detect/{slide_id}.json|.parquet|.thumb.png|.mask.png``
2. extract (per slide, the slide opened once): read the selected tiles block by block,
   encode lossless PNG -> ``work/staging/{slide_id}.bin`` + index ``.parquet``
3. shard: a global keyed-hash shuffle of all tiles -> ``shards/{name}-{i:06d}.tar``
   (pure byte copy from staging, fixed member metadata, so re-runs are byte-identical).

A re-run skips finished slides and shards; a killed run leaves only temporary files,
which are removed. Work can be split across machines with ``shard_index/num_shards``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from . import qc
from .checks import fraction, integer, non_negative, one_of, positive
from .errors import UsageError
from .png import encode_png
from .run_state import RunLock, check_run_file, file_identity
from .sampling import NULL_STRATUM, allocate_quotas, select_tiles, shard_order
from .shards import atomic_write_bytes, remove_stale_tmp, tmp_path, write_tar_atomic
from .tissue import TissueParams, tile_tissue_fractions, tissue_mask
from .wsi import RESAMPLE_NAMES, ReadPlan, SlideError, level_pixel, make_read_plan, open_slide, resize_to_tile, resolve_mpp


@dataclass(frozen=True)
class TileConfig:
    """Settings of the tile stage (``pipelines/tile.yaml``). Sizes in pixels, resolutions in MPP."""

    tile_size: int = 224
    target_mpp: float = 0.5
    mpp_tolerance: float = 0.02
    tissue_mpp: float = 8.0
    tissue_threshold: float = 0.6
    tiles: int | None = None  # global budget; None takes every candidate
    seed: int = 0
    shard_size: int = 10_000
    shard_name: str = "tiles"
    resample: str = "area"
    png_encoder: str = "fpng"
    tissue: TissueParams = field(default_factory=TissueParams)

    def fingerprint(self) -> dict:
        """Everything that changes the output bytes."""
        return dataclasses.asdict(self)

    def __post_init__(self):
        self.validate("tile config")

    def validate(self, where: str) -> None:
        """Every value checked; errors name ``where`` (e.g. the config file) and the key."""
        positive(self.tile_size, f"{where}: tile_size", int)
        positive(self.target_mpp, f"{where}: target_mpp")
        fraction(self.mpp_tolerance, f"{where}: mpp_tolerance")
        positive(self.tissue_mpp, f"{where}: tissue_mpp")
        fraction(self.tissue_threshold, f"{where}: tissue_threshold", closed=True)
        if self.tiles is not None:
            positive(self.tiles, f"{where}: tiles", int)
        integer(self.seed, f"{where}: seed")
        positive(self.shard_size, f"{where}: shard_size", int)
        one_of(self.resample, f"{where}: resample", RESAMPLE_NAMES)
        one_of(self.png_encoder, f"{where}: png_encoder", ("fpng", "pillow"))
        if not isinstance(self.shard_name, str) or not self.shard_name or "/" in self.shard_name:
            raise UsageError(f"{where}: shard_name must be a non-empty name without '/', got {self.shard_name!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "tile config") -> "TileConfig":
        d = dict(d)
        tissue = d.pop("tissue", {}) or {}
        if not isinstance(tissue, dict):
            raise UsageError(f"{where}: tissue must be a mapping, got {tissue!r}")
        known = {f.name for f in dataclasses.fields(TissueParams)}
        unknown = (set(d) - {f.name for f in dataclasses.fields(cls)}) | {f"tissue.{k}" for k in set(tissue) - known}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        for k, v in tissue.items():
            if k == "value_min":
                non_negative(v, f"{where}: tissue.{k}")
            else:
                positive(v, f"{where}: tissue.{k}")
        try:
            return cls(tissue=TissueParams(**tissue), **d)
        except UsageError as exc:
            raise UsageError(str(exc).replace("tile config", where, 1)) from None


@dataclass
class TileResult:
    """What :func:`run_tile` did; ``failed`` lists slide_ids that failed."""

    out: Path
    n_slides: int
    failed: list[str]
    n_candidates: int
    n_tiles: int
    n_shards: int
    seconds: dict[str, float]
    stratum_quotas: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.failed


def tile_key(slide_id: str, x: int, y: int) -> str:
    """Unique tile key ``{slide_id}__x{x}_y{y}`` (level-0 pixels of the top-left corner)."""
    return f"{slide_id}__x{x}_y{y}"


def _write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.write_parquet(tmp, statistics=False)
    os.replace(tmp, path)


def _write_json_atomic(obj: dict, path: Path, durable: bool = False) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), durable)


def _write_png_atomic(rgb: np.ndarray, path: Path) -> None:
    atomic_write_bytes(path, encode_png(rgb), durable=False)


# ---------------------------------------------------------------- phase 1: detect
CANDIDATE_SCHEMA = {
    "key": pl.String,
    "slide_id": pl.String,
    "col": pl.Int32,
    "row": pl.Int32,
    "x": pl.Int64,
    "y": pl.Int64,
    "tissue_fraction": pl.Float32,
}


def detect_slide(slide: dict, cfg: TileConfig, work: Path) -> dict:
    """Open one slide, resolve its MPP and read plan, find tissue and candidate tiles.

    Writes ``work/detect/{slide_id}.{json,parquet,thumb.png,mask.png}``; returns the json dict
    (status ``ok`` or ``failed`` with the error naming the file and the cause).
    """
    sid = slide["slide_id"]
    d = work / "detect"
    info: dict = {"slide_id": sid, "path": slide["path"], "status": "failed", "error": None}
    t0 = time.perf_counter()
    try:
        info["file"] = file_identity(slide["path"])
        with open_slide(slide["path"]) as s:
            mpp0, source = resolve_mpp(s, slide.get("mpp_override"))
            plan = make_read_plan(s, mpp0, cfg.target_mpp, cfg.tile_size, cfg.mpp_tolerance, cfg.resample)
            w0, h0 = s.dimensions
            tw = max(1, int(round(w0 * mpp0 / cfg.tissue_mpp)))
            th = max(1, int(round(h0 * mpp0 / cfg.tissue_mpp)))
            thumb = s.thumbnail((tw, th))
            info.update(
                backend=s.backend,
                vendor=s.vendor,
                width=w0,
                height=h0,
                levels=s.level_count,
                mpp=mpp0,
                mpp_source=source,
                fast_reads=s.fast_reads,
                level_dimensions=s.level_dimensions,
                level_downsamples=s.level_downsamples,
            )
            level_dims = s.level_dimensions[plan.level]
        mask_mpp = mpp0 * w0 / thumb.shape[1]
        mask = tissue_mask(thumb, mask_mpp, cfg.tissue)
        ncol, nrow = plan.grid_shape(level_dims)
        cols, rows = np.meshgrid(np.arange(ncol), np.arange(nrow))
        cols, rows = cols.ravel(), rows.ravel()
        x0, y0 = plan.level0_xy(cols, rows)
        frac = tile_tissue_fractions(mask, x0, y0, plan.footprint, (w0, h0))
        keep = frac >= cfg.tissue_threshold
        cand = pl.DataFrame(
            {
                "key": [tile_key(sid, int(x), int(y)) for x, y in zip(x0[keep], y0[keep])],
                "slide_id": [sid] * int(keep.sum()),
                "col": cols[keep],
                "row": rows[keep],
                "x": x0[keep],
                "y": y0[keep],
                "tissue_fraction": frac[keep],
            },
            schema=CANDIDATE_SCHEMA,
        )
        _write_png_atomic(thumb, d / f"{sid}.thumb.png")
        _write_png_atomic(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, 2), d / f"{sid}.mask.png")
        _write_parquet_atomic(cand, d / f"{sid}.parquet")
        info.update(
            status="ok",
            read_level=plan.level,
            level_mpp=plan.level_mpp,
            downsample=plan.downsample,
            region=plan.region,
            native=plan.native,
            footprint=plan.footprint,
            n_grid=int(ncol * nrow),
            n_candidates=int(keep.sum()),
            tissue_area_fraction=float(mask.mean()),
        )
    except SlideError as exc:
        info["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of one slide is recorded, the run goes on
        info["error"] = f"{slide['path']}: {type(exc).__name__}: {exc}"
    info["detect_seconds"] = time.perf_counter() - t0
    _write_json_atomic(info, d / f"{sid}.json")
    return info


# --------------------------------------------------------------- phase 2: extract
STAGING_SCHEMA = {
    "key": pl.String,
    "x": pl.Int64,
    "y": pl.Int64,
    "offset": pl.Int64,
    "length": pl.Int64,
    "sha256": pl.String,
}


def extract_slide(info: dict, selected: pl.DataFrame, cfg: TileConfig, work: Path) -> dict:
    """Read and PNG-encode the selected tiles of one slide (opened once), in row-major order.

    Writes ``work/staging/{slide_id}.bin`` (PNG bytes back to back) and its index
    ``.parquet`` (key, x, y, offset, length, sha256), the index last. Returns a status dict.
    """
    sid = info["slide_id"]
    stage = work / "staging"
    stage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        plan = _plan_from_info(info, cfg)
        r = plan.region
        sel = selected.sort(["row", "col"])  # row-major: neighbouring TIFF tiles stay cached
        lengths, digests = [], []
        final = stage / f"{sid}.bin"
        tmp = tmp_path(final)
        with _open_for_reads(info) as s, open(tmp, "wb", buffering=1 << 22) as fh:
            for x, y in zip(sel["x"].to_list(), sel["y"].to_list()):  # streamed: memory stays flat
                tile = resize_to_tile(s.read_rgb((x, y), plan.level, (r, r)), plan)
                png = encode_png(tile, cfg.png_encoder)
                fh.write(png)
                lengths.append(len(png))
                digests.append(hashlib.sha256(png).hexdigest())
        os.replace(tmp, final)
        lengths = np.array(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        index = pl.DataFrame(
            {
                "key": sel["key"],
                "x": sel["x"],
                "y": sel["y"],
                "offset": offsets,
                "length": lengths,
                "sha256": digests,
            },
            schema=STAGING_SCHEMA,
        )
        _write_parquet_atomic(index, stage / f"{sid}.parquet")
        return {"slide_id": sid, "status": "ok", "n": len(sel), "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001
        return {
            "slide_id": sid,
            "status": "failed",
            "error": f"{info['path']}: extraction failed: {type(exc).__name__}: {exc}",
            "seconds": time.perf_counter() - t0,
        }


class _TiffOnly:
    """The read_rgb of a SlideHandle backed by the TIFF reader alone (skips opening openslide)."""

    def __init__(self, info: dict):
        from .tiff_reader import TiledTiffReader

        self._r = TiledTiffReader(info["path"], [tuple(d) for d in info["level_dimensions"]])
        self._ds = info["level_downsamples"]

    def read_rgb(self, location, level, size):
        lx, ly = level_pixel(location, self._ds[level])
        return self._r.read(level, lx, ly, size[0], size[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._r.close()


def _open_for_reads(info: dict):
    """Fast TIFF-only reader when detection found one, else the full slide handle."""
    if info.get("fast_reads"):
        return _TiffOnly(info)
    return open_slide(info["path"])


def _plan_from_info(info: dict, cfg: TileConfig) -> ReadPlan:
    return ReadPlan(
        level=int(info["read_level"]),
        level_mpp=float(info["level_mpp"]),
        downsample=float(info["downsample"]),
        region=int(info["region"]),
        tile_size=cfg.tile_size,
        target_mpp=cfg.target_mpp,
        native=bool(info["native"]),
        resample=cfg.resample,
    )


def _staging_done(work: Path, sid: str, keys: list[str]) -> bool:
    idx = work / "staging" / f"{sid}.parquet"
    if not idx.exists() or not (work / "staging" / f"{sid}.bin").exists():
        return False
    return pl.read_parquet(idx, columns=["key"])["key"].to_list() == keys


# ----------------------------------------------------------------- phase 3: shard
def write_shards(tiles: pl.DataFrame, work: Path, shard_dir: Path) -> list[str]:
    """Write the tiles (already in shard order, with a ``shard`` column) into tar shards.

    Each member pair is ``{key}.png`` and ``{key}.json`` (the manifest row). A shard is skipped
    only when it exists and ``work/shard_plans/{name}.sha256`` says it was written from the same
    rows (keys, manifest rows, PNG digests); shards of this prefix that the plan no longer names
    are removed, so a re-run never leaves old and new tiles side by side.
    """
    remove_stale_tmp(shard_dir)
    names = tiles["shard"].unique(maintain_order=True).to_list()
    plans = work / "shard_plans"
    _remove_stale_shards(shard_dir, plans, names)
    written = []
    handles: dict[str, object] = {}
    try:
        for name in tqdm(names, desc="shards", unit="shard", leave=False):
            path = shard_dir / name
            part = tiles.filter(pl.col("shard") == name)
            manifests = [json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, sort_keys=True).encode()
                         for row in part.iter_rows(named=True)]
            digest = hashlib.sha256(b"\n".join(manifests)).hexdigest()  # the shard's plan: rows with PNG sha256
            if path.exists() and (plans / f"{name}.sha256").exists() and (plans / f"{name}.sha256").read_text() == digest:
                continue

            def members(part=part, manifests=manifests):
                for row, meta in zip(part.iter_rows(named=True), manifests):
                    sid = row["slide_id"]
                    fh = handles.get(sid)
                    if fh is None:
                        if len(handles) >= 256:
                            for h in handles.values():
                                h.close()
                            handles.clear()
                        fh = handles[sid] = open(work / "staging" / f"{sid}.bin", "rb")
                    fh.seek(row["_offset"])
                    png = fh.read(row["_length"])
                    if len(png) != row["_length"]:
                        raise RuntimeError(f"staging for {sid} is truncated at {row['key']}")
                    yield f"{row['key']}.png", png
                    yield f"{row['key']}.json", meta

            write_tar_atomic(path, members())
            atomic_write_bytes(plans / f"{name}.sha256", digest.encode(), durable=False)
            written.append(name)
    finally:
        for h in handles.values():
            h.close()
    return written


def _remove_stale_shards(shard_dir: Path, plans: Path, names: list[str]) -> None:
    """Delete shards (and their plan files) of the prefixes in ``names`` that ``names`` does not list."""
    keep = set(names)
    for prefix in {n.rsplit("-", 1)[0] for n in names}:
        for p in shard_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if p.name not in keep:
                p.unlink()
                (plans / f"{p.name}.sha256").unlink(missing_ok=True)


# ------------------------------------------------------------------- orchestration
SLIDES_SCHEMA = {
    "slide_id": pl.String,
    "path": pl.String,
    "backend": pl.String,
    "vendor": pl.String,
    "width": pl.Int64,
    "height": pl.Int64,
    "levels": pl.Int32,
    "mpp": pl.Float64,
    "mpp_source": pl.String,
    "tss": pl.String,
    "project": pl.String,
    "patient": pl.String,
    "sample_type": pl.String,
    "slide_type": pl.String,
    "read_level": pl.Int32,
    "native": pl.Boolean,
    "footprint": pl.Float64,
    "status": pl.String,
    "error": pl.String,
    "n_candidates": pl.Int64,
    "n_selected": pl.Int64,
}

TILES_SCHEMA = {
    "key": pl.String,
    "slide_id": pl.String,
    "tss": pl.String,
    "project": pl.String,
    "patient": pl.String,
    "slide_type": pl.String,
    "x": pl.Int64,
    "y": pl.Int64,
    "footprint": pl.Float64,
    "level_x": pl.Int64,  # read window: level pixels [level_x, level_x + region) of read_level
    "level_y": pl.Int64,
    "region": pl.Int32,
    "downsample": pl.Float64,  # of read_level: the window covers level-0 [level_x * downsample, ...)
    "mpp": pl.Float64,
    "read_level": pl.Int32,
    "resample": pl.String,
    "tissue_fraction": pl.Float32,
    "shard": pl.String,
    "sha256": pl.String,
}


def _map(fn, items, workers: int, desc: str):
    """Apply ``fn`` to ``items`` (in processes when workers > 1), yielding results with a progress bar."""
    if workers <= 1 or len(items) <= 1:
        for it in tqdm(items, desc=desc, unit="slide"):
            yield fn(*it)
        return
    # spawn, not fork: forking a process that runs polars' thread pool can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = [ex.submit(fn, *it) for it in items]
        for f in tqdm(futs, desc=desc, unit="slide"):
            yield f.result()


def _part_suffix(shard_index: int, num_shards: int) -> str:
    return "" if num_shards == 1 else f"-part{shard_index:04d}of{num_shards:04d}"


def run_tile(
    slides: pl.DataFrame,
    out: str | Path,
    cfg: TileConfig = TileConfig(),
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    stage: str = "all",
    keep_staging: bool = False,
    overwrite: bool = False,
) -> TileResult:
    """Run the tile stage for the slide table ``slides`` (see slide_table.build_slide_table).

    ``out/run.json`` records the settings and the slide list: a re-run with other ones is refused
    (:class:`RunStateError` naming the changes) unless ``overwrite`` clears the folder first. A slide
    whose file changed in place (size, mtime), or that failed before, is detected and extracted
    anew, and every shard whose content changes is rewritten. The folder is locked while the run
    lasts (one lock per ``shard_index``).

    ``stage``: ``detect`` (phase 1 only), ``extract`` (phases 2-3; detection of every slide
    must exist) or ``all``. With ``num_shards > 1`` this job handles slides
    ``index % num_shards == shard_index`` and names its shards and tables with a part suffix;
    ``cytosyn-data merge`` joins the parts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, f".lock{_part_suffix(shard_index, num_shards)}"):
        inputs = [f"{r['slide_id']}\t{r['path']}\tmpp={r['mpp_override']}" for r in slides.to_dicts()]
        files = {}
        for r in slides.to_dicts():
            try:
                files[r["slide_id"]] = file_identity(r["path"])
            except OSError as exc:
                files[r["slide_id"]] = f"unreadable: {exc.strerror}"
        check_run_file(out, "tile", {"config": cfg.fingerprint()}, inputs, overwrite, lambda: clear_tile_outputs(out),
                       recorded={"slide_files": files})
        return _run_tile(slides, out, cfg, workers, shard_index, num_shards, stage, keep_staging)


def clear_tile_outputs(out: Path) -> None:
    """Remove everything a tile run wrote into ``out`` (shards, tables, QC, work files, run.json)."""
    import shutil

    for sub in ("shards", "work", "qc"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for pattern in ("slides*.parquet", "candidates*.parquet", "tiles*.parquet", "report*.md", "run.json"):
        for p in out.glob(pattern):
            p.unlink()


def _run_tile(slides, out: Path, cfg: TileConfig, workers: int, shard_index: int, num_shards: int, stage: str,
              keep_staging: bool) -> TileResult:
    work = out / "work"
    for sub in ("detect", "staging"):
        remove_stale_tmp(work / sub)
    seconds: dict[str, float] = {}
    all_rows = slides.to_dicts()
    mine = [r for i, r in enumerate(all_rows) if i % num_shards == shard_index]
    suffix = _part_suffix(shard_index, num_shards)

    # phase 1 ---------------------------------------------------------------
    t = time.perf_counter()
    todo = [r for r in mine if not _detect_ok(work, r)]
    for r in todo:  # a slide detected anew (new, failed before, or changed in place) is extracted anew
        for ext in (".bin", ".parquet"):
            (work / "staging" / f"{r['slide_id']}{ext}").unlink(missing_ok=True)
    for info in _map(detect_slide, [(r, cfg, work) for r in todo], workers, "detect"):
        if info["status"] != "ok":
            tqdm.write(f"FAILED {info['error']}")
    seconds["detect"] = time.perf_counter() - t
    if stage == "detect":
        return _summary_only(out, mine, work, seconds)

    infos = {}
    missing = []
    for r in all_rows:
        p = work / "detect" / f"{r['slide_id']}.json"
        if p.exists():
            infos[r["slide_id"]] = json.loads(p.read_text())
        else:
            missing.append(r["slide_id"])
    if missing:
        raise RuntimeError(
            f"detection results missing for {len(missing)} slide(s) (e.g. {missing[:3]}); with "
            "--num-shards > 1 run '--stage detect' for every shard index first"
        )

    # selection (global, identical in every job) -------------------------------
    ok_rows = [r for r in all_rows if infos[r["slide_id"]]["status"] == "ok"]
    strata = [r["tss"] or NULL_STRATUM for r in ok_rows]
    n_cand = np.array([infos[r["slide_id"]]["n_candidates"] for r in ok_rows], dtype=np.int64)
    quotas, stratum_totals = allocate_quotas(
        strata, n_cand, [r["slide_id"] for r in ok_rows], cfg.tiles, cfg.seed
    )
    quota_of = {r["slide_id"]: int(q) for r, q in zip(ok_rows, quotas)}

    # phase 2 ---------------------------------------------------------------
    t = time.perf_counter()
    candidates: dict[str, pl.DataFrame] = {}
    selected: dict[str, pl.DataFrame] = {}
    jobs = []
    for r in mine:
        sid = r["slide_id"]
        if infos[sid]["status"] != "ok":
            continue
        cand = pl.read_parquet(work / "detect" / f"{sid}.parquet")
        pick = select_tiles(sid, cand.height, quota_of[sid], cfg.seed)
        sel = cand[pick].sort(["row", "col"])
        candidates[sid] = cand.with_columns(pl.Series("selected", np.isin(np.arange(cand.height), pick)))
        selected[sid] = sel
        if sel.height and not _staging_done(work, sid, sel["key"].to_list()):
            jobs.append((infos[sid], sel, cfg, work))
    extract_status = {}
    for res in _map(extract_slide, jobs, workers, "extract"):
        extract_status[res["slide_id"]] = res
        if res["status"] != "ok":
            tqdm.write(f"FAILED {res['error']}")
            infos[res["slide_id"]].update(status="failed", error=res["error"])
    seconds["extract"] = time.perf_counter() - t

    # phase 3 ---------------------------------------------------------------
    t = time.perf_counter()
    parts = []
    for r in mine:
        sid = r["slide_id"]
        if infos[sid]["status"] != "ok" or selected[sid].height == 0:
            continue
        idx = pl.read_parquet(work / "staging" / f"{sid}.parquet")
        info = infos[sid]
        parts.append(
            selected[sid]
            .select("key", "x", "y", "tissue_fraction")
            .join(idx.select("key", "offset", "length", "sha256"), on="key", how="left")
            .with_columns(
                slide_id=pl.lit(sid),
                tss=pl.lit(r["tss"], pl.String),
                project=pl.lit(r["project"], pl.String),
                patient=pl.lit(r["patient"], pl.String),
                slide_type=pl.lit(r["slide_type"], pl.String),
                footprint=pl.lit(float(info["footprint"])),
                level_x=((pl.col("x") / float(info["downsample"])) + 0.5).floor().cast(pl.Int64),
                level_y=((pl.col("y") / float(info["downsample"])) + 0.5).floor().cast(pl.Int64),
                region=pl.lit(int(info["region"]), pl.Int32),
                downsample=pl.lit(float(info["downsample"])),
                mpp=pl.lit(cfg.target_mpp),
                read_level=pl.lit(int(info["read_level"]), pl.Int32),
                resample=pl.lit("native" if info["native"] else RESAMPLE_NAMES[cfg.resample]),
            )
            .rename({"offset": "_offset", "length": "_length"})
        )
    shard_dir = out / "shards"
    prefix = f"{cfg.shard_name}{suffix}"
    if parts:
        tiles = pl.concat(parts, how="diagonal_relaxed")
        order = shard_order(tiles["key"].to_list(), cfg.seed)
        tiles = tiles[order]
        shard_no = np.arange(tiles.height) // cfg.shard_size
        tiles = tiles.with_columns(shard=pl.Series([f"{prefix}-{i:06d}.tar" for i in shard_no]))
        tiles = tiles.select(*TILES_SCHEMA, "_offset", "_length")
        write_shards(tiles, work, shard_dir)
        tiles = tiles.select(list(TILES_SCHEMA)).cast(TILES_SCHEMA)
    else:
        tiles = pl.DataFrame(schema=TILES_SCHEMA)
    seconds["shard"] = time.perf_counter() - t

    # tables, QC, report ----------------------------------------------------
    n_sel = tiles.group_by("slide_id").len()
    n_sel = dict(zip(n_sel["slide_id"].to_list(), n_sel["len"].to_list()))
    slide_rows = []
    for r in mine:
        info = infos[r["slide_id"]]
        slide_rows.append(
            {
                **{k: info.get(k) for k in SLIDES_SCHEMA if k in info},
                **{k: r[k] for k in ("tss", "project", "patient", "sample_type", "slide_type")},
                "slide_id": r["slide_id"],
                "path": r["path"],
                "n_candidates": info.get("n_candidates"),
                "n_selected": n_sel.get(r["slide_id"], 0),
            }
        )
    slides_df = pl.DataFrame(slide_rows, schema=SLIDES_SCHEMA)
    cand_df = (
        pl.concat(list(candidates.values()))
        if candidates
        else pl.DataFrame(schema={**CANDIDATE_SCHEMA, "selected": pl.Boolean})
    )
    _write_parquet_atomic(slides_df, out / f"slides{suffix}.parquet")
    _write_parquet_atomic(cand_df.drop("col", "row"), out / f"candidates{suffix}.parquet")
    _write_parquet_atomic(tiles, out / f"tiles{suffix}.parquet")
    for sid, cand in candidates.items():
        qc.write_slide_qc(work / "detect", sid, cand, infos[sid], out / "qc" / f"{sid}.png")
    if not keep_staging:
        for sid in candidates:
            for ext in (".bin", ".parquet"):
                (work / "staging" / f"{sid}{ext}").unlink(missing_ok=True)
    failed = slides_df.filter(pl.col("status") != "ok")["slide_id"].to_list()
    result = TileResult(
        out=out,
        n_slides=slides_df.height,
        failed=failed,
        n_candidates=cand_df.height,
        n_tiles=tiles.height,
        n_shards=tiles["shard"].n_unique() if tiles.height else 0,
        seconds=seconds,
        stratum_quotas=stratum_totals,
    )
    from .report import write_tile_report

    write_tile_report(out / f"report{suffix}.md", result, slides_df, tiles, cfg, workers)
    return result


def _detect_ok(work: Path, slide: dict) -> bool:
    """Detection of this slide finished and was made from the file as it is now (size, mtime)."""
    p = work / "detect" / f"{slide['slide_id']}.json"
    if not p.exists() or not (work / "detect" / f"{slide['slide_id']}.parquet").exists():
        return False
    info = json.loads(p.read_text())
    try:
        same_file = info.get("file") == file_identity(slide["path"])
    except OSError:
        return False
    return info.get("status") == "ok" and same_file


def _summary_only(out: Path, mine: list[dict], work: Path, seconds: dict) -> TileResult:
    failed = []
    n_cand = 0
    for r in mine:
        info = json.loads((work / "detect" / f"{r['slide_id']}.json").read_text())
        if info["status"] != "ok":
            failed.append(r["slide_id"])
        else:
            n_cand += info["n_candidates"]
    return TileResult(out, len(mine), failed, n_cand, 0, 0, seconds, {})


def merge_parts(out: str | Path) -> dict[str, int]:
    """Join the ``*-partXXXXofYYYY.parquet`` tables of a split run into the unified tables.

    Checks that every part is present and that no tile key appears twice.
    """
    out = Path(out)
    counts = {}
    for table in ("slides", "candidates", "tiles"):
        files = sorted(out.glob(f"{table}-part*of*.parquet"))
        if not files:
            raise RuntimeError(f"{out}: no {table}-part*.parquet files to merge")
        total = int(files[0].stem.split("of")[-1])
        if len(files) != total:
            raise RuntimeError(f"{out}: {len(files)} of {total} parts of {table} present")
        df = pl.concat([pl.read_parquet(f) for f in files], how="vertical")
        key = "slide_id" if table == "slides" else "key"
        dup = df.filter(pl.col(key).is_duplicated())
        if dup.height:
            raise RuntimeError(f"{out}: duplicate {key}s across parts, e.g. {dup[key][:3].to_list()}")
        _write_parquet_atomic(df.sort(key), out / f"{table}.parquet")
        counts[table] = df.height
    return counts
