"""`cytosyn-data report`: a static HTML report of a run, ``RUN/report/`` (works from disk), usable at
10,000 slides.

- ``index.html``: the run's summary, plots (tiles per TSS and fate, the tiles' QC distributions), a
  slide table (status, tiles by fate, tissue-mask warnings, errors) that sorts, filters and pages in
  the browser from ``slides.js`` (state in the address: ``#sort=n_selected:desc&q=TCGA-A&show=failed``),
  tiles per TSS and fate, the failed slides, the curation contact sheets and the split audit.
- ``slides/{slide_id}.html``: one page per slide with its picture, tiles by fate and facts.
- ``img/{slide_id}.jpg``: the slide at least 1024 px on its long side (``work/detect/{slide_id}.view.jpg``)
  with the tissue contour (green), pen ink (magenta tint) and every candidate tile box coloured by its
  fate (:func:`geojson.tile_fates`, for a batch of slides at a time). ``img/pictures.json`` records
  what each picture was drawn from: a re-run draws only the slides whose fates or detection files
  changed. A picture that cannot be drawn is a warning and a note on its page, never a failure.

Written at the end of tile, curate and split; ``body[data-images-loaded]`` says how many pictures
the browser loaded, ``body[data-table]`` what the slide table shows (the Chromium tests).
"""

from __future__ import annotations

import html
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from cytosyn_data.core.errors import DataError
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.png import decode_png
from cytosyn_data.reports.geojson import COLOURS, fates_by_slide, tissue_polygons
from cytosyn_data.reports.guard import never_fail
from cytosyn_data.reports.qc_pictures import draw_boxes
from cytosyn_data.reports.site import TABLE_SCRIPT, PictureCache, slide_page, slides_js
from cytosyn_data.run.paths import DetectFiles
from cytosyn_data.run.schemas import NULL_STRATUM, VIEW_SIDE
from cytosyn_data.wsi.tissue import pen_mask

FATES = ("train", "val_in", "val_out", "guidance", "removed", "tile", "candidate")


