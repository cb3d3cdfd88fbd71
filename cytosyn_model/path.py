"""Path maths of the linear interpolant (t = 0 data, t = 1 noise), as SiT's ``transport/``: the
interpolant and its velocity (training), the score from a velocity (the SDE sampler). Shapes: x
[B, ...], t [B]."""

from __future__ import annotations

import torch

__all__ = ["interpolate", "score_from_velocity"]


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolant x_t = (1 - t) x + t eps (t=0 data, t=1 noise) and its velocity eps - x."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - tt) * x + tt * noise, noise - x


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of x_t = (1-t) x + t eps from the velocity: -(x_t + (1-t) v) / t."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return -(x + (1 - tt) * v) / tt
