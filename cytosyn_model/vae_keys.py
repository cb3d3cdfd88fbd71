"""The one mapping between our VAE's tensor names (latent-diffusion / SD-VAE layout) and diffusers'
``AutoencoderKL`` names, from which both directions follow (as diffusers' ``loaders`` conversion):
- the rules below pair a latent-diffusion name with its diffusers name; an ``{n}`` is a block index,
  kept (encoder), reversed (decoder up blocks: diffusers counts them from the top) or shifted by
  one (mid blocks: ``block_1`` is ``resnets.0``);
- the mid-block attention is 1x1 convolutions in latent-diffusion, linear layers in diffusers.
:func:`diffusers_to_ldm_vae` also reads diffusers' older attention names (query, key, value,
proj_attn).
"""

from __future__ import annotations

import re

import torch

__all__ = ["diffusers_to_ldm_vae", "ldm_to_diffusers_vae"]

#: (latent-diffusion, diffusers, index rule) for the block names
BLOCKS = (
    ("encoder.down.{n}.block.", "encoder.down_blocks.{n}.resnets.", "same"),
    ("encoder.down.{n}.downsample.", "encoder.down_blocks.{n}.downsamplers.0.", "same"),
    ("decoder.up.{n}.block.", "decoder.up_blocks.{n}.resnets.", "reverse"),
    ("decoder.up.{n}.upsample.", "decoder.up_blocks.{n}.upsamplers.0.", "reverse"),
    ("mid.block_{n}.", "mid_block.resnets.{n}.", "minus1"),
)
#: the mid-block attention's parts: latent-diffusion -> diffusers
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTENTION = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # older diffusers files
#: whole-word renames: latent-diffusion -> diffusers
RENAMES = (("norm_out", "conv_norm_out"), ("nin_shortcut", "conv_shortcut"))

_ATTN_LDM, _ATTN_DIFF = "mid.attn_1.", "mid_block.attentions.0."


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _index(n: int, rule: str, levels: int, to_diffusers: bool) -> int:
    if rule == "reverse":
        return levels - 1 - n
    if rule == "minus1":
        return n - 1 if to_diffusers else n + 1
    return n


def _convert(key: str, levels: int, to_diffusers: bool) -> tuple[str, str | None]:
    """(new name, attention part of the mid block or None)."""
    for ldm, diff in RENAMES:
        src, dst = (ldm, diff) if to_diffusers else (diff, ldm)
        key = re.sub(rf"(?<![a-z_]){src}\b", dst, key)
    for ldm, diff, rule in BLOCKS:
        src, dst = (ldm, diff) if to_diffusers else (diff, ldm)
        m = _pattern(src).search(key)
        if m:
            n = _index(int(m.group("n")), rule, levels, to_diffusers)
            key = key[: m.start()] + dst.format(n=n) + key[m.end():]
    parts = ATTENTION if to_diffusers else {**{d: l for l, d in ATTENTION.items()}, **LEGACY_ATTENTION}
    src, dst = (_ATTN_LDM, _ATTN_DIFF) if to_diffusers else (_ATTN_DIFF, _ATTN_LDM)
    m = re.search(re.escape(src) + r"(" + "|".join(map(re.escape, parts)) + r")\.", key)
    if m:
        key = key[: m.start()] + dst + parts[m.group(1)] + "." + key[m.end():]
        return key, parts[m.group(1)]
    return key, None


def ldm_to_diffusers_vae(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Our names -> diffusers ``AutoencoderKL`` names (``levels``: resolution levels, ``len(ch_mult)``);
    the attention's 1x1 convolution weights become linear weights."""
    out = {}
    for k, v in state.items():
        new, part = _convert(k, levels, to_diffusers=True)
        if part is not None and part != "group_norm" and new.endswith(".weight") and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[new] = v.contiguous()
    return out


def diffusers_to_ldm_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` names -> ours (levels counted from the file's up blocks); linear
    attention weights become 1x1 convolutions."""
    ups = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    levels = max(ups) + 1 if ups else 0
    out = {}
    for k, v in state.items():
        new, part = _convert(k, levels, to_diffusers=False)
        if part is not None and part != "norm" and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[new] = v
    return out
