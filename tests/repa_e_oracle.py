"""Import the REPA-E reference code (../shared/reference/repa-e) as a test oracle.

The reference files are imported unmodified. Two things they need that are not shipped are
provided here: ``loss.perceptual_loss.PerceptualLoss`` (REPA-E's LPIPS + ConvNeXt-S loss is not in
the oracle) is a stand-in that runs the reference LPIPS (``loss/lpips.py``) on images in [-1, 1],
and torchvision's VGG-16 is built without its ImageNet download. Nothing is copied into the project.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("CYTOSYN_SHARED", ROOT.parent / "shared")) / "reference" / "repa-e"


class Cfg(dict):
    """Attribute access + ``get``: the parts of OmegaConf that the reference loss reads."""

    __getattr__ = dict.__getitem__


def _offline_vgg16(weights=None, **kwargs):
    import torchvision

    return torchvision.models.vgg16(weights=None)


class _LPIPSPerceptual(nn.Module):
    """Stand-in for REPA-E's PerceptualLoss: the reference LPIPS of images in [-1, 1]
    (its forward expects [0, 1] and maps back with ``* 2 - 1``)."""

    lpips_factory = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.lpips = type(self).lpips_factory()

    def forward(self, a, b):
        return self.lpips((a + 1) / 2, (b + 1) / 2)


def load_reference() -> SimpleNamespace:
    """The reference modules; skips the test when ../shared is absent."""
    if not REF.exists():
        pytest.skip(f"REPA-E reference code not found at {REF}")
    if str(REF) not in sys.path:
        sys.path.insert(0, str(REF))
    import loss  # the reference's package

    if "loss.perceptual_loss" not in sys.modules:
        stand_in = types.ModuleType("loss.perceptual_loss")
        stand_in.PerceptualLoss = _LPIPSPerceptual
        sys.modules["loss.perceptual_loss"] = stand_in
        loss.perceptual_loss = stand_in
    import loss.discriminator as discriminator
    import loss.losses as losses
    import loss.lpips as lpips
    import models.autoencoder as autoencoder
    import models.sit as sit
    import samplers

    lpips.models = SimpleNamespace(vgg16=_offline_vgg16, VGG16_Weights=SimpleNamespace(IMAGENET1K_V1=None))
    lpips.LPIPS.load_pretrained = lambda self: None  # weights are given by the test, never downloaded
    _LPIPSPerceptual.lpips_factory = lpips.LPIPS
    return SimpleNamespace(sit=sit, autoencoder=autoencoder, losses=losses, lpips=lpips,
                           discriminator=discriminator, samplers=samplers)


def loss_config(discriminator_start: int = 0, perceptual_weight: float = 1.0) -> Cfg:
    """REPA-E's ``configs/l1_lpips_kl_gan.yaml`` values, as the reference loss reads them."""
    losses = Cfg(
        discriminator_start=discriminator_start, discriminator_factor=1.0, discriminator_weight=0.1,
        quantizer_weight=1.0, perceptual_loss="lpips", perceptual_weight=perceptual_weight,
        reconstruction_loss="l1", reconstruction_weight=1.0, lecam_regularization_weight=0.0,
        kl_weight=1e-6, logvar_init=0.0,
    )
    return Cfg(losses=losses, model=Cfg(vq_model=Cfg(quantize_mode="vae")))


def save_lpips_weights(ref_lpips: nn.Module, folder: Path) -> tuple[Path, Path]:
    """The reference LPIPS's VGG as a torchvision ``vgg16`` state dict and its lin layers in the
    LPIPS v0.1 layout (``lin{i}.model.1.weight``): the files our LPIPS loads."""
    vgg = {}
    for name, t in ref_lpips.net.state_dict().items():  # slice{k}.{index}.weight
        _, index, kind = name.split(".")
        vgg[f"features.{index}.{kind}"] = t.clone()
    lin = {f"lin{i}.model.1.weight": getattr(ref_lpips, f"lin{i}").model[1].weight.detach().clone() for i in range(5)}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "lpips_lin.pth")
    return folder / "vgg16.pth", folder / "lpips_lin.pth"


