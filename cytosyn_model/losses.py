"""Loss terms of REPA-E training.

Path maths (linear interpolant), the diffusion objective, the REPA alignment loss, and the
VAE losses (L1 + LPIPS + KL + PatchGAN hinge). Shapes: images [B, 3, 224, 224] in [-1, 1],
latents [B, 4, 28, 28], alignment tokens [B, 196, 768].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- path maths
def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolant x_t = (1 - t) x + t eps (t=0 data, t=1 noise) and its velocity eps - x."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - tt) * x + tt * noise, noise - x


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


# --------------------------------------------------------------------- LPIPS
class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with a VGG-16 trunk, built offline.

    ``vgg_weights``: a torchvision ``vgg16`` state dict (``features.*`` keys used); ``lin_weights``:
    the LPIPS v0.1 linear layers (``lin{0..4}.model.1.weight``). Both are weight specs of
    :mod:`cytosyn_encoders.weights`: local files (missing ones raise FileNotFoundError naming the
    path), or ``random[:seed=N]`` (a seeded random VGG; constant lin weights 1/C): a test network,
    not a perceptual metric.
    """

    CHANNELS = (64, 128, 256, 512, 512)
    SLICES = (4, 9, 16, 23, 30)  # ends of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_weights=None, lin_weights=None):
        super().__init__()
        from torchvision.models import vgg16

        from cytosyn_encoders.weights import RandomWeights, load_state_dict, parse_weights

        vgg_spec, lin_spec = parse_weights(vgg_weights), parse_weights(lin_weights)
        if vgg_spec is None or lin_spec is None:
            raise FileNotFoundError(
                "LPIPS needs local VGG-16 and LPIPS-lin weights (lpips_vgg_weights, lpips_lin_weights in the "
                "config); they are never downloaded. Set lpips_weight: 0 to train without LPIPS"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(vgg_spec.seed if isinstance(vgg_spec, RandomWeights) else 0)
            features = vgg16(weights=None).features
        if not isinstance(vgg_spec, RandomWeights):
            vgg = load_state_dict(vgg_spec, "LPIPS VGG-16")
            features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        self.slices = nn.ModuleList()
        start = 0
        for end in self.SLICES:
            self.slices.append(nn.Sequential(*[features[i] for i in range(start, end)]))
            start = end
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        if isinstance(lin_spec, RandomWeights):
            for conv in self.lins:
                nn.init.constant_(conv.weight, 1.0 / conv.in_channels)
        else:
            lin = load_state_dict(lin_spec, "LPIPS lin layers")
            for i, conv in enumerate(self.lins):
                conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [-1, 1]."""
        ha, hb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = 0.0
        for sl, lin in zip(self.slices, self.lins):
            ha, hb = sl(ha), sl(hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb).pow(2)).mean(dim=(2, 3))
        return total.squeeze(1)


# ------------------------------------------------------------ discriminator
def taming_weights_init(m: nn.Module) -> None:
    """taming-transformers' ``weights_init``: conv weights N(0, 0.02) (biases keep PyTorch's default),
    BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN (taming's NLayerDiscriminator, 3 layers, BatchNorm): [B, 3, H, W] -> logits [B, 1, h, w].

    Module names (``main.N``) and initialisation equal taming/REPA-E, so their weights load."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ch * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ch * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        self.apply(taming_weights_init)

    def forward(self, x):
        return self.main(x)


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
