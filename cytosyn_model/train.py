"""REPA-E end-to-end training of the VAE and the SiT (`cytosyn-train`).

One step, in the stop-gradient order of REPA-E (with CytoSyn's EMA of the VAE):
1. encode the images with the VAE (posterior sample z);
2. VAE step, SiT frozen: L1 + LPIPS + KL + PatchGAN generator loss on the reconstruction,
   plus ``proj_coeff_vae`` x the alignment loss of the SiT run only up to its REPA block on
   batch-normalised z (batch statistics), same t and noise as step 4;
3. discriminator step (hinge) on real images vs. detached reconstructions;
4. SiT step on detached z (BatchNorm updates its running statistics): velocity loss +
   ``proj_coeff_sit`` x alignment loss;
5. EMA update of the SiT, the VAE and the latent statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .h0mini import build_h0_mini, h0_mini_features
from .losses import LPIPS, PatchDiscriminator, diffusion_loss, hinge_d_loss, hinge_g_loss, interpolate, repa_loss
from .sit import SiT, SiTConfig
from .vae import AutoencoderKL, VAEConfig


@dataclass
class TrainConfig:
    """Every key of ``pipelines/train_*.yaml`` (section ``train``); see docs/model.md."""

    out: str = "runs/train"
    vae: dict = field(default_factory=dict)  # VAEConfig fields
    sit: dict = field(default_factory=dict)  # SiTConfig fields
    vae_init: str | None = None  # pretrained VAE weights (safetensors / torch), optional
    sit_init: str | None = None
    batch_size: int = 256  # per process
    max_steps: int = 400_000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
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
    lpips_random_init: bool = False  # tests only
    kl_weight: float = 1e-6
    gan_weight: float = 0.1
    gan_start_step: int = 0  # our VAE may start from scratch: delay the GAN
    disc_channels: int = 64
    bn_momentum: float = 0.1
    bn_eps: float = 1e-4
    h0_mini_weights: str | None = None  # needed when the shards have no cls/tok features
    h0_mini_tiny: bool = False  # tests only: random tiny H0-mini
    shuffle_buffer: int = 1000
    num_workers: int = 4
    seed: int = 0
    log_every: int = 50
    sample_every: int = 5000
    sample_steps: int = 50
    ckpt_every: int = 5000
    keep_checkpoints: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


class LatentNorm(nn.Module):
    """BatchNorm without affine parameters on the latents [B, 4, h, w].

    ``forward`` in train mode uses batch statistics and updates the running ones; in eval
    mode it uses the running ones. ``batch_normalize`` uses batch statistics without
    touching the running ones (the VAE's alignment pass). ``denormalize`` inverts eval mode.
    """

    def __init__(self, channels: int = 4, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, momentum=momentum, eps=eps)

    def forward(self, z):
        return self.bn(z)

    def batch_normalize(self, z):
        return F.batch_norm(z, None, None, training=True, eps=self.bn.eps)

    def denormalize(self, z):
        bn = self.bn
        return z * torch.sqrt(bn.running_var + bn.eps).view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over parameters and float buffers (BN statistics)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        if be.dtype.is_floating_point:
            be.lerp_(bm.to(be.dtype), 1.0 - decay)
        else:
            be.copy_(bm)


class NaNLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


class Trainer:
    """Holds the models, optimisers and state of one REPA-E run (one process of it)."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        set_seed(cfg.seed, device_specific=True)
        self.device = self.acc.device
        self.vae_cfg = VAEConfig(**{**cfg.vae, "ch_mult": tuple(cfg.vae.get("ch_mult", (1, 2, 4, 4)))})
        self.sit_cfg = SiTConfig(**cfg.sit)
        vae = AutoencoderKL(self.vae_cfg)
        sit = SiT(self.sit_cfg)
        if cfg.vae_init:
            from .checkpoint import load_into

            load_into(vae, cfg.vae_init, "vae_init", prefix="vae.")
        if cfg.sit_init:
            from .checkpoint import load_into

            load_into(sit, cfg.sit_init, "sit_init", prefix="sit.")
        bn = LatentNorm(self.vae_cfg.z_channels, cfg.bn_momentum, cfg.bn_eps)
        if self.acc.num_processes > 1:
            bn = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
        disc = PatchDiscriminator(cfg.disc_channels)
        self.lpips = None
        if cfg.lpips_weight > 0:
            self.lpips = LPIPS(cfg.lpips_vgg_weights, cfg.lpips_lin_weights, random_init=cfg.lpips_random_init).to(self.device)
        self.h0 = None
        self.ema_vae = copy.deepcopy(vae).requires_grad_(False).eval().to(self.device)
        self.ema_sit = copy.deepcopy(sit).requires_grad_(False).eval().to(self.device)
        self.ema_bn = copy.deepcopy(bn).requires_grad_(False).eval().to(self.device)

        def adamw(m):
            return torch.optim.AdamW(
                [p for p in m.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
            )

        opt_vae, opt_sit, opt_disc = adamw(vae), adamw(sit), adamw(disc)
        self.vae, self.sit, self.disc, self.bn, self.opt_vae, self.opt_sit, self.opt_disc = self.acc.prepare(
            vae, sit, disc, bn.to(self.device), opt_vae, opt_sit, opt_disc
        )
        self.step = 0
        self.out = Path(cfg.out)

    # ------------------------------------------------------------------ inputs
    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls [B, D], tokens [B, 196, D]) from the shards, else from a frozen H0-mini."""
        if "cls" in batch and "tok" in batch:
            return batch["cls"].to(self.device).float(), batch["tok"].to(self.device).float()
        if self.h0 is None:
            if not self.cfg.h0_mini_tiny and not self.cfg.h0_mini_weights:
                raise FileNotFoundError(
                    "the shards carry no cls.npy/tok.npy features and no h0_mini_weights path is configured: "
                    "run `cytosyn-data features` or give the local H0-mini weights"
                )
            self.h0 = build_h0_mini(self.cfg.h0_mini_weights, tiny=self.cfg.h0_mini_tiny).to(self.device)
        images01 = (batch["image"].to(self.device) + 1) / 2
        with self.acc.autocast():
            cls, tok = h0_mini_features(self.h0, images01)
        return cls.float(), tok.float()

    def _check(self, name: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            raise NaNLossError(f"step {self.step + 1}: loss term '{name}' is {value.item()}")

    # ------------------------------------------------------------------ step
    def vae_losses(self, x, rec, post, z, noise, t, cls, tok, drop, gan_on: bool) -> dict[str, torch.Tensor]:
        """Loss terms of the VAE step; the SiT and the discriminator must be frozen by the caller.

        The alignment pass runs the (unwrapped) SiT only up to its REPA block on the batch-
        normalised latents, so its gradient reaches the VAE encoder and no SiT parameter.
        """
        cfg = self.cfg
        zero = torch.zeros((), device=self.device)
        sit_raw = self.acc.unwrap_model(self.sit)
        with self.acc.autocast():
            l1 = (rec.float() - x.float()).abs().mean()
            lp = self.lpips(rec.float(), x.float()).mean() if self.lpips is not None else zero
            kl = post.kl().mean() / z[0].numel()
            g = hinge_g_loss(self.acc.unwrap_model(self.disc)(rec)) if gan_on else zero
            xt, _ = interpolate(self.acc.unwrap_model(self.bn).batch_normalize(z), noise, t)
            _, zs = sit_raw(xt, t, cls, drop=drop, align_only=True)
            align = repa_loss(zs, tok)
        total = cfg.l1_weight * l1 + cfg.lpips_weight * lp + cfg.kl_weight * kl + cfg.gan_weight * g + cfg.proj_coeff_vae * align
        return {"l1": l1, "lpips": lp, "kl": kl, "gan_g": g, "align_vae": align, "vae_total": total}

    def sit_losses(self, z, noise, t, cls, tok, drop) -> dict[str, torch.Tensor]:
        """Loss terms of the SiT step on detached latents (BatchNorm in train mode)."""
        self.sit.train()
        self.bn.train()
        with self.acc.autocast():
            xt, v_target = interpolate(self.bn(z.detach()), noise, t)
            v_pred, zs = self.sit(xt, t, cls, drop=drop)
            denoise = diffusion_loss(v_pred, v_target)
            align = repa_loss(zs, tok)
        return {"denoise": denoise, "align_sit": align, "sit_total": denoise + self.cfg.proj_coeff_sit * align}

    def _record(self, logs: dict, losses: dict[str, torch.Tensor]) -> None:
        for name, v in losses.items():
            self._check(name, v)
            logs[name] = float(v.detach())

    def train_step(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, float]:
        """One REPA-E step (see the module docstring); returns the loss terms and grad norms."""
        cfg = self.cfg
        x = batch["image"].to(self.device)
        cls, tok = self._features(batch)
        b = x.shape[0]
        sit_raw = self.acc.unwrap_model(self.sit)
        disc_raw = self.acc.unwrap_model(self.disc)
        logs: dict[str, float] = {}
        gan_on = self.step >= cfg.gan_start_step and cfg.gan_weight > 0

        # 1. encode (through the DDP wrapper, so VAE gradients are synced); one t, noise, drop
        self.vae.train()
        with self.acc.autocast():
            rec, post, z = self.vae(x, generator=generator)
        t = torch.rand(b, device=self.device, generator=generator)
        noise = torch.randn(z.shape, device=self.device, generator=generator, dtype=z.dtype)
        drop = torch.rand(b, device=self.device, generator=generator) < self.sit_cfg.class_dropout

        # 2. VAE step with the SiT and the discriminator frozen
        _requires_grad(sit_raw, False)
        _requires_grad(disc_raw, False)
        losses = self.vae_losses(x, rec, post, z, noise, t, cls, tok, drop, gan_on)
        self._record(logs, losses)
        self.opt_vae.zero_grad(set_to_none=True)
        self.acc.backward(losses["vae_total"])
        logs["grad_norm_vae"] = float(self.acc.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip))
        self.opt_vae.step()
        _requires_grad(sit_raw, True)
        _requires_grad(disc_raw, True)
        if not self.sit_cfg.learn_null:
            sit_raw.y_embedder.null.requires_grad_(False)

        # 3. discriminator step
        if gan_on:
            with self.acc.autocast():
                d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach()))
            self._record(logs, {"gan_d": d_loss})
            self.opt_disc.zero_grad(set_to_none=True)
            self.acc.backward(d_loss)
            logs["grad_norm_disc"] = float(self.acc.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip))
            self.opt_disc.step()

        # 4. SiT step on detached latents
        losses = self.sit_losses(z, noise, t, cls, tok, drop)
        self._record(logs, losses)
        self.opt_sit.zero_grad(set_to_none=True)
        self.acc.backward(losses["sit_total"])
        logs["grad_norm_sit"] = float(self.acc.clip_grad_norm_(self.sit.parameters(), cfg.grad_clip))
        self.opt_sit.step()

        # 5. EMA of SiT, VAE and latent statistics
        ema_update(self.ema_sit, sit_raw, cfg.ema_decay)
        ema_update(self.ema_vae, self.acc.unwrap_model(self.vae), cfg.ema_decay)
        ema_update(self.ema_bn, self.acc.unwrap_model(self.bn), cfg.ema_decay)
        self.step += 1
        return logs

    # ------------------------------------------------------------ checkpoints
    def modules(self) -> dict[str, nn.Module]:
        u = self.acc.unwrap_model
        return {
            "vae": u(self.vae), "sit": u(self.sit), "disc": u(self.disc), "bn": u(self.bn),
            "ema_vae": self.ema_vae, "ema_sit": self.ema_sit, "ema_bn": self.ema_bn,
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """``{out}/checkpoints/step_{N}/``: models.safetensors, optim.pt, rng.pt, state.json (atomic)."""
        from safetensors.torch import save_file

        final = Path(path) if path else self.out / "checkpoints" / f"step_{self.step:07d}"
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return final
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, m in self.modules().items():
            for k, v in m.state_dict().items():
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "models.safetensors"))
        torch.save({"vae": self.opt_vae.state_dict(), "sit": self.opt_sit.state_dict(), "disc": self.opt_disc.state_dict()}, tmp / "optim.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": dataclasses.asdict(self.cfg)}, indent=1))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
        self._prune_checkpoints(final.parent)
        self.acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self, folder: Path) -> None:
        done = sorted(p for p in folder.glob("step_*") if not p.name.endswith(".tmp"))
        import shutil

        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore models, EMA, BN statistics, optimisers, step and RNG (weights_only loads)."""
        from safetensors.torch import load_file

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
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = json.loads((path / "state.json").read_text())["step"]

    # ---------------------------------------------------------------- samples
    @torch.no_grad()
    def sample_grid(self, cls: torch.Tensor, path: Path, steps: int | None = None) -> Path:
        """EMA samples conditioned on ``cls`` [n, D] (ODE Heun), written as a grid PNG."""
        from .sampling import ode_heun, sit_velocity_fn
        from .grid import save_grid

        n = cls.shape[0]
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        size = self.sit_cfg.input_size
        noise = torch.randn(n, self.vae_cfg.z_channels, size, size, generator=g).to(self.device)
        z = ode_heun(sit_velocity_fn(self.ema_sit), noise, cls.to(self.device), steps=steps or self.cfg.sample_steps, cfg_scale=1.0)
        images = self.ema_vae.decode(self.ema_bn.denormalize(z.float()))
        return save_grid(images, path)


def train(cfg: TrainConfig, shards, resume: str | Path | None = "auto", stop_after: int | None = None) -> Trainer:
    """Run (or resume) training on ``shards`` until ``cfg.max_steps`` (or ``stop_after`` more steps).

    ``resume='auto'`` picks the newest checkpoint under ``{out}/checkpoints``.
    """
    from tqdm.auto import tqdm

    from .data import make_loader

    trainer = Trainer(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = out / "checkpoints"
    if resume == "auto":
        found = sorted(p for p in ckpts.glob("step_*") if not p.name.endswith(".tmp")) if ckpts.exists() else []
        resume = found[-1] if found else None
    if resume:
        trainer.load_checkpoint(resume)
    loader = make_loader(
        shards, cfg.batch_size, seed=cfg.seed, rank=trainer.acc.process_index,
        num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, batches_done=trainer.step,
    )
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, trainer.step + stop_after)
    log_path = out / "log.jsonl"
    bar = tqdm(total=end, initial=trainer.step, desc="train", unit="step", disable=not trainer.acc.is_main_process)
    it = iter(loader)
    t0, seen = time.perf_counter(), 0
    sample_cls = None
    while trainer.step < end:
        batch = next(it)
        logs = trainer.train_step(batch)
        if sample_cls is None:
            sample_cls = trainer._features(batch)[0][:8]
        seen += batch["image"].shape[0] * trainer.acc.num_processes
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == end:
            dt = time.perf_counter() - t0
            logs.update(step=trainer.step, images_per_s=seen / dt if dt > 0 else math.nan)
            t0, seen = time.perf_counter(), 0
            if trainer.acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(logs) + "\n")
                bar.set_postfix(denoise=f"{logs['denoise']:.4f}", l1=f"{logs['l1']:.4f}", ips=f"{logs['images_per_s']:.1f}")
        if trainer.step % cfg.ckpt_every == 0 or trainer.step == end:
            trainer.save_checkpoint()
        if (trainer.step % cfg.sample_every == 0 or trainer.step == end) and trainer.acc.is_main_process:
            trainer.sample_grid(sample_cls, out / "samples" / f"step_{trainer.step:07d}.png")
    bar.close()
    return trainer

