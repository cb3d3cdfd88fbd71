"""REPA-E end-to-end training of the VAE and the SiT (`cytosyn-train`).

One step has the phases of REPA-E's ``train_repae.py`` (each a method below, compared with the
reference code in tests/test_repa_e_reference.py), plus CytoSyn's EMA of the VAE:
1. ``encode``: posterior sample z of the images (VAE in train mode);
2. ``vae_phase``: SiT and discriminator frozen; the SiT in eval mode (running latent statistics, no
   condition dropped) gives the alignment loss on z; L1 + LPIPS + KL + GAN + ``proj_coeff_vae`` x
   alignment updates the VAE;
3. ``disc_phase``: ``disc_factor`` x hinge loss (0 before ``gan_start_step``) updates the discriminator;
4. ``sit_phase``: on z.detach(), SiT and latent BatchNorm in train mode (batch statistics, running
   ones updated, conditions dropped with the step's mask): velocity loss + ``proj_coeff_sit`` x
   alignment updates the SiT;
5. ``ema_phase``: EMA of the SiT (with its frozen-then-trainable ``pos_embed``), the VAE and the
   latent statistics.
The same t and path noise serve steps 2 and 4 (:class:`StepNoise`).

Under torchrun / ``accelerate launch`` the job is data parallel over its N processes (see
distributed.py): the models are not wrapped; after each backward pass the gradients of whatever
is trainable in that phase are averaged over the ranks, the latent BatchNorm uses the global batch,
and the loss terms are gathered so that every rank logs their global means and stops together when
one is not finite. N ranks x batch B therefore compute what one process computes with batch N*B
(tests/test_distributed.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cytosyn_data.core.checks import fraction, non_negative, one_of, positive
from cytosyn_data.core.errors import RunStateError, UsageError
from cytosyn_data.core.secrets import redact_text
from cytosyn_data.run.state import code_version
from cytosyn_encoders import weights_identity
from cytosyn_encoders.h0mini import build_h0_mini, h0_mini_features

from . import checkpoint
from .data import make_loader, model_images
from .discriminator import PatchDiscriminator
from .distributed import (
    DEFAULT_TIMEOUT_S,
    GlobalBatchNorm2d,
    average_gradients,
    barrier,
    broadcast_module,
    gather_objects,
    gather_rows,
    launched_world,
    make_accelerator,
)
from .grid import save_grid
from .html_pages import write_train_page
from .latent_norm import LatentNorm
from .losses import VAELossWeights, diffusion_loss, discriminator_loss, repa_loss, upcast, vae_generator_losses
from .lpips import LPIPS
from .path import interpolate
from .sampling import ode_heun, sit_velocity_fn
from .sit import SIZES, SiT, SiTConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["LatentNorm", "NaNLossError", "StepNoise", "TrainConfig", "Trainer", "ema_update", "train"]


@dataclass
class TrainConfig:
    """Every key of ``pipelines/train_*.yaml`` (section ``train``); see docs/model.md."""

    out: str = "runs/train"
    vae: dict = field(default_factory=dict)  # VAEConfig fields
    sit: dict = field(default_factory=dict)  # SiTConfig fields
    vae_init: str | None = None  # VAE weights: REPA-E checkpoint/E2E-VAE, SD-VAE (LDM) or diffusers layout
    sit_init: str | None = None  # SiT trunk weights: REPA-E checkpoint (its ``ema``) or a cytosyn checkpoint
    latent_stats: str | None = None  # per-channel latent mean/std file (REPA-E ``*-latents-stats.pt``)
    batch_size: int = 256  # per process
    max_steps: int = 400_000
    lr: float = 1e-4  # SiT
    vae_lr: float | None = None  # default: lr
    disc_lr: float | None = None  # default: lr
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    ema_decay: float = 0.9999
    proj_coeff_sit: float = 0.5
    proj_coeff_vae: float = 1.5
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_vgg_weights: str | None = None
    lpips_lin_weights: str | None = None
    kl_weight: float = 1e-6
    gan_weight: float = 0.1  # REPA-E discriminator_weight
    disc_factor: float = 1.0  # REPA-E discriminator_factor
    gan_start_step: int = 0  # REPA-E discriminator_start
    disc_channels: int = 64
    bn_momentum: float = 0.1
    bn_eps: float = 1e-4
    h0_mini_weights: str | None = None  # needed when the shards have no cls/tok features ("random:small": tests)
    shuffle_buffer: int = 1000
    num_workers: int = 4
    seed: int = 0
    dist_timeout_s: float = DEFAULT_TIMEOUT_S  # a collective waiting longer for a rank fails the job
    log_every: int = 50
    sample_every: int = 5000
    sample_steps: int = 50
    ckpt_every: int = 5000
    keep_checkpoints: int = 3

    @classmethod
    def from_dict(cls, d: dict, where: str = "train config") -> "TrainConfig":
        """Build and validate; errors name ``where`` (e.g. the YAML file) and the key."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        for section, sub in (("vae", VAEConfig), ("sit", SiTConfig)):
            if not isinstance(d.get(section, {}), dict):
                raise UsageError(f"{where}: {section} must be a mapping, got {d[section]!r}")
            unknown |= {f"{section}.{k}" for k in set(d.get(section, {})) - {f.name for f in dataclasses.fields(sub)}}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("betas"), (list, tuple)):
            d["betas"] = tuple(d["betas"])
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        for k in ("batch_size", "max_steps", "disc_channels", "log_every", "sample_every", "sample_steps",
                  "ckpt_every", "keep_checkpoints"):
            positive(getattr(self, k), f"{where}: {k}", int)
        for k in ("gan_start_step", "num_workers", "shuffle_buffer"):
            non_negative(getattr(self, k), f"{where}: {k}", int)
        for k in ("lr", "adam_eps", "grad_clip", "bn_eps", "dist_timeout_s"):
            positive(getattr(self, k), f"{where}: {k}")
        for k in ("vae_lr", "disc_lr"):
            if getattr(self, k) is not None:
                positive(getattr(self, k), f"{where}: {k}")
        for k in ("weight_decay", "proj_coeff_sit", "proj_coeff_vae", "l1_weight", "lpips_weight", "kl_weight",
                  "gan_weight", "disc_factor"):
            non_negative(getattr(self, k), f"{where}: {k}")
        for k in ("ema_decay", "bn_momentum"):
            fraction(getattr(self, k), f"{where}: {k}", closed=True)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise UsageError(f"{where}: betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            fraction(b, f"{where}: betas")
        one_of(self.mixed_precision, f"{where}: mixed_precision", ("no", "bf16", "fp16"))
        fraction(self.sit.get("class_dropout", 0.1), f"{where}: sit.class_dropout")
        one_of(self.sit.get("size", "XL"), f"{where}: sit.size", SIZES)
        for k in ("input_size", "patch_size", "in_channels", "cond_dim", "encoder_depth", "projector_dim", "z_dim",
                  "depth", "hidden", "heads"):
            if self.sit.get(k) is not None:
                positive(self.sit[k], f"{where}: sit.{k}", int)
        for k in ("ch", "num_res_blocks", "z_channels"):
            if k in self.vae:
                positive(self.vae[k], f"{where}: vae.{k}", int)

    #: keys that may change when a run is resumed (how long, how often to log/save, data workers)
    RESUMABLE_CHANGES = ("out", "max_steps", "log_every", "sample_every", "sample_steps", "ckpt_every",
                         "keep_checkpoints", "num_workers", "dist_timeout_s")

    def differences(self, other: dict) -> list[str]:
        """``key: theirs -> ours`` for every key (outside :attr:`RESUMABLE_CHANGES`) that differs
        from ``other`` (a checkpoint's saved config)."""
        ours = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as saved
        return [f"{k}: {other[k]!r} -> {ours[k]!r}" for k in sorted(ours)
                if k not in self.RESUMABLE_CHANGES and k in other and ours[k] != other[k]]

    def loss_weights(self) -> VAELossWeights:
        return VAELossWeights(l1=self.l1_weight, lpips=self.lpips_weight, kl=self.kl_weight, gan=self.gan_weight)


@dataclass
class StepNoise:
    """The randomness of one step: posterior-sample noise and path noise [B, C, h, w], t [B] in [0, 1),
    condition-drop mask [B] (bool). Drawn once, shared by the VAE and SiT phases."""

    posterior: torch.Tensor
    t: torch.Tensor
    path: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def draw(cls, batch: int, latent: tuple[int, int, int], drop_prob: float, device,
             generator: torch.Generator | None = None) -> "StepNoise":
        shape = (batch, *latent)
        return cls(
            posterior=torch.randn(shape, device=device, generator=generator),
            t=torch.rand(batch, device=device, generator=generator),
            path=torch.randn(shape, device=device, generator=generator),
            drop=torch.rand(batch, device=device, generator=generator) < drop_prob,
        )


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model over parameters and float buffers (BN statistics);
    other buffers are copied. The arithmetic of REPA-E's ``update_ema``."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach().to(pe.dtype), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        if be.dtype.is_floating_point:
            be.mul_(decay).add_(bm.to(be.dtype), alpha=1 - decay)
        else:
            be.copy_(bm)


class NaNLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def build_models(cfg: TrainConfig) -> dict[str, nn.Module]:
    """VAE, SiT, latent norm and discriminator of a run, initialised from ``vae_init`` / ``sit_init`` /
    ``latent_stats`` when given (see checkpoint.py; what is skipped is printed)."""
    vae_cfg = VAEConfig(**{**cfg.vae, "ch_mult": tuple(cfg.vae.get("ch_mult", (1, 2, 4, 4)))})
    vae, sit = AutoencoderKL(vae_cfg), SiT(SiTConfig(**cfg.sit))
    bn = LatentNorm(vae_cfg.z_channels, cfg.bn_momentum, cfg.bn_eps)
    if cfg.vae_init:
        checkpoint.load_vae(vae, cfg.vae_init)
    if cfg.sit_init:
        report = checkpoint.load_sit(sit, cfg.sit_init)
        print(f"cytosyn-train: sit_init: {report.summary()}")
        if report.latent_stats is not None:
            bn.set_statistics(*report.latent_stats)
    if cfg.latent_stats:
        bn.set_statistics(*checkpoint.load_latent_stats(cfg.latent_stats))
    disc = GlobalBatchNorm2d.convert(PatchDiscriminator(cfg.disc_channels))  # global-batch BN statistics
    return {"vae": vae, "sit": sit, "bn": bn, "disc": disc}


class Trainer:
    """Holds the models, optimisers and state of one REPA-E run (one process of it)."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg.mixed_precision, cfg.dist_timeout_s)
        set_seed(cfg.seed)  # the same initial weights on every rank (and rank 0's are broadcast)
        self.device = self.acc.device
        m = build_models(cfg)
        for module in m.values():
            broadcast_module(module.to(self.device))
        self.vae_cfg, self.sit_cfg = m["vae"].cfg, m["sit"].cfg
        self.lpips = None
        if cfg.lpips_weight > 0:
            self.lpips = LPIPS(cfg.lpips_vgg_weights, cfg.lpips_lin_weights).to(self.device)
        self.h0 = None
        self.ema_vae = copy.deepcopy(m["vae"]).requires_grad_(False).eval().to(self.device)
        self.ema_sit = copy.deepcopy(m["sit"]).requires_grad_(False).eval().to(self.device)
        self.ema_bn = copy.deepcopy(m["bn"]).requires_grad_(False).eval().to(self.device)

        def adamw(module, lr):  # every parameter, as REPA-E: pos_embed becomes trainable after step 1
            return torch.optim.AdamW(module.parameters(), lr=lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

        opts = adamw(m["vae"], cfg.vae_lr or cfg.lr), adamw(m["sit"], cfg.lr), adamw(m["disc"], cfg.disc_lr or cfg.lr)
        # the models stay unwrapped (no DistributedDataParallel): _update averages the gradients
        self.vae, self.sit, self.disc, self.bn = m["vae"], m["sit"], m["disc"], m["bn"]
        self.opt_vae, self.opt_sit, self.opt_disc = self.acc.prepare(*opts)
        self.step = 0
        self.out = Path(cfg.out)
        set_seed(cfg.seed, device_specific=True)  # each rank draws its own t, noise and drop mask

    # ------------------------------------------------------------------ inputs
    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls [B, D], tokens [B, 196, D]) in the SiT's dtype, from the shards, else from a frozen H0-mini."""
        dtype = next(self.sit.parameters()).dtype
        if "cls" in batch and "tok" in batch:
            return (batch["cls"].to(self.device, dtype, non_blocking=True),
                    batch["tok"].to(self.device, dtype, non_blocking=True))
        if self.h0 is None:
            if not self.cfg.h0_mini_weights:
                raise FileNotFoundError(
                    "the shards carry no cls.npy/tok.npy features and no h0_mini_weights path is configured: "
                    "run `cytosyn-data features` or give the local H0-mini weights"
                )
            self.h0 = build_h0_mini(self.cfg.h0_mini_weights).to(self.device)
        images01 = (model_images(batch["image"], self.device) + 1) / 2
        with self.acc.autocast():
            cls, tok = h0_mini_features(self.h0, images01)
        return cls.to(dtype), tok.to(dtype)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> StepNoise:
        s = self.sit_cfg.input_size
        return StepNoise.draw(batch, (self.vae_cfg.z_channels, s, s), self.sit_cfg.class_dropout, self.device, generator)

    def disc_factor(self) -> float:
        """REPA-E's discriminator factor at this step: ``disc_factor`` from ``gan_start_step`` on, else 0."""
        return self.cfg.disc_factor if self.step >= self.cfg.gan_start_step else 0.0

    def _record(self, logs: dict, losses: dict[str, torch.Tensor]) -> None:
        """Log the mean over ranks of each (scalar) loss term; a term that is not finite on any rank
        stops every rank with :class:`NaNLossError` naming the step, the term (and the rank)."""
        names = list(losses)
        rows = gather_rows(torch.stack([losses[k].detach().double().reshape(()) for k in names]))
        values = rows.cpu().tolist()
        for i, name in enumerate(names):  # the first term that is not finite, with the rank(s) it is so on
            bad = [r for r, row in enumerate(values) if not math.isfinite(row[i])]
            if bad:
                where = f" on rank {', '.join(map(str, bad))}" if len(values) > 1 else ""
                raise NaNLossError(f"step {self.step + 1}: loss term '{name}' is {values[bad[0]][i]}{where}")
        logs.update(zip(names, rows.mean(0).tolist()))

    def _update(self, loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer) -> float:
        """backward, average the gradients over the ranks, clip to ``grad_clip``, optimiser step, zero
        the gradients; returns the pre-clip norm (of the averaged gradient)."""
        self.acc.backward(loss)
        average_gradients(model.parameters())
        # fp16: unscale this optimizer's gradients only (Accelerator.clip_grad_norm_ unscales every
        # prepared optimizer, and the next phase's call would unscale them twice before the update)
        self.acc.unscale_gradients(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------------ phases
    def encode(self, x: torch.Tensor, noise: StepNoise):
        """Phase 1: (reconstruction, posterior, z) of images [B, 3, H, W] in [-1, 1]; rec and z in
        float32 (or float64) whatever the autocast dtype."""
        self.vae.train()
        with self.acc.autocast():
            rec, post, z = self.vae(x, noise=noise.posterior)
        return upcast(rec), post, upcast(z)

    def vae_losses(self, x, rec, post, z, noise: StepNoise, cls, tok) -> dict[str, torch.Tensor]:
        """Loss terms of phase 2; the caller has frozen the SiT and the discriminator.

        The alignment pass runs the unwrapped SiT in eval mode up to its REPA block on the latents
        normalised with the running statistics, with no condition dropped (REPA-E's ``model.eval()``)."""
        self.sit.eval()
        self.bn.eval()
        losses = vae_generator_losses(x, rec, post, self.cfg.loss_weights(), self.lpips, self.disc, self.disc_factor())
        with self.acc.autocast():
            xt, _ = interpolate(self.bn(z), noise.path, noise.t)
            _, zs = self.sit(xt, noise.t, cls, align_only=True)
            align = repa_loss(zs, tok)
        losses["align_vae"] = align
        losses["vae_total"] = losses.pop("vae_rec") + self.cfg.proj_coeff_vae * align
        return losses

    def vae_phase(self, x, rec, post, z, noise: StepNoise, cls, tok, logs: dict) -> None:
        _requires_grad(self.sit, False)
        _requires_grad(self.disc, False)
        losses = self.vae_losses(x, rec, post, z, noise, cls, tok)
        self._record(logs, losses)
        logs["grad_norm_vae"] = self._update(losses["vae_total"], self.vae, self.opt_vae)
        _requires_grad(self.disc, True)

    def disc_phase(self, x, rec, logs: dict) -> None:
        """Phase 3 (skipped when ``gan_weight`` is 0); runs with factor 0 before ``gan_start_step`` as REPA-E."""
        if self.cfg.gan_weight <= 0:
            return
        factor = self.disc_factor()
        d_loss = discriminator_loss(self.disc, x, rec, factor)
        terms: dict[str, float] = {}
        self._record(terms, {"gan_d": d_loss})
        norm = self._update(d_loss, self.disc, self.opt_disc)
        if factor > 0:
            logs.update(gan_d=terms["gan_d"], grad_norm_disc=norm)

    def sit_losses(self, z, noise: StepNoise, cls, tok) -> dict[str, torch.Tensor]:
        """Loss terms of phase 4 on detached latents (SiT and BatchNorm in train mode)."""
        self.sit.train()
        self.bn.train()
        with self.acc.autocast():
            xt, v_target = interpolate(self.bn(z.detach()), noise.path, noise.t)
            v_pred, zs = self.sit(xt, noise.t, cls, drop=noise.drop)
            denoise = diffusion_loss(v_pred, v_target)
            align = repa_loss(zs, tok)
        return {"denoise": denoise, "align_sit": align, "sit_total": denoise + self.cfg.proj_coeff_sit * align}

    def sit_phase(self, z, noise: StepNoise, cls, tok, logs: dict) -> None:
        _requires_grad(self.sit, True)  # REPA-E's requires_grad(model, True): pos_embed included
        if not self.sit_cfg.learn_null:
            self.sit.y_embedder.null.requires_grad_(False)
        losses = self.sit_losses(z, noise, cls, tok)
        self._record(logs, losses)
        logs["grad_norm_sit"] = self._update(losses["sit_total"], self.sit, self.opt_sit)

    def ema_phase(self) -> None:
        ema_update(self.ema_sit, self.sit, self.cfg.ema_decay)
        ema_update(self.ema_vae, self.vae, self.cfg.ema_decay)
        ema_update(self.ema_bn, self.bn, self.cfg.ema_decay)

    def train_step(self, batch: dict, noise: StepNoise | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """One REPA-E step (see the module docstring); returns the loss terms and grad norms.

        ``noise``: the step's randomness (else drawn from ``generator`` / the global RNG)."""
        x = model_images(batch["image"], self.device)  # uint8 from the loader (pinned on CUDA), or floats
        cls, tok = self._features(batch)
        noise = noise or self.draw_noise(x.shape[0], generator)
        logs: dict[str, float] = {}
        rec, post, z = self.encode(x, noise)
        self.vae_phase(x, rec, post, z, noise, cls, tok, logs)
        self.disc_phase(x, rec, logs)
        self.sit_phase(z, noise, cls, tok, logs)
        self.ema_phase()
        self.step += 1
        return logs

    # ------------------------------------------------------------ checkpoints
    def modules(self) -> dict[str, nn.Module]:
        return {
            "vae": self.vae, "sit": self.sit, "disc": self.disc, "bn": self.bn,
            "ema_vae": self.ema_vae, "ema_sit": self.ema_sit, "ema_bn": self.ema_bn,
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """``{out}/checkpoints/step_{N}/``: models.safetensors, optim.pt, rng.pt (every rank's generator
        states), state.json. Every rank calls it; rank 0 writes (temporary name, rename) while the
        others wait, so the folder is written once and complete when any rank goes on."""
        final = Path(path) if path else self.out / "checkpoints" / f"step_{self.step:07d}"
        rng_states = gather_objects(self._rng_state())
        if self.acc.is_main_process:
            tmp = final.with_name(final.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self._write_checkpoint(tmp, rng_states)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune_checkpoints(final.parent)
        barrier()
        return final

    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _write_checkpoint(self, folder: Path, rng_states: list[dict]) -> None:

        tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for name, m in self.modules().items() for k, v in m.state_dict().items()}
        save_file(tensors, str(folder / "models.safetensors"))
        torch.save({"vae": self.opt_vae.state_dict(), "sit": self.opt_sit.state_dict(), "disc": self.opt_disc.state_dict()},
                   folder / "optim.pt")
        torch.save({"world_size": len(rng_states), "ranks": rng_states}, folder / "rng.pt")
        state = {"step": self.step, "world_size": len(rng_states), "config": dataclasses.asdict(self.cfg),
                 "code_version": code_version()}
        state["weights_sha256_16"] = {  # every weights file that influenced this checkpoint
            k: weights_identity(getattr(self.cfg, k))
            for k in ("vae_init", "sit_init", "latent_stats", "h0_mini_weights", "lpips_vgg_weights", "lpips_lin_weights")
            if getattr(self.cfg, k)
        }
        (folder / "state.json").write_text(redact_text(json.dumps(state, indent=1)))  # no credential in a URL

    def _prune_checkpoints(self, folder: Path) -> None:
        done = sorted(p for p in folder.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore models, EMA, BN statistics, optimisers, step and RNG (weights_only loads)."""
        path = Path(path)
        tensors = load_file(str(path / "models.safetensors"))
        for name, m in self.modules().items():
            sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            m.load_state_dict(sub)
        opt = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        self.opt_vae.load_state_dict(opt["vae"])
        self.opt_sit.load_state_dict(opt["sit"])
        self.opt_disc.load_state_dict(opt["disc"])
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        states = rng.get("ranks", [rng])  # before multi-process checkpoints: one state, one process
        if len(states) != self.acc.num_processes:
            raise RunStateError(f"{path}: written by a job of {len(states)} process(es), this job has "
                                f"{self.acc.num_processes}: resume it with {len(states)}")
        mine = states[self.acc.process_index]
        torch.set_rng_state(mine["torch"])
        cuda = mine.get("cuda")
        if cuda is not None and self.device.type == "cuda":
            if isinstance(cuda, (list, tuple)):  # before: every device's state, saved by the one process
                torch.cuda.set_rng_state_all(cuda)
            else:
                torch.cuda.set_rng_state(cuda, self.device)
        self.step = json.loads((path / "state.json").read_text())["step"]

    # ---------------------------------------------------------------- samples
    @torch.no_grad()
    def sample_grid(self, cls: torch.Tensor, path: Path, steps: int | None = None) -> Path:
        """EMA samples conditioned on ``cls`` [n, D] (ODE Heun), written as a grid PNG."""
        n = cls.shape[0]
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        size = self.sit_cfg.input_size
        noise = torch.randn(n, self.vae_cfg.z_channels, size, size, generator=g).to(self.device)
        z = ode_heun(sit_velocity_fn(self.ema_sit), noise, cls.to(self.device), steps=steps or self.cfg.sample_steps, cfg_scale=1.0)
        images = self.ema_vae.decode(self.ema_bn.denormalize(z.float()))
        return save_grid(images, path)


def check_resume_config(cfg: TrainConfig, checkpoint: Path, accept: bool) -> None:
    """Refuse to resume ``checkpoint`` with a config that differs from its own (listing the keys)
    unless ``accept``; operational keys (:attr:`TrainConfig.RESUMABLE_CHANGES`) may differ."""
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    saved_world, world = state.get("world_size", 1), launched_world()
    if saved_world != world:
        raise RunStateError(
            f"{checkpoint}: written by a job of {saved_world} process(es), this job has {world}: resume with "
            f"{saved_world} processes (each rank's data stream and RNG continue), or train into another --out"
        )
    diff = cfg.differences(state["config"])
    if diff and not accept:
        raise RunStateError(
            f"{checkpoint}: the config differs from the checkpoint's ({'; '.join(diff)}); resume with "
            "--accept-config-change to use the new values, or train into another --out"
        )
    if diff:
        print(f"cytosyn-train: resuming {checkpoint} with changed config: {'; '.join(diff)}")


def train(cfg: TrainConfig, shards, resume: str | Path | None = "auto", stop_after: int | None = None,
          accept_config_change: bool = False) -> Trainer:
    """Run (or resume) training on ``shards`` until ``cfg.max_steps`` (or ``stop_after`` more steps).

    ``resume='auto'`` picks the newest checkpoint under ``{out}/checkpoints``; its saved config must
    equal ``cfg`` (see :func:`check_resume_config`).
    """
    out = Path(cfg.out)
    ckpts = out / "checkpoints"
    if resume == "auto":
        found = sorted(p for p in ckpts.glob("step_*") if not p.name.endswith(".tmp")) if ckpts.exists() else []
        resume = found[-1] if found else None
    if resume:
        check_resume_config(cfg, Path(resume), accept_config_change)
    trainer = Trainer(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint(resume)
    loader = make_loader(
        shards, cfg.batch_size, seed=cfg.seed, rank=trainer.acc.process_index,
        num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, batches_done=trainer.step,
        count_cache=Path(cfg.out) / "shard_samples.json", pin_memory=trainer.device.type == "cuda",
    )
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, trainer.step + stop_after)
    # the bar is closed before an error propagates, so the error line is the last thing printed
    with tqdm(total=end, initial=trainer.step, desc="train", unit="step", disable=not trainer.acc.is_main_process) as bar:
        _run_steps(trainer, iter(loader), end, out, bar)
    if trainer.acc.is_main_process:  # loss curves and sample grids as a page (report/index.html)
        write_train_page(out)
    return trainer


def _run_steps(trainer: Trainer, it, end: int, out: Path, bar) -> None:
    """Steps until ``end``: log every ``log_every`` (:func:`_log_interval`), checkpoint every
    ``ckpt_every`` and write an EMA sample grid every ``sample_every`` steps (and at the end); a run
    that waited for data more than 10% of its time says so at the end."""
    cfg = trainer.cfg
    interval = {"t0": time.perf_counter(), "seen": 0, "wait": 0.0}
    waits = [0.0, 0.0]  # seconds waiting for batches, seconds in all, over the logged intervals
    sample_cls = None
    while trainer.step < end:
        tw = time.perf_counter()
        batch = next(it)
        interval["wait"] += time.perf_counter() - tw
        logs = trainer.train_step(batch)
        if sample_cls is None:
            sample_cls = trainer._features(batch)[0][:8]
        interval["seen"] += batch["image"].shape[0] * trainer.acc.num_processes
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == end:
            waits = [w + d for w, d in zip(waits, _log_interval(trainer, logs, interval, out, bar))]
        if trainer.step % cfg.ckpt_every == 0 or trainer.step == end:
            trainer.save_checkpoint()
        if (trainer.step % cfg.sample_every == 0 or trainer.step == end) and trainer.acc.is_main_process:
            trainer.sample_grid(sample_cls, out / "samples" / f"step_{trainer.step:07d}.png")
    if waits[1] > 0 and waits[0] / waits[1] > 0.1 and trainer.acc.is_main_process:
        tqdm.write(f"train: waited for data {waits[0] / waits[1]:.0%} of the time: raise num_workers (now "
                   f"{cfg.num_workers}) or see benchmarks/gpu_feed.py for the images/s of one loader worker")


def _log_interval(trainer: Trainer, logs: dict, interval: dict, out: Path, bar) -> tuple[float, float]:
    """Append the step's ``logs`` with ``images_per_s`` and ``data_wait`` (the fraction of the interval
    spent waiting for the loader) to ``log.jsonl``; restart the interval; returns (wait, interval) s."""
    dt = time.perf_counter() - interval["t0"]
    wait = interval["wait"]
    logs.update(step=trainer.step, images_per_s=interval["seen"] / dt if dt > 0 else math.nan,
                data_wait=wait / dt if dt > 0 else 0.0)
    interval.update(t0=time.perf_counter(), seen=0, wait=0.0)
    if trainer.acc.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(logs) + "\n")
        bar.set_postfix(denoise=f"{logs['denoise']:.4f}", l1=f"{logs['l1']:.4f}", ips=f"{logs['images_per_s']:.1f}",
                        data=f"{logs['data_wait']:.0%}")
    return wait, dt
