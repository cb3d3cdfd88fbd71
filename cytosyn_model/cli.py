"""Command lines of the model package: ``cytosyn-train`` and ``cytosyn-sample``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cytosyn_data.core.checks import cli_type, fraction, non_negative, positive
from cytosyn_data.core.config import load_stage_config
from cytosyn_data.core.errors import UsageError, run_cli
from cytosyn_data.core.executors import launched_rank, rank_device
from cytosyn_data.run.state import check_run_file, files_digest

from .distributed import end_job, start_cpu_group
from .eval.run import EvalConfig, evaluate
from .export import export_model
from .generate import Generator, SampleSettings, conditions_for_mode, generate_units, load_reference_features
from .train import NaNLossError, TrainConfig, train


def _train(argv: list[str] | None) -> int:

    p = argparse.ArgumentParser(prog="cytosyn-train", description="REPA-E end-to-end training; one job over several "
                                "processes under torchrun / accelerate launch (GPUs: NCCL, CPUs: gloo)")
    p.add_argument("--shards", nargs="+", required=True, help="shard folder(s), .tar files or brace patterns")
    p.add_argument("--config", required=True, help="YAML file (section 'train'), or a shipped config: tiny, xl "
                                                   "(cytosyn-data config show xl)")
    p.add_argument("--out", help="run folder (overrides the config)")
    p.add_argument("--max-steps", type=cli_type(positive, int))
    p.add_argument("--resume", default="auto", help="'auto' (newest checkpoint in the run folder), a checkpoint folder, or 'none'")
    p.add_argument("--accept-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the differences are listed)")
    args = p.parse_args(argv)
    conf = load_stage_config(args.config, "train")
    if args.out:
        conf["out"] = args.out
    if args.max_steps:
        conf["max_steps"] = args.max_steps
    cfg = TrainConfig.from_dict(conf, where=f"{args.config} (section train)")
    try:
        t = train(cfg, args.shards, resume=None if args.resume == "none" else args.resume,
                  accept_config_change=args.accept_config_change)
    except NaNLossError as exc:  # raised on every rank at once (the loss terms are gathered)
        print(f"cytosyn-train: stopped: {exc}", file=sys.stderr)
        return 3
    if t.acc.is_main_process:
        print(f"cytosyn-train: step {t.step}; checkpoints in {Path(cfg.out) / 'checkpoints'}, log {Path(cfg.out) / 'log.jsonl'}")
    end_job()
    return 0


def _sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cytosyn-sample", description="Generate tiles from a cytosyn-train checkpoint; "
                                "under torchrun / accelerate launch each process writes its share of the units")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a cytosyn-train checkpoint folder")
    src.add_argument("--model", type=Path, help="a folder written by cytosyn-export")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=["cond", "uncond", "variations", "interpolate"], default="cond")
    p.add_argument("--ref-shards", nargs="*", help="shards of reference tiles (cls.npy, or computed with H0-mini)")
    p.add_argument("--ref-keys", nargs="*", help="keys of the reference tiles (default: the first ones)")
    p.add_argument("--h0-mini-weights", help="local H0-mini weights when the shards have no cls.npy ('random:small': tests)")
    p.add_argument("-n", "--num", type=cli_type(positive, int), default=16)
    p.add_argument("--batch-size", type=cli_type(positive, int), default=64)
    p.add_argument("--shard-size", type=cli_type(positive, int), default=1000,
                   help="samples per unit of work: one shard (--format shards) or that many PNG files; "
                        "units are split over the processes and finished ones are skipped on a re-run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde")
    p.add_argument("--steps", type=cli_type(positive, int), default=250)
    p.add_argument("--cfg-scale", type=cli_type(non_negative), default=2.5)
    p.add_argument("--guidance-low", type=cli_type(fraction, True), default=0.0)
    p.add_argument("--guidance-high", type=cli_type(fraction, True), default=0.75)
    p.add_argument("--interp-steps", type=cli_type(positive, int), default=8)
    p.add_argument("--format", choices=["png", "shards"], default="png")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when present, else cpu")
    return p


def _sample(argv: list[str] | None) -> int:

    p = _sample_parser()
    args = p.parse_args(argv)
    if args.guidance_low > args.guidance_high:
        raise UsageError(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}")
    if args.sampler == "sde" and args.steps < 2:
        raise UsageError("--steps must be >= 2 for the SDE sampler (the last step is the noise-free one)")
    if args.mode != "uncond" and not args.ref_shards:
        p.error(f"--mode {args.mode} needs --ref-shards")
    rank, world = launched_rank()
    device = rank_device(args.device)
    gen = Generator.from_model_dir(args.model, device) if args.model else Generator.from_checkpoint(args.checkpoint, device)
    ref_keys, ref = [], None
    if args.mode != "uncond":
        need = {"cond": args.num, "variations": 1, "interpolate": 2}[args.mode]
        ref_keys, ref = load_reference_features(args.ref_shards, args.ref_keys, args.h0_mini_weights,
                                                limit=None if args.ref_keys else need)
    cond = conditions_for_mode(args.mode, ref, args.num, args.interp_steps)
    n = cond.shape[0] if cond is not None else args.num
    if args.mode == "cond":
        keys = [f"gen__{ref_keys[i % len(ref_keys)]}__s{args.seed}_{i}" for i in range(n)]
    else:
        keys = [f"gen__{args.mode}__s{args.seed}_{i:05d}" for i in range(n)]
    settings = SampleSettings(args.seed, args.sampler, args.steps, args.cfg_scale, args.guidance_low, args.guidance_high)
    source = args.model or args.checkpoint
    conf = {**vars(settings), "mode": args.mode, "n": n, "format": args.format, "shard_size": args.shard_size,
            "interp_steps": args.interp_steps, "ref_keys": files_digest([], "\n".join(ref_keys))}
    # a re-run with the same settings skips the written units; other settings are refused (never mixed)
    check_run_file(args.out, "sample", conf, [f"model: {source} {files_digest(source.rglob('*.safetensors'))}"],
                   overwrite=False, clear=None)
    res = generate_units(gen, cond, keys, args.out, args.format, settings, args.batch_size, args.shard_size, rank, world)
    where = f" (process {rank} of {world})" if world > 1 else ""
    print(f"cytosyn-sample: {res['written']} tiles written, {res['skipped']} already there{where} ({args.mode}, "
          f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}) -> {args.out}")
    return 0


def _eval(argv: list[str] | None) -> int:

    p = argparse.ArgumentParser(prog="cytosyn-eval", description="FD / FLD / precision-recall / cosine of generated vs real tiles")
    p.add_argument("--config", required=True, help="YAML file (section 'eval'), or 'eval', the shipped example")
    p.add_argument("--out", help="output folder (overrides the config)")
    p.add_argument("--decode-workers", type=cli_type(positive, int),
                   help="threads decoding images beside each extractor (overrides the config; default: the CPUs per GPU, "
                        "at most 8; 2 on CPU; the features do not depend on it)")
    args = p.parse_args(argv)
    conf = load_stage_config(args.config, "eval")
    if args.out:
        conf["out"] = args.out
    if args.decode_workers:
        conf["decode_workers"] = args.decode_workers
    cfg = EvalConfig.from_dict(conf, where=f"{args.config} (section eval)")
    rank, world = start_cpu_group()  # torchrun / accelerate launch: each process extracts its share
    df = evaluate(cfg, rank, world)
    if df is not None:
        print(df)
        print(f"cytosyn-eval: {df.height} values -> {Path(cfg.out) / 'metrics.parquet'}, report {Path(cfg.out) / 'report.md'}")
    end_job()
    return 0


def _export(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="cytosyn-export", description="a checkpoint -> a diffusers-style model folder")
    p.add_argument("--checkpoint", required=True, type=Path, help="a cytosyn-train checkpoint folder (EMA weights)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--run", type=Path, help="the tile run of the training data (slides, TSS, encoders in the model card)")
    p.add_argument("--steps", type=cli_type(positive, int), default=250, help="sampler default: steps")
    p.add_argument("--cfg-scale", type=cli_type(non_negative), default=2.5, help="sampler default: CFG scale")
    args = p.parse_args(argv)
    if not (args.checkpoint / "models.safetensors").exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: not a cytosyn-train checkpoint (no models.safetensors)")
    out = export_model(args.checkpoint, args.out, {"steps": args.steps, "cfg_scale": args.cfg_scale}, args.run)
    print(f"cytosyn-export: {args.checkpoint} -> {out} (vae/ loads with diffusers.AutoencoderKL.from_pretrained)")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    return run_cli("cytosyn-export", _export, argv)


def train_main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a data error, 2 a usage error, 3 a non-finite loss."""
    return run_cli("cytosyn-train", _train, argv)


def sample_main(argv: list[str] | None = None) -> int:
    return run_cli("cytosyn-sample", _sample, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return run_cli("cytosyn-eval", _eval, argv)


if __name__ == "__main__":
    sys.exit(train_main())
