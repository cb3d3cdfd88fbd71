"""What cytosyn-eval writes for a person: report.md (tables and the choices that change the numbers),
plots, the real-vs-generated grid and the HTML page, and the folder's run.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from cytosyn_data.reports.markdown import markdown_table
from cytosyn_data.run.state import record_run
from cytosyn_encoders import weights_identity

from ..grid import save_grid
from ..html_pages import write_eval_page
from .extractors import REGISTRY
from .features import iter_images, set_identity

if TYPE_CHECKING:
    from .run import EvalConfig


def write_outputs(cfg: EvalConfig, df: pl.DataFrame, out: Path) -> None:
    write_report(cfg, df, out)
    write_eval_page(out)
    sets = {**cfg.real, **({"real_train": cfg.real_train} if cfg.real_train else {}),
            **{f"gen_{g}": (v["path"] if isinstance(v, dict) else v) for g, v in cfg.generated.items()}}
    record_run(out, "eval", dataclasses.asdict(cfg), [f"{n}: {p} files={set_identity(p, cfg.max_images)}" for n, p in sets.items()],
               recorded={"extractor_weights": {e: weights_identity(w) for e, w in cfg.extractors.items()}})


def write_report(cfg: EvalConfig, df: pl.DataFrame, out: Path) -> None:
    """report.md (tables and the choices that change the numbers), fd.png, fd_vs_steps.png, grid.png."""
    import matplotlib  # here: the headless backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    lines = ["# cytosyn-eval report", "",
             f"- real sets: {', '.join(f'{k} = {v}' for k, v in cfg.real.items())}",
             f"- generated sets: {', '.join(cfg.generated)}",
             f"- preprocessing: real {cfg.preprocess.get('real') or ['png']}, generated {cfg.preprocess.get('generated') or ['png']}",
             f"- bootstrap: {cfg.bootstrap}; seed {cfg.seed}", "", "## Extractors", "",
             "| extractor | input | resize | normalisation | feature | weights (sha256/16) |", "|---|---|---|---|---|---|"]
    for e, w in cfg.extractors.items():
        s = REGISTRY[e]
        lines.append(f"| {e} | {s.input_size} | {s.resize} (antialias) | mean {s.mean} std {s.std} | {s.output} | "
                     f"{weights_identity(w)} |")
    lines += ["", "## Metrics", "", markdown_table(df, "{:.4f}")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fd = df.filter(pl.col("metric") == "fd")
    if fd.height:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{e}\n{g} vs {r}" for e, g, r in zip(fd["extractor"], fd["set"], fd["reference"])]
        ax.bar(range(fd.height), fd["value"], yerr=fd["std"].fill_null(0).to_numpy())
        ax.set_xticks(range(fd.height), labels, fontsize=6, rotation=45, ha="right")
        ax.set_ylabel("Frechet distance")
        fig.tight_layout()
        fig.savefig(out / "fd.png", dpi=120)
        plt.close(fig)
        steps = {g: v["steps"] for g, v in cfg.generated.items() if isinstance(v, dict) and "steps" in v}
        if len(steps) > 1:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for (e, r), part in fd.filter(pl.col("set").is_in(list(steps))).group_by("extractor", "reference"):
                xs = [steps[g] for g in part["set"]]
                order = np.argsort(xs)
                ax.plot(np.array(xs)[order], part["value"].to_numpy()[order], marker="o", label=f"{e} vs {r}")
            ax.set_xlabel("sampling steps")
            ax.set_ylabel("Frechet distance")
            ax.legend(fontsize=6)
            fig.tight_layout()
            fig.savefig(out / "fd_vs_steps.png", dpi=120)
            plt.close(fig)
    _side_by_side(cfg, out)


def _side_by_side(cfg: EvalConfig, out: Path, n: int = 8) -> None:
    """grid.png: real tiles (top row) above generated tiles (bottom row), first of each set."""
    if not cfg.real or not cfg.generated:
        return
    real = [img for _, (_, img) in zip(range(n), iter_images(next(iter(cfg.real.values()))))]
    g = next(iter(cfg.generated.values()))
    gen = [img for _, (_, img) in zip(range(n), iter_images(g["path"] if isinstance(g, dict) else g))]
    k = min(len(real), len(gen))
    if k:
        size = real[0].shape[0]
        gen = [img if img.shape[:2] == (size, size) else np.asarray(Image.fromarray(img).resize((size, size))) for img in gen]
        save_grid(np.stack(real[:k] + gen[:k]), out / "grid.png", cols=k)
