"""``cytosyn-data``: the command line of the data stages (thin wrappers over pure functions)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cytosyn_data.core.checks import cli_type, fraction, non_negative, positive
from cytosyn_data.core.config import SHIPPED, load_stage_config, shipped_config_text
from cytosyn_data.core.errors import UsageError, run_cli
from cytosyn_data.core.executors import ClusterSpec, launched_rank, write_tls_files
from cytosyn_data.io.remote import is_url, publish
from cytosyn_data.reports.coords_export import FORMATS as H5_FORMATS
from cytosyn_data.reports.coords_export import export_h5
from cytosyn_data.reports.geojson import export_geojson
from cytosyn_data.reports.html import write_report
from cytosyn_data.run.slide_table import build_slide_table
from cytosyn_data.split.stage import SplitConfig, run_split
from cytosyn_data.tile.config import SEGMENTER_NAMES, TileConfig
from cytosyn_data.tile.merge import merge_parts
from cytosyn_data.tile.stage import run_tile


def _tiles_arg(value: str) -> int | None:
    if value.lower() == "all":
        return None
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError("--tiles takes a positive number or 'all'")
    return n


def add_cluster_options(p) -> None:
    """Where work units run: the local pool (--workers), or Dask (--scheduler / --cluster)."""
    g = p.add_argument_group("distributed execution (Dask)")
    g.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--cluster", choices=["local", "slurm"],
                   help="start a Dask cluster: 'local' (--workers processes on 127.0.0.1) or 'slurm' (dask-jobqueue)")
    g.add_argument("--jobs", type=cli_type(positive, int), default=1, help="SLURM jobs to start (--cluster slurm)")
    g.add_argument("--cores", type=cli_type(positive, int), default=8, help="cores per SLURM job (one worker each)")
    g.add_argument("--memory", default="32GiB", help="memory per SLURM job, e.g. 32GiB")
    g.add_argument("--walltime", default="04:00:00", help="walltime per SLURM job, HH:MM:SS")
    g.add_argument("--queue", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--job-extra", action="append", default=[], help="extra #SBATCH directive (repeatable)")
    g.add_argument("--tls-ca-file", help="CA certificate of a tls:// --scheduler (else Dask's config)")
    g.add_argument("--tls-cert", help="client certificate for a tls:// --scheduler")
    g.add_argument("--tls-key", help="client key for a tls:// --scheduler")
    g.add_argument("--insecure", action="store_true",
                   help="allow a plain tcp:// --scheduler outside this machine (unauthenticated: anyone who "
                        "reaches it runs code as you)")
    g.add_argument("--dashboard", help="serve the Dask dashboard at this address, e.g. 127.0.0.1:8787 (default: off)")
    g.add_argument("--shared-temp-dir", help="folder on a filesystem the SLURM jobs see, for the run's temporary "
                                             "TLS files (--cluster slurm; default: Dask's config, else the current one)")


def cluster_spec(args):
    """The :class:`ClusterSpec` of the parsed options."""
    if args.scheduler and args.cluster:
        raise UsageError("give --scheduler (an existing cluster) or --cluster (start one), not both")
    if args.scheduler:
        return ClusterSpec("scheduler", workers=args.workers, address=_scheduler_address(args),
                           tls=_tls_files(args), dashboard=args.dashboard)
    if args.cluster == "local":
        return ClusterSpec("dask-local", workers=args.workers, dashboard=args.dashboard)
    if args.cluster == "slurm":
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", args.memory):
            raise UsageError(f"--memory: expected a size like 32GiB, got {args.memory!r}")
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", args.walltime):
            raise UsageError(f"--walltime: expected HH:MM:SS, got {args.walltime!r}")
        return ClusterSpec("slurm", jobs=args.jobs, cores=args.cores, memory=args.memory, walltime=args.walltime,
                           queue=args.queue, account=args.account, job_extra=tuple(args.job_extra),
                           dashboard=args.dashboard, shared_temp_directory=args.shared_temp_dir)
    return ClusterSpec("local", workers=args.workers)


def _scheduler_address(args) -> str:
    """The --scheduler address, refused when it is plain tcp:// off this machine without --insecure."""
    addr = args.scheduler
    m = re.fullmatch(r"(tcp|tls|inproc|ucx)://(\[[^\]]+\]|[^:/\s]+)(:\d+)?", addr)
    if not m:
        raise UsageError(f"--scheduler: expected an address like tls://HOST:PORT, got {addr!r}")
    local = m.group(2) in ("127.0.0.1", "localhost", "[::1]")
    if m.group(1) == "tcp" and not local:
        if not args.insecure:
            raise UsageError(f"--scheduler {addr}: a plain tcp:// scheduler is unauthenticated and unencrypted "
                             "(anyone who reaches it runs code as you on every worker); use tls:// with "
                             "--tls-ca-file/--tls-cert/--tls-key (or Dask's TLS config), or pass --insecure")
        print(f"warning: --insecure: {addr} is reached without TLS; keep it on a network only you use", file=sys.stderr)
    return addr


