"""`cytosyn-export`: a trained checkpoint -> a diffusers-style model folder.

    DIR/model_index.json          the parts and their classes
    DIR/vae/config.json           a diffusers ``AutoencoderKL`` config
    DIR/vae/diffusion_pytorch_model.safetensors   the EMA VAE in diffusers' names (loads with
                                  ``diffusers.AutoencoderKL.from_pretrained(DIR / "vae")``)
    DIR/transformer/config.json   our SiT config (``cytosyn_model.sit.SiTConfig``)
    DIR/transformer/diffusion_pytorch_model.safetensors   the EMA SiT
    DIR/latent_stats.safetensors  mean, std [C] of the latents (the EMA BatchNorm): z_model = (z - mean) / std
    DIR/sampler.json              the sampler defaults (sampler, steps, CFG scale and interval)
    DIR/README.md                 a model card: training steps, config, data and encoder provenance

``Generator.from_model_dir(DIR)`` (``cytosyn-sample --model DIR``) gives the same samples as the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from cytosyn_data.core.errors import UsageError
from cytosyn_data.core.secrets import redact_text

from .generate import Generator
from .vae_keys import ldm_to_diffusers_vae


def diffusers_vae_config(vcfg, image_size: int) -> dict:
    """The ``AutoencoderKL`` config of our VAE (GroupNorm 32, SiLU, no scaling: see latent_stats)."""
    levels = len(vcfg.ch_mult)
    chans = [vcfg.ch * m for m in vcfg.ch_mult]
    if any(c % 32 for c in chans):
        raise UsageError(f"diffusers' AutoencoderKL uses 32 GroupNorm groups everywhere; this VAE's channels {chans} "
                         "are not all multiples of 32 (its norms use 8 groups): it cannot be exported")
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [vcfg.ch * m for m in vcfg.ch_mult], "layers_per_block": vcfg.num_res_blocks,
            "act_fn": "silu", "latent_channels": vcfg.z_channels, "norm_num_groups": 32, "sample_size": image_size,
            "scaling_factor": 1.0, "force_upcast": True}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def export_model(checkpoint: str | Path, out: str | Path, sampler: dict | None = None,
                 tile_run: str | Path | None = None) -> Path:
    """Write the model folder of a `cytosyn-train` checkpoint (EMA weights) into ``out``; returns it.
    ``tile_run``: the tile run the training shards came from, for the model card's data provenance."""
    checkpoint, out = Path(checkpoint), Path(out)
    gen = Generator.from_checkpoint(checkpoint, "cpu")
    state = json.loads((checkpoint / "state.json").read_text())
    vcfg, scfg = gen.vae.cfg, gen.sit.cfg
    image = scfg.input_size * vcfg.downsample
    vae_config = diffusers_vae_config(vcfg, image)  # refuses a VAE diffusers cannot express, before writing
    _save(ldm_to_diffusers_vae(gen.vae.state_dict(), len(vcfg.ch_mult)), out / "vae" / "diffusion_pytorch_model.safetensors")
    (out / "vae" / "config.json").write_text(json.dumps(vae_config, indent=1))
    _save(gen.sit.state_dict(), out / "transformer" / "diffusion_pytorch_model.safetensors")
    (out / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "SiT", "_library": "cytosyn_model.sit", **dataclasses.asdict(scfg)}, indent=1, default=list))
    bn = gen.bn.bn
    _save({"mean": bn.running_mean, "var": bn.running_var, "eps": torch.tensor([bn.eps]),
           "std": torch.sqrt(bn.running_var + bn.eps)}, out / "latent_stats.safetensors")
    defaults = {"sampler": "sde", "steps": 250, "cfg_scale": 2.5, "guidance_low": 0.0, "guidance_high": 0.75, **(sampler or {})}
    (out / "sampler.json").write_text(json.dumps(defaults, indent=1))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "CytoSynPipeline", "_cytosyn_version": state.get("code_version"),
        "vae": ["diffusers", "AutoencoderKL"], "transformer": ["cytosyn_model.sit", "SiT"],
        "latent_stats": "latent_stats.safetensors", "sampler": "sampler.json"}, indent=1))
    (out / "README.md").write_text(redact_text(model_card(checkpoint, state, image, defaults, provenance(tile_run))))
    return out


def provenance(tile_run: str | Path | None) -> dict:
    """Slides, tiles per TSS and split, and the feature encoders' weight digests of a tile run."""
    if tile_run is None:
        return {}
    run = Path(tile_run)
    out: dict = {"tile_run": str(run)}
    if (run / "slides.parquet").exists():
        slides = pl.read_parquet(run / "slides.parquet").filter(pl.col("status") == "ok")
        out["slides"] = slides.height
        out["tss_counts"] = dict(slides.group_by(pl.col("tss").fill_null("(none)")).len().sort("tss").iter_rows())
    if (run / "splits.parquet").exists():
        out["tiles_per_split"] = dict(pl.read_parquet(run / "splits.parquet").group_by("split").len().sort("split").iter_rows())
    markers = sorted((run / "splits").glob("*/.features/*.json")) if (run / "splits").exists() else []
    out["encoder_weights"] = sorted({json.loads(m.read_text()).get("model") for m in markers}) or None
    return out


def model_card(checkpoint: Path, state: dict, image: int, sampler: dict, data: dict) -> str:
    """A README: what the model is, how it was trained (steps, config), on what data, with which encoders."""
    conf = state.get("config", {})
    lines = ["# cytosyn model", "",
             f"REPA-E latent diffusion (SiT + f8 VAE, trained end to end) generating {image}x{image} H&E tiles at "
             f"0.5 microns per pixel, conditioned on H0-mini CLS features. Exported from `{checkpoint}`.", "",
             "## Use", "", "```", "cytosyn-sample --model THIS_FOLDER --out samples --mode cond --ref-shards SHARDS",
             "```", "The VAE loads in diffusers: `AutoencoderKL.from_pretrained(THIS_FOLDER / 'vae')`; decode "
             "`z * std + mean` (latent_stats.safetensors) for a SiT latent `z`.", "",
             "## Training", "", f"- steps: {state.get('step')}", f"- code version: {state.get('code_version')}",
             f"- sampler defaults: {json.dumps(sampler)}", "", "## Data and encoders", ""]
    for k in ("tile_run", "slides", "tss_counts", "tiles_per_split", "encoder_weights", "h0_mini_weights"):
        v = data.get(k, conf.get(k))
        if v is not None:
            lines.append(f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    lines += ["", "## Config", "", "```json", json.dumps(conf, indent=1, default=str), "```", ""]
    return "\n".join(lines)
