"""Generation from a trained checkpoint: conditions -> latents (sampler) -> tiles.

Uses the EMA SiT, the EMA VAE and the EMA latent statistics. Sample i's noise depends only
on (seed, i), so results do not depend on the batch size, nor on how the samples are split over
processes: :func:`generate_units` writes units of ``shard_size`` samples (one shard, or that many
PNG files, each), process r of a job of N (torchrun / accelerate launch) doing units j % N == r; a
re-run skips the units already written.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.png import decode_png, encode_png
from cytosyn_data.io.tar_write import write_tar_atomic
from cytosyn_encoders.h0mini import build_h0_mini, h0_mini_features

from .data import every_shard, shard_urls
from .grid import save_grid, to_uint8
from .latent_norm import LatentNorm
from .sampling import SAMPLERS, sit_velocity_fn
from .sit import SiT, SiTConfig
from .vae import AutoencoderKL, VAEConfig
from .vae_keys import diffusers_to_ldm_vae


@dataclass
class Generator:
    sit: SiT
    vae: AutoencoderKL
    bn: LatentNorm
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> "Generator":
        """Load the EMA models of a `cytosyn-train` checkpoint folder (safetensors)."""
        path = Path(path)
        if not (path / "models.safetensors").exists():
            raise FileNotFoundError(f"{path}: not a cytosyn-train checkpoint (no models.safetensors)")
        conf = json.loads((path / "state.json").read_text())["config"]
        vcfg = VAEConfig(**{**conf["vae"], "ch_mult": tuple(conf["vae"].get("ch_mult", (1, 2, 4, 4)))})
        scfg = SiTConfig(**conf["sit"])
        sit, vae, bn = SiT(scfg), AutoencoderKL(vcfg), LatentNorm(vcfg.z_channels, conf["bn_momentum"], conf["bn_eps"])
        tensors = load_file(str(path / "models.safetensors"))
        for name, m in (("ema_sit", sit), ("ema_vae", vae), ("ema_bn", bn)):
            sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            m.load_state_dict(sub)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(sit.eval().to(dev), vae.eval().to(dev), bn.eval().to(dev), dev)

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str | None = None) -> "Generator":
        """Load a folder written by `cytosyn-export` (diffusers-style: vae/, transformer/, latent stats)."""
        path = Path(path)
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path}: not a cytosyn-export model folder (no model_index.json)")
        sconf = {k: v for k, v in json.loads((path / "transformer" / "config.json").read_text()).items()
                 if not k.startswith("_")}
        vconf = json.loads((path / "vae" / "config.json").read_text())
        ch = vconf["block_out_channels"][0]
        vcfg = VAEConfig(ch=ch, ch_mult=tuple(b // ch for b in vconf["block_out_channels"]),
                         num_res_blocks=vconf["layers_per_block"], z_channels=vconf["latent_channels"])
        sit, vae = SiT(SiTConfig(**sconf)), AutoencoderKL(vcfg)
        vae.load_state_dict(diffusers_to_ldm_vae(load_file(str(path / "vae" / "diffusion_pytorch_model.safetensors"))))
        sit.load_state_dict(load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors")))
        stats = load_file(str(path / "latent_stats.safetensors"))
        bn = LatentNorm(vcfg.z_channels, eps=float(stats["eps"][0]))
        bn.set_statistics(stats["mean"], stats["var"])
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(sit.eval().to(dev), vae.eval().to(dev), bn.eval().to(dev), dev)

    @torch.no_grad()
    def generate(
        self,
        cond: torch.Tensor | None,
        n: int,
        seed: int = 0,
        batch_size: int = 64,
        sampler: str = "sde",
        steps: int = 250,
        cfg_scale: float = 2.5,
        guidance_low: float = 0.0,
        guidance_high: float = 0.75,
        dtype: torch.dtype = torch.float32,
        first: int = 0,
    ) -> np.ndarray:
        """``n`` tiles as uint8 [n, H, W, 3]; ``cond`` [n, D] (None: unconditional). The tiles are
        samples ``first`` .. ``first + n - 1`` of the seed: sample i's noise depends on (seed, i) only."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
        c, s = self.sit.cfg.in_channels, self.sit.cfg.input_size
        fn = sit_velocity_fn(self.sit, dtype)
        out = []
        for start in range(0, n, batch_size):
            idx = range(first + start, first + min(n, start + batch_size))
            noise = torch.stack(
                [torch.randn(c, s, s, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in idx]
            ).to(self.device)
            y = cond[start : start + len(idx)].to(self.device) if cond is not None else None
            kw = dict(steps=steps, cfg_scale=cfg_scale if y is not None else 1.0, guidance_low=guidance_low, guidance_high=guidance_high)
            if sampler == "sde":  # per-sample path noise: results do not depend on the batch size
                kw["generator"] = [torch.Generator().manual_seed(seed * 1_000_003 + i + 2**40) for i in idx]
            z = SAMPLERS[sampler](fn, noise, y, **kw)
            images = self.vae.decode(self.bn.denormalize(z.float()))
            out.append(to_uint8(images))
        return np.concatenate(out) if out else np.zeros((0, 8 * s, 8 * s, 3), np.uint8)


def conditions_for_mode(mode: str, ref: torch.Tensor | None, n: int, steps_between: int = 8) -> torch.Tensor | None:
    """Condition rows for a generation mode.

    cond: one sample per reference row (``n`` rows, cycling); uncond: None; variations: the
    first reference repeated ``n`` times; interpolate: ``steps_between`` points on the line
    between the first two references.
    """
    if mode == "uncond":
        return None
    if ref is None or ref.shape[0] == 0:
        raise ValueError(f"mode {mode!r} needs reference features")
    if mode == "cond":
        return ref[torch.arange(n) % ref.shape[0]]
    if mode == "variations":
        return ref[:1].expand(n, -1).clone()
    if mode == "interpolate":
        if ref.shape[0] < 2:
            raise ValueError("mode 'interpolate' needs two reference tiles")
        w = torch.linspace(0, 1, steps_between).view(-1, 1)
        return (1 - w) * ref[0:1] + w * ref[1:2]
    raise ValueError(f"unknown mode {mode!r}; known: cond, uncond, variations, interpolate")


@dataclass(frozen=True)
class SampleSettings:
    """How samples are drawn (what ``cytosyn-sample`` records in the output's run.json)."""

    seed: int = 0
    sampler: str = "sde"
    steps: int = 250
    cfg_scale: float = 2.5
    guidance_low: float = 0.0
    guidance_high: float = 0.75


def sample_units(n: int, shard_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, range]]:
    """(unit index j, sample indices) of the units of process ``rank``: samples [j*shard_size,
    (j+1)*shard_size) for every j with j % world == rank."""
    return [(j, range(lo, min(n, lo + shard_size))) for j, lo in enumerate(range(0, n, shard_size)) if j % world == rank]


