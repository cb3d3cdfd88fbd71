"""The HTML run report, rendered in a real headless Chromium (Debian's `chromium`; .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from cytosyn_data.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def chromium(*args: str, timeout: int = 120) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--allow-file-access-from-files", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, cmu_slide, tcga_slide, broken_slide):
    from conftest import tile_two_slides

    run = tmp_path_factory.mktemp("report")
    tile_two_slides(run, cmu_slide, tcga_slide, "40")
    assert main(["split", "--run", str(run), "--guidance-tiles", "4", "--val-in-fraction", "0.1"]) == 0
    return run


def test_report_page_lists_every_slide_and_fate(split_run):
    page = (split_run / "report" / "index.html").read_text()
    slides = pl.read_parquet(split_run / "slides.parquet")
    assert f'<span id="n-slides">{slides.height}</span>' in page
    table = (split_run / "report" / "slides.js").read_text()
    for sid in slides["slide_id"]:
        assert f'"{sid}"' in table and f'img/{sid}.jpg' in (split_run / "report" / "slides" / f"{sid}.html").read_text()
        assert (split_run / "report" / "img" / f"{sid}.jpg").stat().st_size > 10_000
    import cv2

    pic = cv2.imread(str(split_run / "report" / "img" / f"{slides['slide_id'][0]}.jpg"))
    assert max(pic.shape[:2]) >= 1024
    assert "train" in page and "val_in" in page and "split leakage audit" in page
    assert 'img/tiles_per_tss.png' in page and 'img/qc.png' in page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(split_run, tmp_path):
    url = (split_run / "report" / "index.html").as_uri()
    dom = chromium("--dump-dom", url)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert int(loaded.group(1)) == int(loaded.group(2)) >= 2  # the plots (and the curation sheets)
    n_slides = pl.read_parquet(split_run / "slides.parquet").height
    assert re.search(rf'<span id="n-slides">{n_slides}</span>', dom)
    assert f'data-table="{n_slides}:slide_id:asc"' in dom
    sid = pl.read_parquet(split_run / "slides.parquet")["slide_id"][0]
    one = chromium("--dump-dom", (split_run / "report" / "slides" / f"{sid}.html").as_uri())
    assert 'data-images-loaded="1/1"' in one and f'src="../img/{sid}.jpg"' in one  # its picture loaded
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert shot.stat().st_size > 50_000
    DOCS_IMG.mkdir(exist_ok=True)
    shutil.copyfile(shot, tmp_path / "kept.png")  # the docs' screenshot is made the same way (docs/tiling.md)


def test_report_of_a_failed_slide_names_the_cause(tmp_path, cmu_slide, broken_slide):
    assert main(["tile", "--slides", str(cmu_slide), str(broken_slide), "--out", str(tmp_path), "--tiles", "5"]) == 1
    page = (tmp_path / "report" / "index.html").read_text()
    assert "cannot open slide" in page and '<span id="n-slides">2</span>' in page


def _render_counts(page: Path) -> tuple[int, int]:
    dom = chromium("--dump-dom", page.as_uri())
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    return int(loaded.group(1)), int(loaded.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_train_and_eval_pages_render_with_every_picture(tmp_path):
    import json

    import numpy as np

    from cytosyn_model.grid import save_grid
    from cytosyn_model.html_pages import write_eval_page, write_train_page

    run = tmp_path / "train"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)
    rng = np.random.default_rng(0)
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "denoise": 1.0 / s, "l1": 0.5 / s, "kl": 3.0, "disc": -0.1})
                                             for s in range(1, 11)))
    for step in (5, 10):
        save_grid(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), run / "samples" / f"step_{step:07d}.png")
    page = write_train_page(run)
    assert _render_counts(page) == (3, 3)  # the loss curves and two sample grids
    assert '<span id="n-checkpoints">1</span>' in page.read_text()

    ev = tmp_path / "eval"
    ev.mkdir()
    pl.DataFrame({"metric": ["fd", "fld", "precision", "recall"], "extractor": ["uni"] * 4, "set": ["gen"] * 4,
                  "reference": ["real"] * 4, "value": [12.5, 3.1, 0.8, 0.7], "std": [0.4, None, None, None]}
                 ).write_parquet(ev / "metrics.parquet")
    save_grid(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), ev / "grid.png")
    page = write_eval_page(ev)
    assert _render_counts(page) == (1, 1) and "12.5000" in page.read_text() and "FLD" in page.read_text()


def test_a_missing_picture_source_never_fails_the_split(tmp_path, cmu_slide, capsys):
    """The split's work done, the run's page re-rendered: a slide whose detection pictures are gone
    gets a placeholder and a warning; the split succeeds and its outputs stand."""
    import polars as pl

    from cytosyn_data.cli import main

    run = tmp_path / "run"
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(run), "--tiles", "12"]) == 0
    for suffix in (".view.jpg", ".mask.png", ".thumb.png"):
        (run / "work" / "detect" / f"cmu-1-small-region{suffix}").unlink()
    capsys.readouterr()
    assert main(["split", "--run", str(run), "--val-out-fraction", "0", "--guidance-tiles", "2", "--shard-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: the pictures of 1 slide(s) not drawn (first: cmu-1-small-region: FileNotFoundError" in err
    assert pl.read_parquet(run / "splits.parquet").height == 12
    page = (run / "report" / "index.html").read_text()
    slide_page = (run / "report" / "slides" / "cmu-1-small-region.html").read_text()
    assert "picture unavailable" in slide_page and not (run / "report" / "img" / "cmu-1-small-region.jpg").exists()
    assert "cmu-1-small-region" in (run / "report" / "slides.js").read_text() and "n-slides" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_the_report_of_2000_slides_sorts_filters_pages_and_redraws_only_changed_slides(tmp_path):
    """A synthetic 2,000-slide run: the index's slide table sorts, filters and pages in Chromium;
    a re-run draws again only the slide whose fates changed."""
    from cytosyn_data.reports.html import write_report
    from cytosyn_data.run.synthetic import make_run

    run = make_run(tmp_path / "run", 2000 * 3, tiles_per_slide=3, shard_size=6000, pictures=12)
    slides = pl.read_parquet(run / "slides.parquet")
    failed, warned = slides["slide_id"][100:103].to_list(), slides["slide_id"][200:205].to_list()
    slides = slides.with_columns(
        status=pl.when(pl.col("slide_id").is_in(failed)).then(pl.lit("failed")).otherwise("status"),
        qc_warning=pl.when(pl.col("slide_id").is_in(warned)).then(pl.lit("tissue mask covers 97%")).otherwise("qc_warning"))
    slides.write_parquet(run / "slides.parquet")
    first = write_report(run)
    assert (first.drawn, first.reused) == (12, 0) and first.missing == 2000 - 12 - 3
    url = first.path.as_uri()
    dom = chromium("--dump-dom", url)
    assert 'data-table="2000:slide_id:asc"' in dom and dom.count("<tr><td><a href=\"slides/") == 100  # a page of 100
    last = max(slides["slide_id"])
    dom = chromium("--dump-dom", url + "#sort=slide_id:desc")
    assert 'data-table="2000:slide_id:desc"' in dom and dom.index(f">{last}</a>") < dom.index("</tbody>")
    dom = chromium("--dump-dom", url + "#q=tcga-p3")  # the filter matches slide, TSS and project, any case
    assert f'data-table="{slides.filter(pl.col("project") == "TCGA-P3").height}:' in dom
    assert 'data-table="3:' in chromium("--dump-dom", url + "#show=failed")
    assert 'data-table="5:' in chromium("--dump-dom", url + "#show=warnings")
    assert '<span id="slide-page">3 / 20</span>' in chromium("--dump-dom", url + "#page=2")
    pictures = {p.name: p.stat().st_mtime_ns for p in (run / "report" / "img").glob("*.jpg")}
    tiles = pl.read_parquet(run / "tiles.parquet")
    changed = slides["slide_id"][5]
    key = tiles.filter(pl.col("slide_id") == changed)["key"][0]
    pl.DataFrame({"key": [key], "keep": [False]}).write_parquet(run / "curation.parquet")  # one tile removed
    second = write_report(run)
    assert (second.drawn, second.reused) == (1, 11)
    now = {p.name: p.stat().st_mtime_ns for p in (run / "report" / "img").glob("*.jpg")}
    assert [n for n in now if now[n] != pictures[n]] == [f"{changed}.jpg"]
