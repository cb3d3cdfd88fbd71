"""Loss terms of REPA-E training: the diffusion objective, the REPA alignment loss, and the VAE
losses (L1 + LPIPS + KL + PatchGAN hinge; the networks are in lpips.py and discriminator.py).
Shapes: images [B, 3, 224, 224] in [-1, 1], latents [B, 4, 28, 28], alignment tokens [B, 196, 768].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn



def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def diffusion_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error (scalar): REPA-E's ``mean_flat((v - target)**2).mean()``."""
    return (upcast(v_pred) - upcast(v_target)).pow(2).mean()


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of the negative cosine similarity, [B, N, D] each.

    As REPA/REPA-E: both sides L2-normalised with ``F.normalize`` (eps 1e-12), then -sum(p * q).
    """
    p = F.normalize(upcast(projected), dim=-1)
    q = F.normalize(upcast(target), dim=-1)
    return -(p * q).sum(dim=-1).mean()


def kl_loss(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over channels and pixels, averaged over the batch (REPA-E).

    The 1e-6 weight of REPA-E applies to this sum (about 3136 latent elements per 224-px tile).
    """
    kl = posterior.kl()
    return kl.sum() / kl.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


# -------------------------------------------------- REPA-E's VAE loss function
@dataclass(frozen=True)
class VAELossWeights:
    """Weights of the VAE generator terms (REPA-E's ``l1_lpips_kl_gan`` loss config)."""

    l1: float = 1.0  # reconstruction_weight
    lpips: float = 1.0  # perceptual_weight
    kl: float = 1e-6  # kl_weight
    gan: float = 0.1  # discriminator_weight


def vae_generator_losses(
    x: torch.Tensor,
    rec: torch.Tensor,
    posterior,
    weights: VAELossWeights,
    lpips: nn.Module | None = None,
    disc: nn.Module | None = None,
    disc_factor: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The generator terms of REPA-E's ``ReconstructionLoss_Single_Stage`` (quantize_mode vae).

    Images [B, 3, H, W] in [-1, 1]; computed in float32 with autocast off, as the reference:
    l1 = mean |x - rec|, lpips = batch mean, kl = :func:`kl_loss`, gan_g = -mean D(rec) (only
    while ``disc_factor`` > 0 and the GAN weight > 0). ``vae_rec`` is their weighted sum
    ``l1 + lpips + kl + gan * disc_factor * gan_g`` (the alignment term is added by the caller).
    """
    zero = torch.zeros((), device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        x32, r32 = x.float(), rec.float()
        l1 = F.l1_loss(x32, r32, reduction="mean")
        lp = lpips(x32, r32).mean() if lpips is not None else zero
        kl = kl_loss(posterior)
        gan = hinge_g_loss(disc(r32)) if disc is not None and disc_factor > 0 and weights.gan > 0 else zero
    total = weights.l1 * l1 + weights.lpips * lp + weights.kl * kl + weights.gan * disc_factor * gan
    return {"l1": l1, "lpips": lp, "kl": kl, "gan_g": gan, "vae_rec": total}


def discriminator_loss(disc: nn.Module, x: torch.Tensor, rec: torch.Tensor, disc_factor: float) -> torch.Tensor:
    """``disc_factor`` x hinge loss on real images vs detached reconstructions (float32, autocast off);
    real first, then fake, each its own BatchNorm batch, as REPA-E."""
    with torch.autocast(x.device.type, enabled=False):
        logits_real = disc(x.float().detach())
        logits_fake = disc(rec.float().detach())
    return disc_factor * hinge_d_loss(logits_real, logits_fake)
