"""`cytosyn-eval`: features of real and generated tile sets per extractor, metrics, report and plots.

Config (``pipelines/eval.yaml``, section ``eval``)::

    out: runs/eval
    real: {val_in: splits/val_in, val_out: splits/val_out}     # shard folders or PNG folders
    real_train: splits/train        # optional: FLD bandwidths are fitted on it (else half of each real set)
    generated: {sde250: {path: gen/sde250, steps: 250}}
    extractors: {inception_v3: /weights/inception.pth, uni: /weights/uni.bin}
    metrics: [fd, fd_inf, fld, pr, kid, cosine]   # pr: precision, recall, density, coverage (k = pr_k, 5)
    bootstrap: {draws: 50, n: 50000}                         # of the FD of each generated set
    preprocess: {real: [], generated: []}                    # jpeg70, centercrop224, ...
    batch_size: 64
    seed: 0

Features are cached per (set, extractor identity incl. weights, preprocessing) under
``out/cache/``; their mean and covariance are accumulated in float64 while streaming.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from cytosyn_data.io.feature_file import FeatureFileWriter

from ..distributed import barrier
from .extractors import REGISTRY, build_extractor, center_crop, jpeg_roundtrip
from .fld import fld, fld_and_gap, memorisation_scores
from .metrics import bootstrap, cosine_similarity_pairs, fd_infinity, frechet_distance, kid, mean_cov, prdc

METRICS = ("fd", "fd_inf", "fld", "pr", "kid", "cosine")

METRICS_SCHEMA = {"metric": pl.String, "extractor": pl.String, "set": pl.String, "reference": pl.String,
                  "value": pl.Float64, "std": pl.Float64}


@dataclass
class EvalConfig:
    out: str = "runs/eval"
    real: dict = field(default_factory=dict)
    real_train: str | None = None
    generated: dict = field(default_factory=dict)
    extractors: dict = field(default_factory=dict)  # name -> weight spec (local file, or random:small)
    metrics: list = field(default_factory=lambda: ["fd", "fld", "pr", "cosine"])
    pr_k: int = 5  # nearest neighbours of precision/recall/density/coverage (prdc, dgm-eval)
    kid: dict = field(default_factory=lambda: {"subsets": 100, "subset_size": 1000})  # torch-fidelity's
    fd_inf: dict = field(default_factory=lambda: {"min_fake": 5000, "num_points": 15})  # Chong & Forsyth's
    bootstrap: dict = field(default_factory=lambda: {"draws": 50, "n": 50000})
    preprocess: dict = field(default_factory=lambda: {"real": [], "generated": []})
    batch_size: int = 64
    device: str | None = None
    seed: int = 0
    max_images: int | None = None
    max_points: int | None = 50_000  # rows (seeded choice) per set for the k-NN / kernel / mixture metrics

    @classmethod
    def from_dict(cls, d: dict, where: str = "eval config") -> "EvalConfig":
        """Build and validate; errors name ``where`` (e.g. the YAML file) and the key."""
        from cytosyn_data.core.checks import non_negative, one_of, positive
        from cytosyn_data.core.errors import UsageError

        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        cfg = cls(**d)
        for m in cfg.metrics:
            one_of(m, f"{where}: metrics", METRICS)
        for name in cfg.extractors:
            one_of(name, f"{where}: extractors", REGISTRY)
        positive(cfg.batch_size, f"{where}: batch_size", int)
        positive(cfg.pr_k, f"{where}: pr_k", int)
        for k, v in (cfg.bootstrap or {}).items():
            one_of(k, f"{where}: bootstrap", ("draws", "n"))
            (non_negative if k == "draws" else positive)(v, f"{where}: bootstrap.{k}", int)  # draws 0: no bootstrap
        for k, v in (cfg.fd_inf or {}).items():
            one_of(k, f"{where}: fd_inf", ("min_fake", "num_points"))
            positive(v, f"{where}: fd_inf.{k}", int)
        for k, v in (cfg.kid or {}).items():
            one_of(k, f"{where}: kid", ("subsets", "subset_size", "seed"))
            if k != "seed":
                positive(v, f"{where}: kid.{k}", int)
        for k in ("max_images", "max_points"):
            if getattr(cfg, k) is not None:
                positive(getattr(cfg, k), f"{where}: {k}", int)
        for side, names in (cfg.preprocess or {}).items():
            for name in names:
                try:
                    preprocessor(name)
                except ValueError as exc:
                    raise UsageError(f"{where}: preprocess.{side}: {exc}") from None
        return cfg


def preprocessor(name: str):
    """``jpeg70`` -> JPEG round trip at quality 70; ``centercrop224`` -> central crop; ``png`` -> none."""
    m = re.fullmatch(r"jpeg(\d+)", name)
    if m:
        return jpeg_roundtrip(int(m.group(1)))
    m = re.fullmatch(r"centercrop(\d+)", name)
    if m:
        return center_crop(int(m.group(1)))
    if name == "png":
        return lambda img: img
    raise ValueError(f"unknown preprocessing {name!r} (jpegQ, centercropN, png)")


def _decode(data: bytes, where: str, to_rgb8) -> np.ndarray:
    from PIL import Image

    from cytosyn_data.core.errors import DataError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb8(img)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for damaged files
        raise DataError(f"{where}: corrupt image ({type(exc).__name__}: {exc})") from None


def iter_encoded(source: str | Path, limit: int | None = None):
    """(key, encoded bytes, where) of the images of a folder of shards (.png or .jpg members) or of
    PNG/JPEG files, in order, at most ``limit``; nothing is decoded."""
    from cytosyn_data.io.remote import is_url

    if is_url(source):
        from cytosyn_model.data import shard_urls

        tars, src = shard_urls(str(source)), None
    else:
        src = Path(source)
        tars = sorted(src.glob("*.tar")) if src.is_dir() else ([src] if src.suffix == ".tar" else [])
    if tars:
        import webdataset as wds

        from cytosyn_model.data import every_shard

        items = ((s["__key__"], s.get("png") or s.get("jpg"), f"{s['__url__']}: {s['__key__']}")
                 for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False, nodesplitter=every_shard))
        items = (it for it in items if it[1] is not None)
    elif src.is_dir():
        files = sorted(q for q in src.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg") and q.stem != "grid")
        items = ((p.stem, p.read_bytes(), str(p)) for p in files)
    else:
        raise FileNotFoundError(f"{src}: no shards or images here")
    yield from itertools.islice(items, limit or None)


def iter_images(source: str | Path, limit: int | None = None):
    """(key, uint8 [H, W, 3]) of :func:`iter_encoded`'s images; grey, 16-bit and RGBA images are
    converted, a corrupt one stops with the file (and key) named."""
    from cytosyn_data.io.png import to_rgb8

    for key, data, where in iter_encoded(source, limit):
        yield key, _decode(data, where, to_rgb8)


def set_identity(source, limit: int | None) -> str:
    """12 hex of a hash of the set's files (name, size, mtime) and the image cap: a changed set
    (other files, rewritten shards, another ``max_images``) gets a new feature cache."""
    from cytosyn_data.io.remote import is_url

    if is_url(source):  # the shards' URLs with their size and ETag
        import hashlib

        from cytosyn_data.run.state import file_identity
        from cytosyn_model.data import shard_urls

        h = hashlib.sha256(f"limit={limit}".encode())
        for u in shard_urls(str(source)):
            h.update(f"\n{u}\t{file_identity(u)}".encode())
        return h.hexdigest()[:12]
    src = Path(source)
    if not src.exists():
        from cytosyn_data.core.errors import DataError

        raise DataError(f"{src}: no shards or images here (path not found)")
    files = sorted(src.glob("*.tar")) if src.is_dir() else [src]
    if src.is_dir() and not files:
        files = sorted(q for q in src.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg") and q.stem != "grid")
    from cytosyn_data.run.state import files_digest

    return files_digest(files, f"limit={limit}")


def set_features(extractor, name: str, source, preprocess: list[str], cache: Path, batch_size: int, device,
                 weights: str | None, limit: int | None = None, rank: int = 0,
                 world: int = 1) -> tuple[list[str], np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Features [N, D] float32 of one set (cached; returned memory-mapped), its keys, and its float64
    (mean, cov). Every process of a job calls it: process r extracts batches b % world == r into
    ``part-{r}``, then process 0 joins the parts in batch order (the bytes of one process's cache,
    whatever ``world``) and accumulates the moments while doing so."""
    spec = extractor.spec
    tag = f"{name}-{spec.name}-{spec.identity(weights)}-{'+'.join(preprocess) or 'png'}-{set_identity(source, limit)}"
    folder = cache / tag
    if not (folder / "done.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if not _extract_part(extractor, f"{name}/{spec.name}", source, preprocess, folder, batch_size, device, limit,
                             rank, world):  # every process counts the images: all stop together
            raise ValueError(f"set {name}: no images in {source}")
        barrier()
        if rank == 0:
            n = _join_parts(folder, batch_size, world)
            (folder / "done.json").write_text(json.dumps({"set": name, "source": str(source), "extractor": spec.name,
                                                          "preprocess": preprocess, "n": n}))
        barrier()
    keys = pl.read_parquet(folder / "keys.parquet")["key"]
    m = np.load(folder / "moments.npz")
    return keys, np.load(folder / "features.npy", mmap_mode="r"), (m["mean"], m["cov"])