def unit_shard(out: Path, j: int) -> Path:
    return out / f"generated-{j:06d}.tar"


def unit_done(out: Path, fmt: str, j: int, keys: list[str]) -> bool:
    """A unit is written when its shard exists (``shards``) or every one of its PNG files does."""
    if fmt == "shards":
        return unit_shard(out, j).exists()
    return all((out / f"{k}.png").exists() for k in keys)


def write_unit(images: np.ndarray, keys: list[str], out: Path, fmt: str, j: int) -> None:
    """PNG files ``{key}.png``, or the shard ``generated-{j:06d}.tar`` ({key}.png, {key}.json), each by
    temporary name and rename."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        for key, img in zip(keys, images):
            atomic_write_bytes(out / f"{key}.png", encode_png(img), durable=False)
    elif fmt == "shards":
        members = []
        for key, img in zip(keys, images):
            members += [(f"{key}.png", encode_png(img)), (f"{key}.json", json.dumps({"key": key}).encode())]
        write_tar_atomic(unit_shard(out, j), members)
    else:
        raise ValueError(f"unknown output format {fmt!r}")


def generate_units(gen: Generator, cond: torch.Tensor | None, keys: list[str], out: Path, fmt: str,
                   settings: SampleSettings, batch_size: int = 64, shard_size: int = 1000, rank: int = 0,
                   world: int = 1) -> dict[str, int]:
    """Sample ``len(keys)`` tiles (sample i conditioned on ``cond[i]``, or unconditional) into ``out``:
    this process's units (:func:`sample_units`), skipping those already written; unit 0 also writes
    ``grid.png`` of its first 64 tiles. Returns {"written": tiles, "skipped": tiles}."""
    written = skipped = 0
    units = sample_units(len(keys), shard_size, rank, world)
    for j, idx in tqdm(units, desc="sample", unit="unit", disable=rank != 0 or len(units) < 2):
        unit_keys = keys[idx.start:idx.stop]
        if unit_done(out, fmt, j, unit_keys):
            skipped += len(idx)
            continue
        images = gen.generate(cond[idx.start:idx.stop] if cond is not None else None, len(idx), settings.seed,
                              batch_size, settings.sampler, settings.steps, settings.cfg_scale, settings.guidance_low,
                              settings.guidance_high, first=idx.start)
        write_unit(images, unit_keys, out, fmt, j)
        if j == 0:
            try:  # a picture never fails the stage
                save_grid(images[:64], out / "grid.png")
            except Exception as exc:  # noqa: BLE001
                print(f"cytosyn-sample: warning: grid.png not written ({type(exc).__name__}: {exc})")
        written += len(idx)
    return {"written": written, "skipped": skipped}


def load_reference_features(shards, keys: list[str] | None, h0_weights: str | None = None,
                            limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    """CLS features of reference tiles: the shards' ``cls.npy``, else computed with H0-mini."""
    model = None
    names, feats = [], []
    for sample in wds.WebDataset(shard_urls(shards), shardshuffle=False, nodesplitter=every_shard):
        if keys and sample["__key__"] not in keys:
            continue
        if "cls.npy" in sample:
            f = torch.from_numpy(np.load(io.BytesIO(sample["cls.npy"])).astype(np.float32))
        else:
            if model is None:
                if not h0_weights:
                    raise FileNotFoundError("reference shards have no cls.npy and no --h0-mini-weights was given")
                model = build_h0_mini(h0_weights)
            img = torch.from_numpy(decode_png(sample["png"]).copy()).permute(2, 0, 1)[None].float() / 255
            f = h0_mini_features(model, img)[0][0]
        names.append(sample["__key__"])
        feats.append(f)
        if limit and len(names) >= limit:
            break
    if keys:
        missing = sorted(set(keys) - set(names))
        if missing:
            raise KeyError(f"reference keys not found in the shards: {missing[:5]}")
        order = [names.index(k) for k in keys]
        names, feats = [names[i] for i in order], [feats[i] for i in order]
    return names, torch.stack(feats) if feats else torch.zeros(0)
