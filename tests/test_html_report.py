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
    for sid in slides["slide_id"]:
        assert f'img/{sid}.jpg' in page and (split_run / "report" / "img" / f"{sid}.jpg").stat().st_size > 10_000
    import cv2

    pic = cv2.imread(str(split_run / "report" / "img" / f"{slides['slide_id'][0]}.jpg"))
    assert max(pic.shape[:2]) >= 1024
    assert "train" in page and "val_in" in page and "split leakage audit" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(split_run, tmp_path):
    url = (split_run / "report" / "index.html").as_uri()
    dom = chromium("--dump-dom", url)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    n_slides = pl.read_parquet(split_run / "slides.parquet").height
    assert int(loaded.group(1)) == int(loaded.group(2)) == n_slides  # every picture loaded
    assert re.search(rf'<span id="n-slides">{n_slides}</span>', dom)
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
    assert "warning: report picture of slide cmu-1-small-region not written (FileNotFoundError" in err
    assert pl.read_parquet(run / "splits.parquet").height == 12
    page = (run / "report" / "index.html").read_text()
    assert "picture unavailable" in page and not (run / "report" / "img" / "cmu-1-small-region.jpg").exists()