def _tls_files(args) -> tuple[str, str, str] | None:
    files = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if not any(files):
        return None
    if not all(files):
        raise UsageError("--tls-ca-file, --tls-cert and --tls-key go together")
    for name, f in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), files):
        if not Path(f).is_file():
            raise UsageError(f"{name} {f}: file not found")
    if not args.scheduler.startswith("tls://"):
        raise UsageError(f"--tls-* options need a tls:// --scheduler, got {args.scheduler}")
    return files


def _size_arg(value: str) -> int:
    """'50GiB', '200 GB', '512MiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 50GiB or 200GB, got {value!r}")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="slides -> tissue tiles -> lossless PNG WebDataset shards")
    p.add_argument("--slides", nargs="+", required=True, help="slide files, folders, or one CSV/parquet table")
    p.add_argument("--out", required=True, help="output folder, or an fsspec URL (s3://bucket/run) with --work-dir")
    p.add_argument("--work-dir", type=Path, help="local folder the run is made in when --out is a URL")
    p.add_argument("--cache-dir", type=Path, help="local cache of remote slides (default OUT/work/slide-cache)")
    p.add_argument("--cache-size", type=_size_arg, default=50 * 2**30,
                   help="remote-slide cache limit beyond the slides in use, e.g. 200GiB (default 50GiB)")
    p.add_argument("--include-regions", type=Path,
                   help="folder of {slide_id}.geojson (QuPath annotations, level-0 px): tile only inside them")
    p.add_argument("--exclude-regions", type=Path, help="folder of {slide_id}.geojson regions never to tile")
    p.add_argument("--region-class", help="take only the region files' annotations of this QuPath classification "
                                          "(e.g. Tumor); detections and tiles are never regions")
    p.add_argument("--coords", type=Path,
                   help="FILE.h5 (one slide) or a folder of TRIDENT's or CLAM's coordinates files (level-0 x, y): "
                        "tile exactly those (with --tiles all)")
    p.add_argument("--config", help="YAML config (section 'tile'): a file, or 'tile', the shipped one "
                                    "(cytosyn-data config show tile)")
    p.add_argument("--mpp-override", "--mpp", dest="mpp_override", type=cli_type(positive),
                   help="level-0 MPP for every slide")
    p.add_argument("--tiles", type=_tiles_arg, default=argparse.SUPPRESS, help="global tile budget or 'all'")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    p.add_argument("--shard-size", type=cli_type(positive, int), default=argparse.SUPPRESS, help="tiles per shard")
    p.add_argument("--segmenter", choices=SEGMENTER_NAMES, default=argparse.SUPPRESS,
                   help="tissue segmentation: hsv (the HSV rule, default), hest (HEST DeepLabV3, 1 um/px) or grandqc "
                        "(GrandQC UNet++, 10 um/px; pip install cytosyn[seg])")
    p.add_argument("--segmenter-weights", default=argparse.SUPPRESS,
                   help="local weights of --segmenter hest|grandqc (never downloaded)")
    p.add_argument("--segmenter-batch", type=cli_type(positive, int), default=argparse.SUPPRESS,
                   help="patches per forward pass of the segmenter (default 16)")
    p.add_argument("--workers", type=cli_type(positive, int), default=1, help="processes (units: slides, shards) in parallel")
    p.add_argument("--shard-index", type=cli_type(non_negative, int), default=0, help="this job's index (e.g. SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-shards", type=cli_type(positive, int), default=1, help="number of jobs the slides are split across")
    p.add_argument("--stage", choices=["all", "detect", "extract"], default="all")
    add_cluster_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run made in --out with other settings or slides (default: refuse)")


def cmd_tile(args) -> int:
    conf = load_stage_config(args.config, "tile")
    for name in ("tiles", "seed", "shard_size", "segmenter", "segmenter_weights", "segmenter_batch"):
        if hasattr(args, name):
            conf[name] = getattr(args, name)
    if isinstance(conf.get("tiles"), str) and conf["tiles"].lower() == "all":
        conf["tiles"] = None
    cfg = TileConfig.from_dict(conf, f"{args.config} (section tile)" if args.config else "tile options")
    if not 0 <= args.shard_index < args.num_shards:
        raise UsageError(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    if is_url(args.out) and not args.work_dir:
        raise UsageError(f"--out {args.out} is a URL: give a local --work-dir to make the run in")
    local_out = args.work_dir if is_url(args.out) else Path(args.out)
    for opt, ext in (("include_regions", "geojson"), ("exclude_regions", "geojson"), ("coords", "h5")):
        folder = getattr(args, opt)
        if folder is not None and not folder.is_dir() and not (opt == "coords" and folder.is_file()):
            raise UsageError(f"--{opt.replace('_', '-')} {folder}: not a folder (it holds {{slide_id}}.{ext} files)")
    slides = build_slide_table(args.slides, args.mpp_override)
    if args.coords is not None and args.coords.is_file() and slides.height != 1:
        raise UsageError(f"--coords {args.coords} is one file: give one slide, or a folder of {{slide_id}}.h5 files")
    res = run_tile(
        slides,
        local_out,
        cfg,
        workers=args.workers,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        stage=args.stage,
        overwrite=args.overwrite,
        cluster=cluster_spec(args),
        cache_dir=args.cache_dir,
        cache_bytes=args.cache_size,
        include_regions=args.include_regions,
        exclude_regions=args.exclude_regions,
        coords=args.coords,
        region_class=args.region_class,
    )
    if res.downloaded:
        print(f"  fetched {res.downloaded / 2**20:.1f} MiB of remote slides")
    if is_url(args.out):
        sent = publish(local_out, args.out)
        print(f"  published to {args.out}: {sent['uploaded']} file(s) uploaded, {sent['removed']} removed")
    print(
        f"\ncytosyn-data tile: {res.n_slides} slide(s), {len(res.failed)} failed, "
        f"{res.n_candidates} candidates, {res.n_tiles} tiles in {res.n_shards} shard(s) -> {res.out}"
    )
    print(f"  backend: {res.backend}")
    for k, v in res.seconds.items():
        print(f"  {k:8s} {v:8.2f} s")
    if res.failed:
        print(f"FAILED slides ({len(res.failed)}): {', '.join(res.failed)}  (see slides.parquet / report.md)")
        return 1
    return 0


def cmd_merge(args) -> int:
    counts = merge_parts(args.out)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def _add_curate(sub) -> None:
    p = sub.add_parser("curate", help="artifact scoring: frozen iBOT ViT-S + 5-fold linear probe")
    cs = p.add_subparsers(dest="curate_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="tile run folder (shards/, tiles.parquet); under torchrun write --run-dir: torchrun's "
                             "parser takes --run for its own --run-path")
    common.add_argument("--backbone-weights", required=True,
                        help="local iBOT/DINO ViT-S/16 checkpoint ('random:small': a random test network)")
    common.add_argument("--mean-patch", action="store_true", help="concatenate the mean patch token to CLS")
    common.add_argument("--device", help="default: cuda when present (cuda:LOCAL_RANK under torchrun), else cpu")
    common.add_argument("--batch-size", type=cli_type(positive, int), default=128)
    common.add_argument("--decode-workers", type=cli_type(positive, int),
                        help="threads decoding PNG tiles while the backbone runs (default: the CPUs per GPU, at most 8; "
                             "2 on CPU; the bytes do not depend on it)")
    common.add_argument("--workers", type=cli_type(positive, int), default=1, help="Dask worker processes (--cluster local)")
    add_cluster_options(common)
    f = cs.add_parser("fit", parents=[common], help="grouped stratified 5-fold CV of the linear probe")
    f.add_argument("--annotations", required=True, type=Path, help="CSV/parquet with key, label")
    f.add_argument("--seed", type=int, default=0)
    a = cs.add_parser("apply", parents=[common], help="score every tile with the mean of the 5 probes")
    a.add_argument("--threshold", type=cli_type(fraction, True), default=0.5)
    s = cs.add_parser("sheet", help="contact sheets with keys for labelling")
    s.add_argument("--run", required=True, type=Path)
    s.add_argument("--n", type=cli_type(positive, int), default=64)
    s.add_argument("--seed", type=int, default=0)
    w = cs.add_parser("weak-labels", help="starting labels from pixel checks (pen, background, blur)")
    w.add_argument("--run", required=True, type=Path)
    w.add_argument("--out", required=True, type=Path)


def cmd_curate(args) -> int:
    from cytosyn_data.curate import stage as C  # lazy: torch + timm, 2 s

    if args.curate_cmd in ("fit", "apply"):
        if args.curate_cmd == "apply":
            C.fitted_probes(args.run)  # before hours of features, not after
        rank, world = launched_rank()
        cluster = _cpu_cluster(args, world)
        spec = C.CacheSpec(args.backbone_weights, args.mean_patch, args.device, args.batch_size,
                           args.decode_workers)
        x = C.curate_features(args.run, args.curate_cmd, vars(args), spec, getattr(args, "annotations", None), cluster,
                              rank, world)
        if x is None:
            print(f"curate: rank {rank} of {world}: its shards' features are done; rank 0 goes on to {args.curate_cmd}")
        elif args.curate_cmd == "fit":
            m = C.curate_fit(args.run, args.annotations, x, args.seed)
            print(m)
            print(f"mean AUC {m['auc'].mean():.3f}, mean balanced accuracy {m['balanced_accuracy'].mean():.3f}")
        else:
            print("\n".join(C.curate_apply(args.run, x, args.threshold)))
    elif args.curate_cmd == "sheet":
        sheet, template = C.curate_sheet(args.run, args.n, args.seed)
        print(f"contact sheet {sheet} and a label template {template}")
    else:
        n = C.curate_weak_labels(args.run, args.out)
        print(f"weak labels for {n} tiles -> {args.out} (a starting point: review before fitting)")
    return 0


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="train / val_in / val_out / guidance, split shards and leakage audit")
    p.add_argument("--run", required=True, type=Path, help="tile run folder")
    p.add_argument("--out", type=Path, help="default: RUN/splits")
    p.add_argument("--curation", type=Path, help="default: RUN/curation.parquet when present")
    p.add_argument("--val-out-fraction", type=cli_type(fraction), default=0.1)
    p.add_argument("--val-in-fraction", type=cli_type(fraction), default=0.02)
    p.add_argument("--guidance-tiles", type=cli_type(non_negative, int), default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=cli_type(positive, int), default=10_000)
    p.add_argument("--jpeg-quality", type=cli_type(positive, int), help="also write JPEG copies (ablation), e.g. 70")
    p.add_argument("--expand-px", type=cli_type(non_negative, int), default=0,
                   help="also write tiles expanded by this many px per side (16)")
    p.add_argument("--min-blur", type=cli_type(non_negative),
                   help="leave out tiles whose qc_blur (variance of the Laplacian at 1 um/px) is below this, e.g. 50")
    p.add_argument("--max-pen", type=cli_type(fraction), help="leave out tiles whose pen-ink fraction qc_pen is above this")
    p.add_argument("--min-qc-tissue", type=cli_type(fraction), help="leave out tiles whose tissue fraction qc_tissue is below this")
    p.add_argument("--overwrite", action="store_true", help="replace a split made with other settings or inputs")
    p.add_argument("--workers", type=cli_type(positive, int), default=1,
                   help="processes for the shuffle (the bytes do not depend on it)")
    add_cluster_options(p)


def cmd_split(args) -> int:
    cfg = SplitConfig(args.val_out_fraction, args.val_in_fraction, args.guidance_tiles, args.seed, args.shard_size,
                      args.jpeg_quality, args.expand_px, args.min_blur, args.max_pen, args.min_qc_tissue)
    if args.jpeg_quality is not None and args.jpeg_quality > 100:
        raise UsageError(f"--jpeg-quality must be in [1, 100], got {args.jpeg_quality}")
    res = run_split(args.run, args.out, cfg, args.curation, args.overwrite, cluster_spec(args))
    print(res["sizes"])
    print(f"split shards: {res['counts']}; left out by QC thresholds: {res['removed_by_qc']}; "
          f"audit: {'OK' if res['ok'] else 'LEAKAGE'}")
    print("phase seconds (tiles/s): " + ", ".join(
        f"{k} {v:.1f} ({res['tiles'] / max(v, 1e-9):,.0f})" for k, v in res["seconds"].items()))
    return 0 if res["ok"] else 1


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="H0-mini CLS and 14x14 tokens into the shards (cls.npy, tok.npy)")
    p.add_argument("--shards", required=True,
                   help="folder of shards, or an fsspec URL prefix (s3://...); rewritten in place, atomically")
    p.add_argument("--h0-mini-weights", required=True,
                   help="local H0-mini weights (safetensors or torch); 'random:small' for a random test network")
    p.add_argument("--batch-size", type=cli_type(positive, int), default=256)
    p.add_argument("--device")
    p.add_argument("--workers", type=cli_type(positive, int), default=1, help="Dask worker processes (--cluster local)")
    p.add_argument("--decode-workers", type=cli_type(positive, int),
                   help="threads decoding PNG tiles while the model runs (default: the CPUs per GPU, at most 8; 2 on CPU)")
    add_cluster_options(p)


def _cpu_cluster(args, world: int):
    """The Dask cluster of the options (None: this process), refused with GPUs or torchrun's ranks."""
    spec = cluster_spec(args)
    cluster = None if spec.kind == "local" else spec
    if cluster is not None and (world > 1 or (args.device or "").startswith("cuda")):
        raise UsageError(f"--scheduler/--cluster run {args.command} on CPU workers; GPUs take RANK/WORLD_SIZE (torchrun)")
    return cluster


