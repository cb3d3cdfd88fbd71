"""The run report at many slides: time and size of ``cytosyn-data report`` on synthetic runs of
2,000 and 10,000 slides (cytosyn_data.run.synthetic with detection pictures for every slide, 3 tiles
per slide: the report's cost is per slide; its tile scans are benchmarked in scale.py).

Prints per size: the first report (every picture drawn), a re-run with nothing changed (every picture
reused: the baseline of a full redraw is the first line), a re-run after one slide's fates changed,
and the report's size (index.html, slides.js, pictures, pages).

    python benchmarks/report_scale.py                  # 2,000 and 10,000 slides
    python benchmarks/report_scale.py --slides 2000
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import polars as pl

from cytosyn_data.reports.html import write_report
from cytosyn_data.run.synthetic import make_run


def size_mib(path: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file()) / 2**20


def one(n_slides: int, work: Path) -> None:
    run = work / f"report_{n_slides}"
    shutil.rmtree(run, ignore_errors=True)
    make_run(run, n_slides * 3, tiles_per_slide=3, shard_size=30_000, pictures=n_slides)
    t = time.perf_counter()
    first = write_report(run)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    again = write_report(run)
    t_again = time.perf_counter() - t
    key = pl.read_parquet(run / "tiles.parquet")["key"][0]
    pl.DataFrame({"key": [key], "keep": [False]}).write_parquet(run / "curation.parquet")
    t = time.perf_counter()
    changed = write_report(run)
    t_changed = time.perf_counter() - t
    rep = run / "report"
    print(f"{n_slides:>6} slides: first {t_first:6.1f} s ({first.drawn} pictures drawn); unchanged re-run "
          f"{t_again:5.1f} s ({again.reused} reused, {t_first / t_again:.0f}x faster than a full redraw); one slide "
          f"changed {t_changed:5.1f} s ({changed.drawn} drawn)")
    print(f"{'':>14}size: index.html {size_mib(rep, 'index.html'):.2f} MiB, slides.js {size_mib(rep, 'slides.js'):.2f} MiB, "
          f"pictures {size_mib(rep / 'img', '*.jpg'):.0f} MiB, slide pages {size_mib(rep / 'slides'):.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cytosyn-bench" / "report")
    args = ap.parse_args()
    for n in args.slides:
        one(n, args.work)


if __name__ == "__main__":
    main()