def slide_picture(run: Path, slide: dict, fates: pl.DataFrame) -> np.ndarray:
    """RGB picture of one slide: the view image, non-tissue dimmed, pen ink tinted, tissue contour and
    tile boxes by fate. Coordinates are level-0 pixels scaled to the picture."""
    sid, w0 = slide["slide_id"], int(slide["width"])
    files = DetectFiles.of_run(run, sid)
    img = cv2.cvtColor(cv2.imread(str(files.view)), cv2.COLOR_BGR2RGB) if files.view.exists() else decode_png(
        files.thumb.read_bytes())
    if max(img.shape[:2]) < VIEW_SIDE:  # a run made before view pictures: enlarge the thumbnail
        f = VIEW_SIDE / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
    mask = decode_png(files.mask.read_bytes())[..., 0] > 127
    big = cv2.resize(mask.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    out = img.astype(np.float32)
    out[~big] = out[~big] * 0.55 + 100
    ink = pen_mask(img)
    out[ink] = out[ink] * 0.4 + np.array([255, 0, 255], np.float32) * 0.6
    out = out.clip(0, 255).astype(np.uint8)
    s = img.shape[1] / w0
    rings = [np.round(np.array(r) * s).astype(np.int32) for poly in tissue_polygons(mask, w0) for r in poly]
    cv2.polylines(out, rings, True, COLOURS["tissue"], 2)
    for fate in reversed(FATES):  # candidates first, splits on top
        t = fates.filter(pl.col("fate") == fate)
        x0, y0 = (t["x0"].to_numpy() * s).astype(np.int64), (t["y0"].to_numpy() * s).astype(np.int64)
        x1 = np.maximum(x0 + 1, ((t["x0"] + t["side"]).to_numpy() * s).astype(np.int64) - 1)
        y1 = np.maximum(y0 + 1, ((t["y0"] + t["side"]).to_numpy() * s).astype(np.int64) - 1)
        draw_boxes(out, x0, y0, x1, y1, COLOURS[fate], 1 if fate == "candidate" else 2)
    return out


def html_table(df: pl.DataFrame, fmt: str = "{:.3g}") -> str:
    """A polars table as HTML (None as an empty cell, floats with ``fmt``)."""
    def cell(v) -> str:
        if v is None:
            return ""
        return html.escape(fmt.format(v) if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _legend() -> str:
    names = {"train": "train", "val_in": "val_in", "val_out": "val_out", "guidance": "guidance",
             "removed": "removed (curation / QC)", "tile": "written (no split yet)", "candidate": "unselected candidate",
             "tissue": "tissue contour"}
    return "".join(f'<span class="key"><i style="background:rgb{COLOURS[k]}"></i>{v}</span>' for k, v in names.items()) + \
        '<span class="key"><i style="background:rgb(255,0,255)"></i>pen ink</span>'


def _summary_tables(slides: pl.DataFrame, per_fate: pl.DataFrame, max_failed: int = 100) -> str:
    """Tiles per TSS and fate; the failed slides (the first ``max_failed``; the table shows all)."""
    pivot = per_fate.pivot(on="fate", index="tss", values="len").fill_null(0).sort("tss") if per_fate.height else per_fate
    parts = ["<h2>Tiles per TSS and fate</h2>", html_table(pivot)]
    failed = slides.filter(pl.col("status") != "ok").select("slide_id", "error")
    more = f"<p>and {failed.height - max_failed} more (choose 'failed' in the slide table)</p>" if failed.height > max_failed else ""
    parts += ["<h2>Failed slides</h2>", (html_table(failed.head(max_failed)) + more) if failed.height else "<p>none</p>"]
    return "\n".join(parts)


def _extras(run: Path, img_dir: Path) -> str:
    """Curation contact sheets and the split audit, when the run has them."""
    parts = []
    sheets = [p for p in (run / "curate" / "top_artifacts.png", run / "curate" / "kept_highest_scores.png") if p.exists()]
    if sheets:
        parts.append("<h2>Curation</h2>")
        for p in sheets:
            shutil.copyfile(p, img_dir / f"curation-{p.name}")
            what = "removed: the highest artifact scores" if p.stem == "top_artifacts" else "kept: the highest scores below the threshold"
            parts.append(f'<figure><a href="img/curation-{p.name}"><img src="img/curation-{p.name}" alt="{p.stem}"></a>'
                         f"<figcaption>{what} (mean fold probability, key)</figcaption></figure>")
    for name in ("curate/report.md", "splits/audit.md"):
        if (run / name).exists():
            parts += [f"<h2>{html.escape(name)}</h2>", f"<pre>{html.escape((run / name).read_text())}</pre>"]
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}figure{margin:1em 0}
img{max-width:100%;border:1px solid #999}.key{margin-right:1.2em;white-space:nowrap}
.key i{display:inline-block;width:1em;height:1em;margin-right:.3em;vertical-align:middle}pre{background:#f6f6f6;padding:.5em}"""

SCRIPT = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-loaded',ok+'/'+im.length);});</script>"""


def html_page(title: str, body: str) -> str:
    """A static page with the report style and the image-load check (``body[data-images-loaded]``)."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n{SCRIPT}</body></html>")


@dataclass(frozen=True)
class ReportResult:
    """Where the report is, and how many slide pictures were drawn, reused from an earlier report,
    or left out (their detection pictures missing: a warning says why)."""

    path: Path
    drawn: int
    reused: int
    missing: int


def write_report(run: str | Path) -> ReportResult:
    """Write ``RUN/report/``: ``index.html`` (summary, plots, the slide table), ``slides/{slide_id}.html``
    and the pictures under ``img/`` (each drawn again only when its slide changed)."""
    run = Path(run)
    for need in ("slides.parquet", "tiles.parquet", "candidates.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    out = run / "report"
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "slides").mkdir(exist_ok=True)
    slides = pl.read_parquet(run / "slides.parquet").sort("slide_id")
    cache, tally = PictureCache(out / "img"), {"drawn": 0, "reused": 0, "missing": []}
    counts, fate_rows, tss = {}, [], slides.select("slide_id", tss=pl.col("tss").fill_null(NULL_STRATUM))
    for slide, fates in fates_by_slide(run, slides):  # a batch of slides at a time
        counts[slide["slide_id"]] = dict(fates.group_by("fate").len().iter_rows())
        pictured = _slide_picture_cached(run, slide, fates, out / "img", cache, tally)
        _write_if_changed(out / "slides" / f"{slide['slide_id']}.html",
                          html_page(slide["slide_id"], slide_page(slide, counts[slide["slide_id"]], pictured)))
        fate_rows.append(fates.filter(pl.col("fate") != "candidate").join(tss, on="slide_id").group_by("tss", "fate").len())
    for slide in slides.filter(pl.col("status") != "ok").iter_rows(named=True):  # failed: a page with the cause
        _write_if_changed(out / "slides" / f"{slide['slide_id']}.html", html_page(slide["slide_id"], slide_page(slide, {}, False)))
    cache.save()
    if tally["missing"]:
        sid, cause = tally["missing"][0]
        print(f"warning: the pictures of {len(tally['missing'])} slide(s) not drawn (first: {sid}: {cause}); "
              "their pages say so; the stage's data outputs stand", file=sys.stderr)
    per_fate = (pl.concat(fate_rows).group_by("tss", "fate").agg(pl.col("len").sum()) if fate_rows
                else pl.DataFrame(schema={"tss": pl.String, "fate": pl.String, "len": pl.UInt32}))
    atomic_write_bytes(out / "slides.js", slides_js(_table_rows(slides, counts)), durable=False)
    plots = never_fail("report plots", _plots, run, per_fate, out / "img") or []
    page = _index(run, slides, per_fate, counts, plots)
    atomic_write_bytes(out / "index.html", page.encode(), durable=False)
    return ReportResult(out / "index.html", tally["drawn"], tally["reused"], len(tally["missing"]))


def _slide_picture_cached(run: Path, slide: dict, fates: pl.DataFrame, img_dir: Path, cache: PictureCache,
                          tally: dict) -> bool:
    """Draw ``img/{slide_id}.jpg`` unless the cached one is current; False when it cannot be drawn."""
    sid = slide["slide_id"]
    path, digest = img_dir / f"{sid}.jpg", PictureCache.digest(run, sid, fates)
    if cache.current(sid, digest, path):
        cache.new[sid] = digest
        tally["reused"] += 1
        return True
    try:
        pic = slide_picture(run, slide, fates)
    except Exception as exc:  # noqa: BLE001 - a picture never fails a stage: the page says it is missing
        path.unlink(missing_ok=True)  # no stale picture of an earlier run under this slide's name
        tally["missing"].append((sid, f"{type(exc).__name__}: {exc}"))
        return False
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(pic, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    atomic_write_bytes(path, jpg.tobytes(), durable=False)
    cache.new[sid] = digest
    tally["drawn"] += 1
    return True


def _write_if_changed(path: Path, text: str) -> None:
    data = text.encode()
    if not path.exists() or path.read_bytes() != data:
        atomic_write_bytes(path, data, durable=False)


def _table_rows(slides: pl.DataFrame, counts: dict[str, dict[str, int]]) -> list[dict]:
    rows = []
    for r in slides.iter_rows(named=True):
        c = counts.get(r["slide_id"], {})
        rows.append({**r, "tiles": sum(n for f, n in c.items() if f != "candidate"),
                     **{f: c.get(f, 0) for f in ("train", "val_in", "val_out", "removed")}})
    return rows


def _plots(run: Path, per_fate: pl.DataFrame, img_dir: Path) -> list[str]:
    """``img/tiles_per_tss.png`` (the 30 TSS with most tiles, by fate) and ``img/qc.png`` (the
    tiles' QC measures, binned by a streaming aggregation over tiles.parquet); returns the names."""
    import matplotlib  # here: the headless backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    names = []
    if per_fate.height:
        pivot = per_fate.pivot(on="fate", index="tss", values="len").fill_null(0)
        fates = [f for f in FATES if f in pivot.columns]
        top = pivot.with_columns(total=pl.sum_horizontal(fates)).sort("total", descending=True).head(30)
        fig, ax = plt.subplots(figsize=(10, 3.5))
        bottom = np.zeros(top.height)
        for f in fates:
            ax.bar(top["tss"].to_list(), top[f].to_numpy(), bottom=bottom, label=f, color=np.array(COLOURS[f]) / 255)
            bottom += top[f].to_numpy()
        ax.set_ylabel("tiles"), ax.set_title("tiles per TSS (the 30 largest) and fate"), ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        fig.tight_layout(), fig.savefig(img_dir / "tiles_per_tss.png", dpi=90), plt.close(fig)
        names.append("tiles_per_tss.png")
    qc = [c for c in ("qc_tissue", "qc_blur", "qc_pen", "qc_brightness") if c in pl.read_parquet_schema(run / "tiles.parquet")]
    if qc:
        fig, axes = plt.subplots(1, len(qc), figsize=(3 * len(qc), 2.6))
        for ax, col in zip(np.atleast_1d(axes), qc):
            centres, n = _histogram(run / "tiles.parquet", col)
            ax.bar(centres, n, width=(centres[1] - centres[0]) if len(centres) > 1 else 1.0, color="#4a7ab0")
            ax.set_title(col, fontsize=9), ax.tick_params(labelsize=7)
        fig.tight_layout(), fig.savefig(img_dir / "qc.png", dpi=90), plt.close(fig)
        names.append("qc.png")
    return names


def _histogram(path: Path, col: str, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and counts of a tiles.parquet column, aggregated while streaming (bounded memory)."""
    lo, hi = pl.scan_parquet(path).select(pl.col(col).min().alias("lo"), pl.col(col).max().alias("hi")).collect().row(0)
    if lo is None or hi is None:
        return np.zeros(0), np.zeros(0)
    width = (hi - lo) / bins or 1.0
    agg = (pl.scan_parquet(path).select(b=((pl.col(col) - lo) / width).floor().clip(0, bins - 1).cast(pl.Int32))
           .group_by("b").len().collect())
    n = np.zeros(bins)
    n[agg["b"].to_numpy()] = agg["len"].to_numpy()
    return lo + (np.arange(bins) + 0.5) * width, n


def _index(run: Path, slides: pl.DataFrame, per_fate: pl.DataFrame, counts: dict, plots: list[str]) -> str:
    n_ok = slides.filter(pl.col("status") == "ok").height
    n_tiles = sum(n for c in counts.values() for f, n in c.items() if f != "candidate")
    n_cand = sum(sum(c.values()) for c in counts.values())
    n_warn = slides.filter(pl.col("qc_warning").is_not_null()).height if "qc_warning" in slides.columns else 0
    figures = "".join(f'<figure><img src="img/{p}" alt="{p}"></figure>' for p in plots)
    controls = ('<p><input id="slide-q" placeholder="filter: slide, TSS, project"> <select id="slide-show">'
                '<option value="all">all slides</option><option value="failed">failed</option>'
                '<option value="warnings">tissue-mask warnings</option></select> <span id="slide-count"></span> '
                'slides; page <span id="slide-page"></span> <button id="prev">&lt;</button><button id="next">&gt;'
                "</button> (click a column to sort; each slide links to its page and picture)</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cytosyn run {html.escape(run.name)}</title>
<style>{STYLE}</style></head><body>
<h1>cytosyn run <code>{html.escape(str(run))}</code></h1>
<p>slides: <span id="n-slides">{slides.height}</span> ({n_ok} ok, {slides.height - n_ok} failed, {n_warn} with a
tissue-mask warning); tiles written: <span id="n-tiles">{n_tiles}</span>; candidates: {n_cand}</p>
<p>{_legend()}</p>
{figures}
<h2>Slides</h2>
{controls}
<table id="slide-table"><thead id="slide-head"></thead><tbody id="slide-rows"></tbody></table>
{_summary_tables(slides, per_fate)}
{_extras(run, run / "report" / "img")}
{SCRIPT}{TABLE_SCRIPT}</body></html>"""
