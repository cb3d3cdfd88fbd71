"""`cytosyn-data tile`: slides -> tissue candidates -> stratified selection -> PNG shards.

:func:`run_tile` is a pure function over explicit inputs (slide table, config, output folder).
Two kinds of work unit run on a backend of :mod:`cytosyn_data.core.executors` (this process, a
local process pool, or a Dask cluster):

1. detect, one unit per slide (:mod:`.detect`) -> ``work/detect/{slide_id}.*``;
2. write, one unit per shard (:mod:`.plan` cuts the selected tiles into shards, :mod:`.write`
   streams each through the kernel of :mod:`.render` straight into its tar: each PNG is written
   once, shards are written in parallel, and a large slide is spread over several units).

Every output appears by atomic rename; a re-run skips slides and shards that are current and
rewrites the others; a killed run (or a lost Dask worker) leaves only temporary files. Work
can also be split across independent jobs with ``shard_index/num_shards`` and joined with
``cytosyn-data merge`` (:mod:`.merge`). The settings are :class:`.config.TileConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from cytosyn_data.core.errors import DataError, UsageError
from cytosyn_data.core.executors import ClusterSpec, open_executor
from cytosyn_data.io.atomic import remove_stale_tmp, tmp_path, write_parquet_atomic
from cytosyn_data.io.coords_h5 import coords_file
from cytosyn_data.io.remote import SlideCache, is_url, localized
from cytosyn_data.reports import qc_pictures as qc
from cytosyn_data.reports.guard import never_fail
from cytosyn_data.reports.html import write_report
from cytosyn_data.reports.markdown import write_tile_report
from cytosyn_data.run.paths import DetectFiles, detect_dir
from cytosyn_data.run.records import SlideFacts, load_facts, tissue_warning
from cytosyn_data.run.schemas import CANDIDATE_SCHEMA, SLIDES_SCHEMA
from cytosyn_data.run.state import RunLock, check_run_file, file_identity
from cytosyn_data.tile.config import TileConfig
from cytosyn_data.tile.detect import detect_ok, detect_slide
from cytosyn_data.tile.plan import (
    TILES_SCHEMA,
    select_candidates,
    shard_cuts,
    shard_units,
    slide_digest,
    slide_plan_rows,
    slide_quotas,
)
from cytosyn_data.tile.write import write_shard
from cytosyn_data.wsi.regions import region_file


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
    backend: str = ""
    downloaded: int = 0  # bytes of remote slides fetched into the cache

    @property
    def ok(self) -> bool:
        return not self.failed


# ------------------------------------------------------------------- orchestration
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
    overwrite: bool = False,
    cluster: ClusterSpec | None = None,
    cache_dir: str | Path | None = None,
    cache_bytes: int = 50 * 2**30,
    include_regions: str | Path | None = None,
    exclude_regions: str | Path | None = None,
    coords: str | Path | None = None,
    region_class: str | None = None,
) -> TileResult:
    """Run the tile stage for the slide table ``slides`` (see slide_table.build_slide_table).

    ``out/run.json`` records the settings and the slide list: a re-run with other ones is refused
    (:class:`RunStateError` naming the changes) unless ``overwrite`` clears the folder first. A slide
    whose file changed in place (size, mtime), or that failed before, is detected anew, and every
    shard whose plan changes is rewritten. The folder is locked while the run lasts (one lock per
    ``shard_index``).

    ``workers``: processes of the local pool; ``cluster`` runs the units on Dask instead (the
    output bytes do not depend on either). ``stage``: ``detect`` (phase 1 only), ``extract``
    (detection of every slide must exist) or ``all``. With ``num_shards > 1`` this job handles
    slides ``index % num_shards == shard_index`` and names its shards and tables with a part
    suffix; ``cytosyn-data merge`` joins the parts.

    Slides at fsspec URLs (``s3://...``) are copied into ``cache_dir`` (default ``out/work/slide-cache``),
    at most ``cache_bytes`` beyond the slides in use, the next ones downloading meanwhile; the shards
    equal those of the same files tiled locally.

    ``include_regions`` / ``exclude_regions``: folders of ``{slide_id}.geojson`` region files (QuPath
    annotations, level-0 pixels) that restrict tissue to, or remove it from, their polygons
    (:mod:`regions`); the files are inputs of the run (a changed one is a changed run); only QuPath
    annotations are regions, and with ``region_class`` only those of that classification. ``coords``:
    a folder of TRIDENT/CLAM coordinates files (:mod:`coords_h5`): exactly those tiles are written
    (``cfg.tiles`` must be None: no budget, no tissue threshold).
    """
    if coords is not None and cfg.tiles is not None:
        raise UsageError("--coords tiles exactly the given coordinates: give --tiles all (no budget)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = cluster or ClusterSpec("local", workers=workers)
    with RunLock(out, f".lock{_part_suffix(shard_index, num_shards)}"):
        rows = slides.to_dicts()
        regions = {r["slide_id"]: {"include_regions": region_file(include_regions, r["slide_id"]),
                                   "exclude_regions": region_file(exclude_regions, r["slide_id"]),
                                   "coords": coords_file(coords, r["slide_id"], r["path"]),
                                   **({"region_class": region_class} if region_class else {})} for r in rows}
        inputs = [f"{r['slide_id']}\t{r['path']}\tmpp={r['mpp_override']}" + "".join(
            f"\t{k}={file_identity(v) if k != 'region_class' and v and Path(v).exists() else v}"
            for k, v in regions[r["slide_id"]].items())
            for r in rows]
        fetch = {r["path"]: r.get("fetch_url") or r["path"] for r in rows}  # recorded form -> the URL to fetch
        files = {r["slide_id"]: _identity_or_cause(fetch[r["path"]]) for r in rows}
        check_run_file(out, "tile", {"config": cfg.fingerprint()}, inputs, overwrite, lambda: clear_tile_outputs(out),
                       recorded={"slide_files": files})
        remote = any(is_url(p) for p in slides["path"])
        cache = SlideCache(cache_dir or out / "work" / "slide-cache", cache_bytes) if remote else None
        with open_executor(spec, warm=("cytosyn_data.tile.write", "cytosyn_data.tile.detect")) as ex:
            result = _run_tile(slides, out, cfg, _Runner(ex, cache, files, regions, fetch), shard_index, num_shards,
                               stage)
        if stage != "detect":  # the pages, once the workers are let go
            _write_reports(out, result, cfg, shard_index, num_shards)
        return result


def _identity_or_cause(path: str) -> dict | str:
    """The slide file's identity (size and mtime or ETag), or why it cannot be read."""
    try:
        return file_identity(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    except DataError as exc:
        return f"unreadable: {exc}"


@dataclass
class _Runner:
    """Where units run (``ex``), the cache of remote slides and every slide's file identity."""

    ex: object
    cache: SlideCache | None
    files: dict
    regions: dict  # slide_id -> its include_regions / exclude_regions / coords file (or None)
    fetch: dict  # a slide's recorded path (credentials redacted) -> the URL to fetch it with (in memory only)

    @property
    def name(self) -> str:
        return self.ex.name

    def url(self, path: str) -> str:
        """The URL to fetch the slide recorded as ``path`` with (its credentials included)."""
        return self.fetch.get(path, path)

    def sizes(self, rows: list[dict]) -> dict[str, int]:
        """Bytes of each slide's file (0 when it could not be read), keyed by path."""
        idents = {self.url(r["path"]): self.files.get(r["slide_id"]) for r in rows}
        return {path: ident.get("size", 0) if isinstance(ident, dict) else 0 for path, ident in idents.items()}


def clear_tile_outputs(out: Path) -> None:
    """Remove everything a tile run wrote into ``out`` (shards, tables, QC, work files, run.json), and
    the HTML report and exports (GeoJSON, h5) made from it."""
    for sub in ("shards", "work", "qc", "report", "geojson", "h5"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for pattern in ("slides*.parquet", "candidates*.parquet", "tiles*.parquet", "report*.md", "run.json"):
        for p in out.glob(pattern):
            p.unlink()


def _run_tile(slides: pl.DataFrame, out: Path, cfg: TileConfig, ex: "_Runner", shard_index: int, num_shards: int,
              stage: str) -> TileResult:
    work = out / "work"
    remove_stale_tmp(detect_dir(work))
    all_rows = slides.to_dicts()
    mine = [r for i, r in enumerate(all_rows) if i % num_shards == shard_index]
    suffix = _part_suffix(shard_index, num_shards)
    seconds = {"detect": _detect_phase(mine, cfg, work, ex)}
    if stage == "detect":
        return _summary_only(out, mine, work, seconds)
    facts = _load_facts(all_rows, work)
    ok_rows = [r for r in all_rows if facts[r["slide_id"]].ok]
    quota_of, stratum_totals = slide_quotas(ok_rows, facts, cfg.tiles, cfg.seed)

    t = time.perf_counter()
    counts, digests, n_cand = _select_phase(mine, facts, quota_of, cfg, out)
    prefix = f"{cfg.shard_name}{suffix}"
    names = _write_phase(shard_cuts(counts, cfg.seed, cfg.shard_size, prefix), digests, prefix, facts, cfg, out, ex,
                         ex.sizes(all_rows))
    seconds["write"] = time.perf_counter() - t
    n_tiles, n_sel = _concat_tables(out, suffix, names, [r["slide_id"] for r in mine if facts[r["slide_id"]].ok])
    slides_df = _slides_table(mine, facts, n_sel)
    write_parquet_atomic(slides_df, out / f"slides{suffix}.parquet")
    result = TileResult(
        out=out, n_slides=slides_df.height, failed=slides_df.filter(pl.col("status") != "ok")["slide_id"].to_list(),
        n_candidates=n_cand, n_tiles=n_tiles, n_shards=len(names),
        seconds=seconds, stratum_quotas=stratum_totals, backend=ex.name,
        downloaded=ex.cache.downloaded if ex.cache else 0,
    )
    return result


def _write_reports(out: Path, result: TileResult, cfg: TileConfig, shard_index: int, num_shards: int) -> None:
    """``report{suffix}.md`` (the summary) and, for an unsplit run, the HTML report."""
    suffix = _part_suffix(shard_index, num_shards)
    never_fail(f"{out}/report{suffix}.md", write_tile_report, out / f"report{suffix}.md", result,
               pl.read_parquet(out / f"slides{suffix}.parquet"), cfg)
    if num_shards == 1:  # a split run gets its page after `merge` (cytosyn-data report)
        never_fail(f"{out}/report/index.html", write_report, out)


def _detect_phase(mine: list[dict], cfg: TileConfig, work: Path, ex: "_Runner") -> float:
    """Detect every slide of this job whose detection is missing, failed or out of date."""
    t = time.perf_counter()
    todo = [{**r, "file": ex.files[r["slide_id"]], **ex.regions[r["slide_id"]]} for r in mine
            if not detect_ok(work, r, ex.files[r["slide_id"]])]

    def localize(r: dict, local: dict) -> dict:
        got = local.get(ex.url(r["path"]))
        return {**r, "local_path": str(got)} if isinstance(got, Path) else {**r, "fetch_error": got}

    for batch in localized(todo, lambda r: [ex.url(r["path"])], localize, ex.cache, ex.sizes(todo)):
        for facts in ex.ex.map(_detect_unit, [(r, cfg, work) for r in batch], "detect"):
            if not facts.ok:
                tqdm.write(f"FAILED {facts.error}")
            for note in (facts.regions or {}).get("notes", []):
                tqdm.write(f"regions: {note}")
    return time.perf_counter() - t


def _detect_unit(args: tuple) -> SlideFacts:
    return detect_slide(*args)


def _load_facts(all_rows: list[dict], work: Path) -> dict[str, SlideFacts]:
    facts, missing = {}, []
    for r in all_rows:
        p = DetectFiles(detect_dir(work), r["slide_id"]).facts
        if p.exists():
            facts[r["slide_id"]] = load_facts(p)
        else:
            missing.append(r["slide_id"])
    if missing:
        raise RuntimeError(
            f"detection results missing for {len(missing)} slide(s) (e.g. {missing[:3]}); with "
            "--num-shards > 1 run '--stage detect' for every shard index first"
        )
    return facts


def _select_phase(mine: list[dict], facts: dict, quota_of: dict, cfg: TileConfig, out: Path) -> tuple[dict, dict, int]:
    """Per slide, one at a time: the selection (``work/select/{sid}.parquet``, candidates with a
    ``selected`` flag), the plan rows (``{sid}.plan.parquet``) and the QC picture. Returns planned
    tiles and plan digest per slide, and the candidate count: memory is one slide's, not the run's."""
    work = out / "work"
    sel_dir = work / "select"
    remove_stale_tmp(sel_dir)
    counts, digests, n_cand = {}, {}, 0
    for r in tqdm(mine, desc="select", unit="slide", leave=False):
        sid = r["slide_id"]
        if not facts[sid].ok:
            continue
        cand = select_candidates(pl.read_parquet(DetectFiles(detect_dir(work), sid).candidates), sid, quota_of[sid], cfg.seed)
        rows = slide_plan_rows(cand, r, facts[sid], cfg.target_mpp, cfg.resample)
        write_parquet_atomic(cand.drop("col", "row"), sel_dir / f"{sid}.parquet")
        write_parquet_atomic(rows, sel_dir / f"{sid}.plan.parquet")
        counts[sid], digests[sid], n_cand = rows.height, slide_digest(rows), n_cand + cand.height
        never_fail(f"QC picture of slide {sid}", qc.write_slide_qc, DetectFiles(detect_dir(work), sid), cand, facts[sid],
                   out / "qc" / f"{sid}.png")
    return counts, digests, n_cand


def _concat_tables(out: Path, suffix: str, names: list[str], ok_slides: list[str]) -> tuple[int, dict[str, int]]:
    """tiles.parquet from the shards' tables and candidates.parquet from the slides' selections,
    streamed file after file (``sink_parquet``); returns the tile count and tiles per slide."""
    work = out / "work"
    for table, files, schema in (("tiles", [work / "shard_plans" / f"{n}.parquet" for n in names], TILES_SCHEMA),
                                 ("candidates", [work / "select" / f"{s}.parquet" for s in ok_slides],
                                  {k: v for k, v in {**CANDIDATE_SCHEMA, "selected": pl.Boolean}.items()
                                   if k not in ("col", "row")})):
        tmp = tmp_path(out / f"{table}{suffix}.parquet")
        (pl.scan_parquet(files) if files else pl.LazyFrame(schema=schema)).sink_parquet(tmp, statistics=False)
        os.replace(tmp, out / f"{table}{suffix}.parquet")
    per_slide = pl.scan_parquet(out / f"tiles{suffix}.parquet").group_by("slide_id").len().collect()
    return int(per_slide["len"].sum()), dict(per_slide.iter_rows())


def _write_phase(cuts: list, digests: dict, prefix: str, facts: dict, cfg: TileConfig, out: Path, ex: "_Runner",
                 sizes: dict[str, int]) -> list[str]:
    """Write every shard of ``cuts`` (skipping current ones), then rewrite those that held tiles of a
    slide that failed; returns the shard names."""
    dirs = {"shard_dir": out / "shards", "plans_dir": out / "work" / "shard_plans", "select_dir": out / "work" / "select"}
    remove_stale_tmp(dirs["shard_dir"])
    remove_stale_tmp(dirs["plans_dir"])
    names = [n for n, _ in cuts]
    _remove_stale_shards(dirs["shard_dir"], dirs["plans_dir"], names, prefix)
    settings = {k: getattr(cfg, k) for k in ("tile_size", "target_mpp", "resample", "png_encoder")}
    units = shard_units(cuts, facts, settings, digests, dirs)
    failed = _run_units(units, facts, ex, sizes)
    if failed:  # tiles a failed slide left in its other shards go: no shard holds a tile tiles.parquet lacks
        cut = [dataclasses.replace(u, segments=tuple(g for g in u.segments if g[0] not in failed), complete=False)
               for u in units if failed & set(u.slides)]
        _run_units(cut, facts, ex, sizes)
    remove_stale_tmp(dirs["shard_dir"])  # left by a unit whose worker died (Dask ran it again elsewhere)
    remove_stale_tmp(dirs["plans_dir"])
    return names


def _run_units(units: list, facts: dict, ex: "_Runner", sizes: dict[str, int]) -> set[str]:
    """Write ``units`` on the backend (remote slides fetched group by group into the cache); slides
    that failed are marked in ``facts`` and returned."""
    def localize(u, local: dict):
        slides = {sid: i.located(str(local[ex.url(i.path)])) if isinstance(local.get(ex.url(i.path)), Path) else i
                  for sid, i in u.slides.items()}
        return dataclasses.replace(u, slides=slides)

    failed: set[str] = set()
    urls_of = lambda u: [ex.url(i.path) for i in u.slides.values()]  # noqa: E731
    for batch in localized(units, urls_of, localize, ex.cache, sizes):
        for res in ex.ex.map(write_shard, batch, "shards"):
            for sid, err in res["failed"].items():
                tqdm.write(f"FAILED {err}")
                facts[sid] = facts[sid].failed(err)
                failed.add(sid)
    return failed


def _remove_stale_shards(shard_dir: Path, plans: Path, names: list[str], prefix: str) -> None:
    """Delete the shards of ``prefix`` (this job's, part suffix included) and their plan files that
    ``names`` does not list (all of them when the plan is empty)."""
    keep = set(names)
    for p in shard_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if p.name not in keep:
            p.unlink()
            for ext in (".sha256", ".parquet"):
                (plans / f"{p.name}{ext}").unlink(missing_ok=True)


def _slides_table(mine: list[dict], facts: dict, n_sel: dict[str, int]) -> pl.DataFrame:
    rows = []
    for r in mine:
        info = facts[r["slide_id"]].to_json()
        rows.append({
            **{k: info[k] for k in SLIDES_SCHEMA if k in info},
            **{k: r[k] for k in ("tss", "project", "patient", "sample_type", "slide_type")},
            "slide_id": r["slide_id"],
            "path": r["path"],
            "n_candidates": info.get("n_candidates"),
            "n_selected": n_sel.get(r["slide_id"], 0),
            "qc_warning": tissue_warning(info.get("tissue_area_fraction")),
        })
    return pl.DataFrame(rows, schema=SLIDES_SCHEMA)


def _summary_only(out: Path, mine: list[dict], work: Path, seconds: dict) -> TileResult:
    failed = []
    n_cand = 0
    for r in mine:
        facts = load_facts(DetectFiles(detect_dir(work), r["slide_id"]).facts)
        if not facts.ok:
            failed.append(r["slide_id"])
        else:
            n_cand += facts.n_candidates
    return TileResult(out, len(mine), failed, n_cand, 0, 0, seconds, {})
