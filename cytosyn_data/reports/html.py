"""`cytosyn-data report`: a static HTML page of a run, ``RUN/report/index.html`` (works from disk).

Per slide, a picture at least 1024 px on its long side (``work/detect/{slide_id}.view.jpg``, made at
detection) with the tissue contour (green), the pen-ink mask (magenta tint) and every candidate tile
box coloured by its fate (:func:`geojson.tile_fates`, computed for a batch of slides at a time: train, val_in, val_out, guidance, removed,
written-not-split, unselected candidate); the browser zooms it (each picture links to itself at full
size). Tables: slides, tiles per TSS and per split, failed slides with their causes; the curation
contact sheets and the split audit when the run has them. Written at the end of tile, curate and
split; ``body[data-images-loaded]`` says how many pictures the browser loaded (the Chromium test).
"""

from __future__ import annotations

import html
import shutil
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


def _summary_tables(slides: pl.DataFrame, per_fate: pl.DataFrame) -> str:
    cols = [c for c in ("slide_id", "status", "vendor", "mpp", "mpp_source", "tss", "n_candidates", "n_selected")
            if c in slides.columns]
    parts = ["<h2>Slides</h2>", html_table(slides.select(cols))]
    pivot = per_fate.pivot(on="fate", index="tss", values="len").fill_null(0).sort("tss") if per_fate.height else per_fate
    parts += ["<h2>Tiles per TSS and fate</h2>", html_table(pivot)]
    failed = slides.filter(pl.col("status") != "ok").select("slide_id", "error")
    parts += ["<h2>Failed slides</h2>", html_table(failed) if failed.height else "<p>none</p>"]
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


def _write_picture(run: Path, slide: dict, fates: pl.DataFrame, path: Path) -> bool:
    pic = slide_picture(run, slide, fates)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(pic, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    atomic_write_bytes(path, jpg.tobytes(), durable=False)
    return True


def write_report(run: str | Path) -> Path:
    """Write ``RUN/report/index.html`` and its pictures; returns the page's path."""
    run = Path(run)
    for need in ("slides.parquet", "tiles.parquet", "candidates.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    img_dir = run / "report" / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    slides = pl.read_parquet(run / "slides.parquet").sort("slide_id")
    figures, counts, n_tiles, n_cand = [], [], 0, 0
    tss = slides.select("slide_id", tss=pl.col("tss").fill_null(NULL_STRATUM))
    for slide, fates in fates_by_slide(run, slides):  # a batch of slides at a time
        sid = slide["slide_id"]
        drawn = never_fail(f"report picture of slide {sid}", _write_picture, run, slide, fates, img_dir / f"{sid}.jpg")
        if not drawn:  # no stale picture of an earlier run under this slide's name
            (img_dir / f"{sid}.jpg").unlink(missing_ok=True)
        n = fates.group_by("fate").len().sort("fate")
        written = fates.filter(pl.col("fate") != "candidate")
        counts.append(written.join(tss, on="slide_id").group_by("tss", "fate").len())
        n_tiles, n_cand = n_tiles + written.height, n_cand + fates.height
        caption = f'<figcaption><b>{html.escape(sid)}</b>: {", ".join(f"{f} {c}" for f, c in n.iter_rows())}</figcaption>'
        figures.append(f'<figure><a href="img/{html.escape(sid)}.jpg"><img src="img/{html.escape(sid)}.jpg" '
                       f'alt="{html.escape(sid)}"></a>{caption}</figure>' if drawn else
                       f'<figure><p class="missing">picture unavailable (see the warning of the run)</p>{caption}</figure>')
    per_fate = (pl.concat(counts).group_by("tss", "fate").agg(pl.col("len").sum()) if counts
                else pl.DataFrame(schema={"tss": pl.String, "fate": pl.String, "len": pl.UInt32}))
    n_ok = slides.filter(pl.col("status") == "ok").height
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cytosyn run {html.escape(run.name)}</title>
<style>{STYLE}</style></head><body>
<h1>cytosyn run <code>{html.escape(str(run))}</code></h1>
<p>slides: <span id="n-slides">{slides.height}</span> ({n_ok} ok, {slides.height - n_ok} failed); tiles written:
<span id="n-tiles">{n_tiles}</span>; candidates: {n_cand}</p>
<p>{_legend()}</p>
{_summary_tables(slides, per_fate)}
<h2>Slides with their tiles</h2>
{''.join(figures)}
{_extras(run, img_dir)}
{SCRIPT}</body></html>"""
    path = run / "report" / "index.html"
    atomic_write_bytes(path, page.encode(), durable=False)
    return path