def _extract_part(extractor, what: str, source, preprocess: list[str], folder: Path, batch_size: int, device,
                  limit: int | None, rank: int, world: int) -> int:
    """``part-{rank}.npy`` and ``part-{rank}.keys.parquet``: the features of batches b % world == rank
    (images of the other batches are read, not decoded); returns the set's image count."""
    from cytosyn_data.io.png import to_rgb8

    fns = [preprocessor(p) for p in preprocess]
    items = iter_encoded(source, limit)
    keys, total = [], 0
    with FeatureFileWriter(folder / f"part-{rank}.npy") as fw:
        for b in tqdm(itertools.count(), desc=what, unit="batch", leave=False, disable=rank != 0):
            batch = list(itertools.islice(items, batch_size))
            total += len(batch)
            if not batch:
                break
            if b % world != rank:
                continue
            images = []
            for key, data, where in batch:
                img = _decode(data, where, to_rgb8)
                for fn in fns:
                    img = fn(img)
                images.append(np.ascontiguousarray(img))
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(device)
            fw.append(extractor(x).cpu().numpy())
            keys.extend(k for k, _, _ in batch)
    pl.DataFrame({"key": keys}, schema={"key": pl.String}).write_parquet(folder / f"part-{rank}.keys.parquet")
    return total


