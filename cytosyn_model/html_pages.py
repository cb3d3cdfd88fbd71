"""Static HTML pages of a training run and of an evaluation (``{out}/report/index.html``, from disk).

- training (written at the end of ``cytosyn-train``): loss curves of ``log.jsonl`` (one panel per loss
  term, log scale where positive) and the EMA sample grid of every ``samples/step_*.png``;
- evaluation (written at the end of ``cytosyn-eval``): FD per extractor with the bootstrap error bars
  (``fd.png``), FD against sampling steps, tables of FD, FLD, precision / recall / density / coverage
  and cosine similarity from ``metrics.parquet``, and the real-vs-generated grid.
The pictures load in headless Chromium (tests); ``body[data-images-loaded]`` counts them.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import polars as pl

from cytosyn_data.reports.html import html_page, html_table
from cytosyn_data.io.atomic import atomic_write_bytes

LOSS_KEYS = ("denoise", "proj_sit", "proj_vae", "l1", "lpips", "kl", "gan_g", "disc", "sit_total", "vae_total")


def loss_curves(log: Path, path: Path) -> list[str]:
    """Plot the loss terms of ``log.jsonl`` against the step into ``path``; returns the terms drawn."""
    import matplotlib  # here: the headless backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    keys = [k for k in LOSS_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not keys:
        return []
    cols = min(3, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4 * cols, 2.6 * -(-len(keys) // cols)), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        if all(v > 0 for _, v in pts):
            ax.set_yscale("log")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def write_train_page(out: str | Path) -> Path:
    """``out/report/index.html`` for a training run folder (log.jsonl, samples/, checkpoints/)."""
    out = Path(out)
    img = out / "report" / "img"
    img.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>cytosyn training <code>{html.escape(str(out))}</code></h1>"]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    parts.append(f"<p>checkpoints: <span id=\"n-checkpoints\">{len(ckpts)}</span> ({html.escape(', '.join(ckpts[-5:]))})</p>")
    if (out / "log.jsonl").exists() and loss_curves(out / "log.jsonl", img / "losses.png"):
        parts += ["<h2>Losses</h2>", '<figure><a href="img/losses.png"><img src="img/losses.png" alt="losses"></a></figure>']
    grids = sorted((out / "samples").glob("step_*.png")) if (out / "samples").exists() else []
    if grids:
        parts.append("<h2>EMA samples per checkpoint</h2>")
    for g in grids:
        shutil.copyfile(g, img / g.name)
        parts.append(f'<figure><a href="img/{g.name}"><img src="img/{g.name}" alt="{g.stem}"></a>'
                     f"<figcaption>{html.escape(g.stem)}</figcaption></figure>")
    path = out / "report" / "index.html"
    atomic_write_bytes(path, html_page(f"cytosyn training {out.name}", "\n".join(parts)).encode(), durable=False)
    return path


def write_eval_page(out: str | Path) -> Path:
    """``out/report/index.html`` for an evaluation folder (metrics.parquet, fd.png, grid.png)."""
    out = Path(out)
    img = out / "report" / "img"
    img.mkdir(parents=True, exist_ok=True)
    df = pl.read_parquet(out / "metrics.parquet")
    parts = [f"<h1>cytosyn evaluation <code>{html.escape(str(out))}</code></h1>",
             f"<p>extractors: <span id=\"n-extractors\">{df['extractor'].n_unique()}</span>; "
             f"generated sets: {html.escape(', '.join(sorted(df['set'].unique())))}</p>"]
    for name, title in (("fd.png", "Frechet distance per extractor (bootstrap error bars)"),
                        ("fd_vs_steps.png", "Frechet distance against sampling steps"),
                        ("grid.png", "real (top) and generated (bottom) tiles")):
        if (out / name).exists():
            shutil.copyfile(out / name, img / name)
            parts += [f"<h2>{title}</h2>", f'<figure><a href="img/{name}"><img src="img/{name}" alt="{name}"></a></figure>']
    for metrics, title in ((("fd",), "Frechet distance (std: bootstrap)"), (("fld",), "FLD"),
                           (("precision", "recall", "density", "coverage"), "precision / recall / density / coverage"),
                           (("cosine",), "cosine similarity of paired tiles")):
        part = df.filter(pl.col("metric").is_in(list(metrics)))
        if part.height:
            parts += [f"<h2>{title}</h2>", html_table(part, "{:.4f}")]
    if (out / "report.md").exists():
        parts += ["<h2>report.md</h2>", f"<pre>{html.escape((out / 'report.md').read_text())}</pre>"]
    path = out / "report" / "index.html"
    atomic_write_bytes(path, html_page(f"cytosyn evaluation {out.name}", "\n".join(parts)).encode(), durable=False)
    return path
