"""Loading and saving weights: safetensors, or ``torch.load(weights_only=True)`` only.

Published REPA-E / CytoSyn / SD-VAE checkpoints wrap their tensors in various prefixes
(``model.``, ``module.``, ``ema.``, ``_orig_mod.``, ``vae.``) and keys (``state_dict``,
``ema``, ``model``); :func:`map_state_dict` strips them so they load into our modules.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

_WRAPPER_KEYS = ("state_dict", "ema", "teacher", "model", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.", "ema.", "net.")


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex) of a weights file: the identity under which derived features are cached."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime)


def load_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (weights_only); clear error if missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: weights file not found at {path}. Weights are never downloaded; "
            "give the local path of the file in the config"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: {path} holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def map_state_dict(state: dict[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes; with ``prefix`` (e.g. ``vae.``) keep only that sub-module's keys."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    if prefix is not None:
        sub = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
        if sub:
            out = sub
    return out


def load_into(module: torch.nn.Module, path: str | Path, what: str, prefix: str | None = None, strict: bool = True):
    """Load a (possibly REPA-E style) checkpoint into ``module``; returns (missing, unexpected)."""
    state = map_state_dict(load_state_dict(path, what), prefix)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("pos_embed") or k in own}
    result = module.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"{what}: {path} does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return result.missing_keys, result.unexpected_keys