def cmd_features(args) -> int:
    from cytosyn_data.features.stage import add_features  # lazy: torch + timm

    rank, world = launched_rank()
    cluster = _cpu_cluster(args, world)
    res = add_features(args.shards, args.h0_mini_weights, args.batch_size, args.device, rank, world, cluster,
                       args.decode_workers)
    print(f"features: {res.shards_done} shard(s) written, {res.shards_skipped} already done, {res.tiles} tiles, "
          f"{res.tiles / res.seconds if res.seconds > 0 and res.tiles else 0:.1f} tiles/s; the model waited "
          f"{res.model_wait:.0%} of its time for decoded tiles" + (" (raise --decode-workers)" if res.model_wait > 0.2 else ""))
    return 0


def cmd_config(args) -> int:
    if args.action == "list":
        for name, file in sorted(SHIPPED.items()):
            print(f"{name:12s} {file}")
        return 0
    if not args.name:
        raise UsageError("config show NAME: give a name (cytosyn-data config list)")
    sys.stdout.write(shipped_config_text(args.name))
    return 0


def cmd_dask_tls(args) -> int:
    ca, cert, key = write_tls_files(args.folder)
    print(f"dask-tls: {ca}, {cert}, {key} (this user only). Scheduler: dask scheduler --protocol tls "
          f"--tls-ca-file {ca} --tls-cert {cert} --tls-key {key}; workers the same with tls://HOST:PORT; "
          f"cytosyn-data: --scheduler tls://HOST:PORT --tls-ca-file {ca} --tls-cert {cert} --tls-key {key}")
    return 0


