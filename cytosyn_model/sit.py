"""SiT (Scalable Interpolant Transformer) with adaLN-Zero blocks, a continuous condition
embedder for the 768-d H0-mini CLS token, and the REPA projector.

Latents [B, 4, 28, 28] -> patch size 2 -> 14x14 = 196 tokens; the REPA projector maps the
tokens after block ``encoder_depth`` to the 768-d H0-mini patch-token space. Names follow
SiT/REPA (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks``, ``final_layer``,
``projectors``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

SIZES = {  # depth, hidden, heads
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "tiny": (4, 64, 4),
}


@dataclass
class SiTConfig:
    size: str = "XL"
    input_size: int = 28  # latent side
    patch_size: int = 2
    in_channels: int = 4
    cond_dim: int = 768  # H0-mini CLS
    class_dropout: float = 0.1
    learn_null: bool = True  # learned null condition vector (else zeros)
    encoder_depth: int = 8  # REPA alignment after this block (1-based)
    projector_dim: int = 2048
    z_dim: int = 768  # H0-mini patch-token width
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    depth: int | None = None  # overrides of the named size, for tiny models
    hidden: int | None = None
    heads: int | None = None

    def dims(self) -> tuple[int, int, int]:
        d, h, n = SIZES[self.size]
        return self.depth or d, self.hidden or h, self.heads or n


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (256) -> MLP -> hidden."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim = freq_dim

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Continuous condition (H0-mini CLS, [B, 768]) -> hidden, with a null vector for CFG.

    In training each condition is replaced by the null vector with probability ``dropout``.
    ``drop`` (bool [B]) forces the null vector (unconditional branch of CFG).
    """

    def __init__(self, cond_dim: int, hidden: int, dropout: float, learn_null: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(cond_dim), requires_grad=learn_null)
        self.dropout = dropout

    def forward(self, y: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = self.null.expand(batch, -1)
            return self.mlp(y)
        if drop is None and self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
        if drop is not None:
            y = torch.where(drop[:, None], self.null.to(y.dtype).expand_as(y), y)
        return self.mlp(y)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sm, scm, gm, sp, scp, gp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, scm))
        return x + gp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sp, scp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: 3-layer MLP with SiLU, hidden -> projector_dim -> projector_dim -> z_dim."""
    return nn.Sequential(
        nn.Linear(hidden, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding, [grid*grid, dim] float64, token i = row * grid + col.

    The MAE/DiT/SiT/REPA layout (``get_2d_sincos_pos_embed``): the first ``dim/2`` channels encode
    the column (x), the last ``dim/2`` the row (y); each half is [sin | cos] over ``dim/4`` frequencies
    1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos embedding")
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)


class SiT(nn.Module):
    def __init__(self, cfg: SiTConfig = SiTConfig()):
        super().__init__()
        self.cfg = cfg
        depth, hidden, heads = cfg.dims()
        if not 1 <= cfg.encoder_depth <= depth:
            raise ValueError(f"encoder_depth {cfg.encoder_depth} must be in [1, {depth}]")
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, hidden, bias=True)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = ConditionEmbedder(cfg.cond_dim, hidden, cfg.class_dropout, cfg.learn_null)
        n = self.x_embedder.num_patches
        # a frozen parameter, as in SiT/REPA: it is part of the state dict, and REPA-E's training loop
        # (requires_grad(model, True) after the VAE step) makes it trainable from the first SiT update
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden, int(n**0.5))).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden, heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(depth))
        self.projectors = nn.ModuleList([build_projector(hidden, cfg.projector_dim, cfg.z_dim)])
        self.final_layer = FinalLayer(hidden, cfg.patch_size, cfg.in_channels)
        self._init_weights()

    def _init_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.mlp[0], self.y_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.y_embedder.null, std=0.02 if self.cfg.learn_null else 0.0)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        c, p = self.cfg.in_channels, self.cfg.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        align_only: bool = False,
        project: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x: [B, 4, 28, 28] at time t [B] in [0, 1]; y: [B, 768] or None (null).

        Returns (velocity [B, 4, 28, 28] or None when ``align_only``, projected tokens
        [B, 196, 768] from block ``encoder_depth``, or None when not ``project``: sampling needs
        no projector, as REPA's ``SiT.inference``). ``align_only`` stops after that block.
        """
        b = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, b, drop)
        zs = None
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if i + 1 == self.cfg.encoder_depth and (project or align_only):
                zs = self.projectors[0](h)
                if align_only:
                    return None, zs
        return self.unpatchify(self.final_layer(h, c)), zs
