"""``cytosyn-data``: the command line of the data stages (thin wrappers over pure functions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiles_arg(value: str) -> int | None:
    if value.lower() == "all":
        return None
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError("--tiles takes a positive number or 'all'")
    return n


def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="slides -> tissue tiles -> lossless PNG WebDataset shards")
    p.add_argument("--slides", nargs="+", required=True, help="slide files, folders, or one CSV/parquet table")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, help="YAML config (section 'tile'), e.g. pipelines/tile.yaml")
    p.add_argument("--mpp-override", "--mpp", dest="mpp_override", type=float, help="level-0 MPP for every slide")
    p.add_argument("--tiles", type=_tiles_arg, default=argparse.SUPPRESS, help="global tile budget or 'all'")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    p.add_argument("--shard-size", type=int, default=argparse.SUPPRESS, help="tiles per shard")
    p.add_argument("--workers", type=int, default=1, help="processes (slides in parallel)")
    p.add_argument("--shard-index", type=int, default=0, help="this job's index (e.g. SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-shards", type=int, default=1, help="number of jobs the slides are split across")
    p.add_argument("--stage", choices=["all", "detect", "extract"], default="all")
    p.add_argument("--keep-staging", action="store_true", help="keep per-slide staging files")


def cmd_tile(args) -> int:
    from .config import load_stage_config
    from .slide_table import build_slide_table
    from .tile_stage import TileConfig, run_tile

    conf = load_stage_config(args.config, "tile")
    for name in ("tiles", "seed", "shard_size"):
        if hasattr(args, name):
            conf[name] = getattr(args, name)
    if isinstance(conf.get("tiles"), str):
        conf["tiles"] = _tiles_arg(conf["tiles"])
    cfg = TileConfig.from_dict(conf)
    if not 0 <= args.shard_index < args.num_shards:
        print(f"error: --shard-index must be in [0, {args.num_shards})", file=sys.stderr)
        return 2
    slides = build_slide_table(args.slides, args.mpp_override)
    res = run_tile(
        slides,
        args.out,
        cfg,
        workers=args.workers,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        stage=args.stage,
        keep_staging=args.keep_staging,
    )
    print(
        f"\ncytosyn-data tile: {res.n_slides} slide(s), {len(res.failed)} failed, "
        f"{res.n_candidates} candidates, {res.n_tiles} tiles in {res.n_shards} shard(s) -> {res.out}"
    )
    for k, v in res.seconds.items():
        print(f"  {k:8s} {v:8.2f} s")
    if res.failed:
        print(f"FAILED slides ({len(res.failed)}): {', '.join(res.failed)}  (see slides.parquet / report.md)")
        return 1
    return 0


def cmd_merge(args) -> int:
    from .tile_stage import merge_parts

    counts = merge_parts(args.out)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cytosyn-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tile(sub)
    m = sub.add_parser("merge", help="join the part tables of a run split with --num-shards")
    m.add_argument("--out", required=True, type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tile":
        return cmd_tile(args)
    if args.command == "merge":
        return cmd_merge(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