def cmd_report(args) -> int:
    res = write_report(args.run)
    print(f"report: {res.path} (open it in a browser; it works from disk); slide pictures: {res.drawn} drawn, "
          f"{res.reused} unchanged" + (f", {res.missing} missing (see the warning)" if res.missing else ""))
    return 0


def cmd_export_h5(args) -> int:
    out = args.out or args.run / "h5" / args.format
    paths = export_h5(args.run, args.format, out)
    use = {"trident": f"TRIDENT: run_feature_extraction_job(coords_dir='{out}')",
           "clam": f"CLAM: extract_features_fp.py --data_h5_dir {out}"}[args.format]
    print(f"export-h5: {len(paths)} slide(s) -> {out / 'patches'} ({use})")
    return 0


def cmd_export_geojson(args) -> int:
    paths = export_geojson(args.run)
    print(f"export-geojson: {len(paths)} slide(s) -> {args.run / 'geojson'} (QuPath: File > Import objects)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cytosyn-data", description=__doc__,
                                     epilog="--debug (anywhere): show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tile(sub)
    m = sub.add_parser("merge", help="join the part tables of a run split with --num-shards")
    m.add_argument("--out", required=True, type=Path)
    _add_curate(sub)
    _add_split(sub)
    _add_features(sub)
    g = sub.add_parser("export-geojson", help="QuPath GeoJSON per slide: tissue contours and tile boxes by fate")
    g.add_argument("--run", required=True, type=Path, help="tile run folder")
    h = sub.add_parser("export-h5", help="the written tiles' level-0 coordinates per slide, as TRIDENT or CLAM reads them")
    h.add_argument("--run", required=True, type=Path, help="tile run folder")
    h.add_argument("--format", choices=H5_FORMATS, default="trident",
                   help="trident: OUT/patches/{name}_patches.h5 (patch_size at the target magnification); "
                        "clam: OUT/patches/{name}.h5 (patch_size in pixels of patch_level)")
    h.add_argument("--out", type=Path, help="output folder (default RUN/h5/FORMAT)")
    t = sub.add_parser("dask-tls", help="temporary TLS credentials (CA, certificate, key) for a Dask scheduler "
                                        "and workers started by hand, e.g. in a SLURM allocation")
    t.add_argument("folder", type=Path, help="a private folder on a filesystem the nodes share")
    c = sub.add_parser("config", help="the configs shipped with cytosyn: list them, or print one to start from")
    c.add_argument("action", choices=("list", "show"))
    c.add_argument("name", nargs="?", help="tile, tiny, xl, eval")
    r = sub.add_parser("report", help="static HTML page of a run: slides with tiles by fate, tables, curation, audit")
    r.add_argument("--run", required=True, type=Path, help="tile run folder")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"tile": cmd_tile, "merge": cmd_merge, "curate": cmd_curate, "split": cmd_split, "features": cmd_features,
                "export-geojson": cmd_export_geojson, "report": cmd_report,
                "export-h5": cmd_export_h5, "config": cmd_config,
                "dask-tls": cmd_dask_tls}
    return commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a data error or failed inputs (named on stderr), 2 a usage error."""
    return run_cli("cytosyn-data", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