def _join_parts(folder: Path, batch_size: int, world: int) -> int:
    """features.npy, keys.parquet and moments.npz from the parts, batch b from part b % world, the
    moments added batch by batch as one process adds them; the parts are removed. Returns N."""
    from cytosyn_data.io.feature_file import read_rows

    from .metrics import RunningMoments

    parts = [np.load(folder / f"part-{r}.npy", mmap_mode="r") for r in range(world)]
    part_keys = [pl.read_parquet(folder / f"part-{r}.keys.parquet")["key"] for r in range(world)]
    n = sum(len(k) for k in part_keys)
    offsets, keys, moments = [0] * world, [], None
    with FeatureFileWriter(folder / "features.npy") as fw:
        for b in range(-(-n // batch_size)):
            r = b % world
            lo = offsets[r]
            offsets[r] = hi = min(lo + batch_size, len(part_keys[r]))
            f = read_rows(parts[r], lo, hi)
            moments = moments or RunningMoments(f.shape[1])
            moments.add(f)
            fw.append(f)
            keys.append(part_keys[r][lo:hi])
    if n:
        mu, cov = moments.mean_cov()
        np.savez(folder / "moments.npz", mean=mu, cov=cov)
        pl.concat(keys).to_frame("key").write_parquet(folder / "keys.parquet")
    del parts
    for r in range(world):
        (folder / f"part-{r}.npy").unlink()
        (folder / f"part-{r}.keys.parquet").unlink()
    return n


def subsample(x: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """At most ``n`` rows of ``x`` (a seeded choice kept in row order), read from its memory map."""
    from cytosyn_data.io.feature_file import read_rows, take_rows

    if n is None or len(x) <= n:
        return read_rows(x, 0, len(x))
    return take_rows(x, np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False)))


def reference_key(generated_key: str) -> str | None:
    """``gen__{refkey}__s{seed}_{i}`` (cytosyn-sample's cond mode) -> refkey."""
    parts = generated_key.split("__")
    return "__".join(parts[1:-1]) if len(parts) >= 4 and parts[0] == "gen" else None


def reference_pairs(real_keys: list[str], gen_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(real row, generated row) of each generated tile whose reference tile is in the real set (a
    join, not a dict of every real key)."""
    gen = pl.DataFrame({"ref": [reference_key(k) for k in gen_keys]}, schema={"ref": pl.String}).with_row_index("gi")
    real = pl.DataFrame({"ref": pl.Series(real_keys, dtype=pl.String)}).with_row_index("ri")
    pairs = gen.join(real, on="ref", how="inner").sort("gi")
    return pairs["ri"].to_numpy(), pairs["gi"].to_numpy()


def _pair_metrics(cfg: EvalConfig, names: tuple, g: tuple, r: tuple, train, out: Path, dev) -> list[tuple]:
    """Metric rows of one (extractor, generated set, real set). ``g``/``r``: keys, features (memory
    map), mean, covariance and the ``max_points`` subsample of each set."""
    (gkeys, gf, gmu, gcov, gs), (rkeys, rf, rmu, rcov, rs) = g, r
    rows = []
    if "fd" in cfg.metrics:
        std, b = None, cfg.bootstrap or {}
        if b.get("draws", 0) > 1:
            _, std, _ = bootstrap(lambda x: frechet_distance(*mean_cov(x), rmu, rcov), gf, b.get("n", len(gf)),
                                  b["draws"], cfg.seed)
        rows.append(("fd", *names, frechet_distance(gmu, gcov, rmu, rcov), std))
    if "pr" in cfg.metrics:
        m = prdc(rs, gs, cfg.pr_k, device=dev)
        rows += [(name, *names, m[name], None) for name in ("precision", "recall", "density", "coverage")]
    if "fd_inf" in cfg.metrics:
        lo, pts = int(cfg.fd_inf.get("min_fake", 5000)), int(cfg.fd_inf.get("num_points", 15))
        if len(gf) <= lo:
            from cytosyn_data.core.errors import DataError

            raise DataError(f"fd_inf: generated set {names[1]} has {len(gf)} images; FD-infinity needs more than "
                            f"fd_inf.min_fake = {lo}")
        rows.append(("fd_inf", *names, fd_infinity(gf, rmu, rcov, lo, pts, cfg.seed), None))
    if "kid" in cfg.metrics:
        size = min(int(cfg.kid.get("subset_size", 1000)), len(rs), len(gs))
        mean, std = kid(gs, rs, int(cfg.kid.get("subsets", 100)), size, seed=int(cfg.kid.get("seed", 2020)))
        rows.append(("kid", *names, mean, std))
    if "fld" in cfg.metrics and train is None:
        rows.append(("fld", *names, fld(rs, gs, seed=cfg.seed, device=dev), None))
    elif "fld" in cfg.metrics:  # the memorisation gap and per-sample scores need the training set
        value, gap = fld_and_gap(rs, gs, real_train=train, seed=cfg.seed, device=dev)
        rows += [("fld", *names, value, None), ("fld_gap", *names, gap, None)]
        scores = memorisation_scores(train, rs, gf, cfg.seed, dev)  # all generated samples, as the reference
        pl.DataFrame({"key": gkeys, "memorisation": scores}).write_parquet(out / "memorisation_{}_{}_{}.parquet".format(*names))
    if "cosine" in cfg.metrics:
        ri, gi = reference_pairs(rkeys, gkeys)
        if len(ri):
            from cytosyn_data.io.feature_file import take_rows

            rows.append(("cosine", *names, cosine_similarity_pairs(take_rows(rf, ri), take_rows(gf, gi)), None))
    return rows


def evaluate(cfg: EvalConfig, rank: int = 0, world: int = 1) -> pl.DataFrame | None:
    """Every metric for every (extractor, generated set, real set); writes metrics.parquet, report.md,
    plots. In a job of ``world`` processes each extracts its share of every set's features
    (:func:`set_features`) and process 0 computes the metrics and writes the outputs (the others
    return None)."""
    out = Path(cfg.out)
    cache = out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    from cytosyn_data.core.executors import rank_device

    dev = torch.device(rank_device(cfg.device))
    rows = []
    pre_r, pre_g = cfg.preprocess.get("real", []), cfg.preprocess.get("generated", [])
    for ename, weights in cfg.extractors.items():
        extractor = build_extractor(ename, weights).to(dev)

        def feats(name, source, pre):
            return set_features(extractor, name, source, pre, cache, cfg.batch_size, dev, weights, cfg.max_images,
                                rank, world)

        real = {n: feats(n, p, pre_r) for n, p in cfg.real.items()}
        train = None
        if cfg.real_train and "fld" in cfg.metrics:
            train = subsample(feats("real_train", cfg.real_train, pre_r)[1], cfg.max_points, cfg.seed)
        gens = {g: feats(f"gen_{g}", v["path"] if isinstance(v, dict) else v, pre_g) for g, v in cfg.generated.items()}
        if rank != 0:
            continue
        for gname, (gkeys, gf, (gmu, gcov)) in gens.items():
            gs = subsample(gf, cfg.max_points, cfg.seed + 1)  # k-NN, kernel and mixture metrics: <= max_points rows
            for rname, (rkeys, rf, (rmu, rcov)) in real.items():
                rs = subsample(rf, cfg.max_points, cfg.seed + 2)
                rows += _pair_metrics(cfg, (ename, gname, rname), (gkeys, gf, gmu, gcov, gs), (rkeys, rf, rmu, rcov, rs),
                                      train, out, dev)
    if rank != 0:
        return None
    df = pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")
    df.write_parquet(out / "metrics.parquet")
    _write_outputs(cfg, df, out)
    return df


def _write_outputs(cfg: EvalConfig, df: pl.DataFrame, out: Path) -> None:
    write_report(cfg, df, out)
    from ..html_pages import write_eval_page

    write_eval_page(out)
    from cytosyn_data.run.state import record_run

    sets = {**cfg.real, **({"real_train": cfg.real_train} if cfg.real_train else {}),
            **{f"gen_{g}": (v["path"] if isinstance(v, dict) else v) for g, v in cfg.generated.items()}}
    from cytosyn_encoders import weights_identity

    record_run(out, "eval", dataclasses.asdict(cfg), [f"{n}: {p} files={set_identity(p, cfg.max_images)}" for n, p in sets.items()],
               recorded={"extractor_weights": {e: weights_identity(w) for e, w in cfg.extractors.items()}})


def write_report(cfg: EvalConfig, df: pl.DataFrame, out: Path) -> None:
    """report.md (tables and the choices that change the numbers), fd.png, fd_vs_steps.png, grid.png."""
    import matplotlib

    from cytosyn_data.reports.markdown import markdown_table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# cytosyn-eval report", "",
             f"- real sets: {', '.join(f'{k} = {v}' for k, v in cfg.real.items())}",
             f"- generated sets: {', '.join(cfg.generated)}",
             f"- preprocessing: real {cfg.preprocess.get('real') or ['png']}, generated {cfg.preprocess.get('generated') or ['png']}",
             f"- bootstrap: {cfg.bootstrap}; seed {cfg.seed}", "", "## Extractors", "",
             "| extractor | input | resize | normalisation | feature | weights (sha256/16) |", "|---|---|---|---|---|---|"]
    from cytosyn_encoders import weights_identity

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
    from PIL import Image

    from ..grid import save_grid

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
