"""Evidence that REPA-E training learns: a tiny configuration on real tiles of the shared slides.

    python benchmarks/learning_curves.py --out runs/evidence --minutes 25

Tiles every tissue tile of ../shared/data/wsi (cmu-1-small-region at its 0.499 MPP, the TCGA frozen
section with --mpp-override 0.25), holds out 1 tile in 6 (by key hash), trains
the shipped tiny config (random tiny H0-mini as the condition and REPA target; no LPIPS: its
VGG weights cannot be downloaded here) for the given time on the CPU, and every ``--eval-every``
steps measures on the held-out tiles: VAE reconstruction PSNR (posterior mode, live and EMA VAE),
the REPA cosine similarity of the SiT at fixed t and noise, and the diffusion loss there. Writes
``{out}/curves.jsonl``, ``{out}/log.jsonl`` and the PNG plots under ``--plots``. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tile_and_split(out: Path, shared: Path) -> tuple[Path, Path]:
    """All tissue tiles of the two real slides -> train.tar and heldout.tar (1 tile in 6)."""
    import webdataset as wds

    from cytosyn_data.cli import main as data_main
    from cytosyn_data.io.tar_write import write_tar_atomic

    tiles = out / "tiles"
    if not (tiles / "tiles.parquet").exists():
        table = out / "slides.csv"
        out.mkdir(parents=True, exist_ok=True)
        wsi = shared / "wsi"
        table.write_text(f"path,mpp\n{wsi / 'cmu-1-small-region.svs'},\n{wsi / 'tcga-cr-7395-01a-01-ts1.svs'},0.25\n")
        if data_main(["tile", "--slides", str(table), "--out", str(tiles), "--tiles", "all"]) != 0:
            raise SystemExit("tiling failed")
    parts: dict[str, list] = {"train": [], "heldout": []}
    for s in wds.WebDataset(sorted(str(p) for p in (tiles / "shards").glob("*.tar")), shardshuffle=False):
        part = "heldout" if int(hashlib.sha256(s["__key__"].encode()).hexdigest(), 16) % 6 == 0 else "train"
        parts[part] += [(f"{s['__key__']}.png", s["png"]), (f"{s['__key__']}.json", s["json"])]
    for name, members in parts.items():
        write_tar_atomic(out / f"{name}.tar", members)
    return out / "train.tar", out / "heldout.tar"


@torch.no_grad()
def evaluate(tr, heldout: dict, noise: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Held-out PSNR (dB, images in [0, 1]) of the live and EMA VAE, REPA cosine and diffusion loss."""
    from cytosyn_model.data import model_images
    from cytosyn_model.losses import diffusion_loss, repa_loss
    from cytosyn_model.path import interpolate

    x = model_images(heldout["image"], "cpu")
    cls, tok = tr._features(heldout)
    out = {}
    for name, vae in (("psnr", tr.vae), ("psnr_ema", tr.ema_vae)):
        was = vae.training
        vae.eval()
        rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        vae.train(was)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        out[name] = float((10 * torch.log10(1 / mse)).mean())
    z = tr.ema_vae.encode(x).mode()
    xt, target = interpolate(tr.ema_bn(z), noise[: x.shape[0]], t[: x.shape[0]])
    v, zs = tr.ema_sit(xt, t[: x.shape[0]], cls)
    out["repa_cosine"] = -float(repa_loss(zs, tok))
    out["denoise_heldout"] = float(diffusion_loss(v, target))
    return out


def run(args) -> Path:
    from cytosyn_model.data import collate, decode_sample, make_loader
    from cytosyn_model.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_tar, heldout_tar = tile_and_split(out, Path(args.shared))
    conf = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())["train"]
    conf.update(out=str(out / "run"), batch_size=args.batch, lr=args.lr, max_steps=10**9, gan_start_step=args.gan_start,
                ema_decay=0.995, num_workers=0, shuffle_buffer=256)
    tr = Trainer(TrainConfig.from_dict(conf))
    import webdataset as wds

    held = collate([decode_sample(s) for s in wds.WebDataset(str(heldout_tar), shardshuffle=False)])
    g = torch.Generator().manual_seed(0)
    s = tr.sit_cfg.input_size
    noise = torch.randn(len(held["key"]), tr.vae_cfg.z_channels, s, s, generator=g)
    t = torch.linspace(0.1, 0.9, len(held["key"]))
    curves, logs = open(out / "curves.jsonl", "w"), open(out / "log.jsonl", "w")
    it = iter(make_loader(str(train_tar), args.batch, seed=0, num_workers=0, shuffle_buffer=256))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.minutes * 60:
        if tr.step % args.eval_every == 0:
            curves.write(json.dumps({"step": tr.step, "seconds": time.perf_counter() - t0, **evaluate(tr, held, noise, t)}) + "\n")
            curves.flush()
        logs.write(json.dumps({"step": tr.step + 1, **tr.train_step(next(it))}) + "\n")
    curves.write(json.dumps({"step": tr.step, "seconds": time.perf_counter() - t0, **evaluate(tr, held, noise, t)}) + "\n")
    curves.close(), logs.close()
    print(f"{tr.step} steps in {args.minutes} min; {len(held['key'])} held-out tiles")
    return out


def smooth(values: list[float], k: int = 25) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot(out: Path, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    terms = ["l1", "kl", "align_vae", "vae_total", "gan_g", "gan_d", "denoise", "align_sit", "sit_total"]
    fig, axes = plt.subplots(3, 3, figsize=(12, 9))
    for ax, term in zip(axes.flat, terms):
        pts = [(r["step"], r[term]) for r in log if term in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.5, alpha=0.4)
            ax.plot([p[0] for p in pts], smooth([p[1] for p in pts]), lw=1.5)
        ax.set_title(term)
        ax.set_xlabel("step")
    fig.suptitle("REPA-E loss terms, tiny config on real tiles (CPU); faint: per step, bold: 25-step mean")
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    fig.savefig(plots / "learning_losses.png", dpi=90)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    steps = [c["step"] for c in curves]
    for ax, keys, title in zip(axes, (("psnr", "psnr_ema"), ("repa_cosine",), ("denoise_heldout",)),
                               ("held-out reconstruction PSNR (dB)", "held-out REPA cosine (EMA SiT)", "held-out diffusion loss (EMA)")):
        for k in keys:
            ax.plot(steps, [c[k] for c in curves], marker=".", label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "learning_heldout.png", dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/evidence")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--minutes", type=float, default=25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gan-start", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plots", default=str(ROOT / "docs" / "img"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from an earlier run")
    args = p.parse_args()
    out = Path(args.out) if args.plot_only else run(args)
    plot(out, Path(args.plots))


if __name__ == "__main__":
    main()