class ConditionAdapter(nn.Module):
    """Takes the place of REPA-E's class-label embedder: a copy of our continuous condition embedder
    applied to fixed condition vectors, dropping rows with ``mask`` when the SiT is in train mode."""

    def __init__(self, embedder: nn.Module, cond: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        import copy

        self.inner = copy.deepcopy(embedder)
        self.inner.dropout = 0.0
        self.cond, self.mask = cond, mask

    def forward(self, labels, train, force_drop_ids=None):
        return self.inner(self.cond, self.cond.shape[0], self.mask if train else None)


def load_train_script() -> types.ModuleType:
    """REPA-E's ``train_repae.py`` as a module, for its ``update_ema``, ``requires_grad`` and the order
    of its step (replayed by the tests). Its logging/data/hub imports (wandb, omegaconf, the ImageNet
    dataset and encoder helpers) are stand-ins: the replayed step does not use them."""
    load_reference()
    if "train_repae" in sys.modules:
        return sys.modules["train_repae"]
    stubs = {
        "wandb": {},
        "omegaconf": {"OmegaConf": object},
        "dataset": {"CustomINH5Dataset": object},
        "utils": {name: None for name in ("load_encoders", "normalize_latents", "denormalize_latents",
                                          "preprocess_imgs_vae", "count_trainable_params")},
    }
    import importlib.machinery

    import accelerate  # noqa: F401  (imported first: it probes for wandb while it loads)

    added = []
    for name, attrs in stubs.items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = mod
            added.append(name)
    try:
        import train_repae
    finally:  # the stand-ins must not leak into other tests (accelerate would take wandb as installed)
        for name in added:
            sys.modules.pop(name, None)
    return train_repae


def reference_step(script, r: dict, x, tok, noise, step: int, clip: float = 1.0, ema_decay: float = 0.9999,
                   proj_coeff_vae: float = 1.5, proj_coeff_sit: float = 0.5) -> dict:
    """One step of REPA-E's ``train_repae.py`` main loop (encode, VAE + alignment update, discriminator
    update, SiT update, EMA), replayed with the reference modules in ``r`` (vae, sit with a
    :class:`ConditionAdapter` as y_embedder, ema, loss_fn, opts) and the step's randomness given
    (``noise``: posterior, t, path, drop). Returns the loss terms (ours' names) and clipped norms."""
    vae, sit, ema, loss_fn, opts = r["vae"], r["sit"], r["ema"], r["loss_fn"], r["opts"]
    sit.y_embedder.mask = noise.drop
    kw = dict(y=None, zs=[tok], time_input=noise.t.view(-1, 1, 1, 1), noises=noise.path)
    vae.train()
    sit.train()
    posterior = vae.encode(x)
    z = posterior.mean + posterior.std * noise.posterior  # DiagonalGaussianDistribution.sample()
    recon = vae.decode(z).sample
    script.requires_grad(sit, False)
    sit.eval()
    vae_loss, vae_dict = loss_fn(x, recon, posterior, step, "generator")
    align = sit(x=z, loss_kwargs=dict(path_type="linear", prediction="v", weighting="uniform", align_only=True), **kw)
    vae_loss = vae_loss.mean() + proj_coeff_vae * align["proj_loss"].mean()
    vae_loss.backward()
    norms = {"grad_norm_vae": torch.nn.utils.clip_grad_norm_(vae.parameters(), clip)}
    opts["vae"].step()
    opts["vae"].zero_grad(set_to_none=True)
    d_loss, _ = loss_fn(x, recon, posterior, step, "discriminator")
    d_loss.mean().backward()
    norms["grad_norm_disc"] = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), clip)
    opts["disc"].step()
    opts["disc"].zero_grad(set_to_none=True)
    script.requires_grad(sit, True)
    sit.train()
    out = sit(x=z.detach(), loss_kwargs=dict(path_type="linear", prediction="v", weighting="uniform", align_only=False), **kw)
    sit_loss = out["denoising_loss"].mean() + proj_coeff_sit * out["proj_loss"].mean()
    sit_loss.backward()
    norms["grad_norm_sit"] = torch.nn.utils.clip_grad_norm_(sit.parameters(), clip)
    opts["sit"].step()
    opts["sit"].zero_grad(set_to_none=True)
    script.update_ema(ema, sit, decay=ema_decay)
    kl_weight = loss_fn.kl_weight
    return {
        "l1": vae_dict["reconstruction_loss"], "lpips": vae_dict["perceptual_loss"], "kl": vae_dict["kl_loss"] / kl_weight,
        "gan_g": vae_dict["gan_loss"], "align_vae": align["proj_loss"], "vae_total": vae_loss, "gan_d": d_loss,
        "denoise": out["denoising_loss"].mean(), "align_sit": out["proj_loss"], "sit_total": sit_loss, **norms,
    }
