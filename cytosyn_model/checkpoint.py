"""Loading and saving model weights: published REPA-E, SD-VAE/E2E-VAE and diffusers layouts.

The generic reading (safetensors or ``torch.load(weights_only=True)``, wrapper keys and prefixes,
strict key/shape checks, digests) lives in :mod:`cytosyn_encoders.weights`; this module maps the
layouts of the models trained here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .vae_keys import diffusers_to_ldm_vae
from cytosyn_encoders.weights import (  # noqa: F401  (re-exported for the model package)
    file_digest,
    load_into,
    load_state_dict,
    map_state_dict,
    read_weights_file,
    strict_load,
)

# ------------------------------------------------------------------ the VAE
def _pick(obj: dict, keys: tuple[str, ...]) -> dict | None:
    for key in keys:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return None


def _with_prefix(state: dict, prefixes: tuple[str, ...]) -> dict | None:
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        if sub:
            return sub
    return None


def vae_state_from(obj: dict) -> dict[str, torch.Tensor]:
    """The VAE tensors (latent-diffusion names) of: a full REPA-E training checkpoint (its ``vae``),
    an E2E-VAE / SD-VAE state dict (``state_dict``, ``first_stage_model.`` prefix), a cytosyn
    checkpoint (``vae.``), or a diffusers ``AutoencoderKL`` file (converted)."""
    state = _pick(obj, ("vae", "state_dict")) or obj
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    state = map_state_dict(state)
    state = _with_prefix(state, ("first_stage_model.", "vae.")) or state
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state):
        state = diffusers_to_ldm_vae(state)
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def load_vae(vae: torch.nn.Module, path: str | Path) -> None:
    """Initialise ``vae`` from any layout of :func:`vae_state_from` (strict); a diffusers folder
    (``save_pretrained`` of the VAE, or of a pipeline with a ``vae/`` subfolder) is accepted too."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "diffusion_pytorch_model.safetensors", path / "vae" / "diffusion_pytorch_model.safetensors")
                 if p.exists()]
        if not found:
            raise FileNotFoundError(f"vae_init: {path} is a folder without diffusion_pytorch_model.safetensors (or vae/...)")
        path = found[0]
    strict_load(vae, vae_state_from(read_weights_file(path, "vae_init")), "vae_init", path)


# ------------------------------------------------------------------ the SiT
_CLASS_EMBEDDER = "y_embedder.embedding_table.weight"


@dataclass
class SiTLoadReport:
    """What :func:`load_sit` did: loaded tensor count, REPA-E keys skipped (with the reason), our keys
    kept at their initialisation, and the latent statistics found in the checkpoint (mean, var)."""

    source: str
    loaded: int
    skipped: dict[str, str]
    kept_at_init: list[str]
    latent_stats: tuple[torch.Tensor, torch.Tensor] | None

    def summary(self) -> str:
        skipped = "; ".join(f"skipped {k} ({why})" for k, why in self.skipped.items()) or "nothing skipped"
        kept = f"; kept at initialisation: {', '.join(self.kept_at_init)}" if self.kept_at_init else ""
        stats = "; latent statistics from its BatchNorm" if self.latent_stats is not None else ""
        return f"loaded {self.loaded} tensors from {self.source}; {skipped}{kept}{stats}"


def sit_state_from(obj: dict, which: str = "ema") -> dict[str, torch.Tensor]:
    """SiT tensors of a REPA-E training checkpoint (``ema`` or ``model``), a cytosyn checkpoint
    (``ema_sit.`` / ``sit.``), or a plain SiT state dict."""
    other = "model" if which == "ema" else "ema"
    state = _pick(obj, (which, other, "state_dict")) or obj
    state = map_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    sub = _with_prefix(state, (f"{which}_sit.", "sit.") if which == "ema" else ("sit.", "ema_sit."))
    if sub is not None:
        bn = _with_prefix(state, ("ema_bn.bn.", "bn.bn.") if which == "ema" else ("bn.bn.", "ema_bn.bn."))
        state = {**sub, **{f"bn.{k}": v for k, v in (bn or {}).items()}}
    return state


def load_sit(sit: torch.nn.Module, path: str | Path, which: str = "ema") -> SiTLoadReport:
    """Initialise our SiT trunk (blocks, embedders of x and t, pos_embed, projector, final layer)
    from a REPA-E or cytosyn checkpoint. REPA-E's class-label embedder is skipped (CytoSyn conditions
    on the H0-mini CLS), our condition embedder then keeps its initialisation; REPA-E's latent
    BatchNorm statistics are returned for :class:`LatentNorm`. Anything else that does not fit is an
    error listing the keys (see :func:`strict_load`)."""
    state = sit_state_from(read_weights_file(path, "sit_init"), which)
    skipped = {}
    if _CLASS_EMBEDDER in state:
        state.pop(_CLASS_EMBEDDER)
        skipped[_CLASS_EMBEDDER] = "REPA-E class-label embedder; CytoSyn conditions on the H0-mini CLS"
    stats = None
    if "bn.running_mean" in state:
        stats = (state.pop("bn.running_mean"), state.pop("bn.running_var"))
        state.pop("bn.num_batches_tracked", None)
    kept = [k for k in sit.state_dict() if k.startswith("y_embedder.") and k not in state]
    strict_load(sit, state, "sit_init", path, allow_missing=("y_embedder.",) if skipped else ())
    return SiTLoadReport(str(path), len(state), skipped, kept, stats)


def load_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent (mean, var) from REPA-E's ``*-latents-stats.pt`` (``latents_bias`` = mean,
    ``latents_scale`` = 1/std), a file with ``mean`` and ``std`` (or ``var``), or a checkpoint whose
    latent BatchNorm carries ``running_mean``/``running_var``."""
    obj = read_weights_file(path, "latent_stats")
    flat = map_state_dict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    if "latents_bias" in flat and "latents_scale" in flat:
        return flat["latents_bias"].reshape(-1).float(), flat["latents_scale"].reshape(-1).float().pow(-2)
    if "mean" in flat and ("std" in flat or "var" in flat):
        var = flat["var"] if "var" in flat else flat["std"].pow(2)
        return flat["mean"].reshape(-1).float(), var.reshape(-1).float()
    stats = _batchnorm_stats(obj)
    if stats is not None:
        return stats
    raise ValueError(f"latent_stats: {path} holds no latents_bias/latents_scale, mean/std or BatchNorm running statistics")


def _batchnorm_stats(obj: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    state = sit_state_from(obj)
    if "bn.running_mean" in state and "bn.running_var" in state:
        return state["bn.running_mean"].float(), state["bn.running_var"].float()
    return None
