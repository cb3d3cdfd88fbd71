"""Per-channel normalisation of the VAE latents (REPA-E's latent BatchNorm).

BatchNorm without affine parameters on latents [B, C, h, w], eps 1e-4: in train mode it uses the
batch statistics and updates the running ones (momentum 0.1); in eval mode it uses the running
ones. REPA-E keeps it inside its SiT (``model.bn``); here it is its own module so that the EMA copy
keeps its own statistics and the decoder can de-normalise. In a job of several processes the train
mode uses the statistics of the global batch (every rank's latents; see distributed.py), so N ranks
x batch B normalise and update the running statistics as one process with batch N*B.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import GlobalBatchNorm2d


class LatentNorm(nn.Module):
    def __init__(self, channels: int = 4, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        self.bn = GlobalBatchNorm2d(channels, affine=False, momentum=momentum, eps=eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of eval mode: z * sqrt(running_var + eps) + running_mean."""
        bn = self.bn
        return z * torch.sqrt(bn.running_var + bn.eps).view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Running mean and variance per channel ([C] each), e.g. from REPA-E's latent statistics
        (``latents_bias`` = mean, ``latents_scale`` = 1 / std, as its ``SiT.init_bn``)."""
        c = self.bn.num_features
        mean, var = torch.as_tensor(mean).reshape(-1), torch.as_tensor(var).reshape(-1)
        if mean.numel() != c or var.numel() != c:
            raise ValueError(f"latent statistics have {mean.numel()}/{var.numel()} channels, the latents have {c}")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var > 0).all()):
            raise ValueError("latent statistics must be finite with a positive variance")
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
