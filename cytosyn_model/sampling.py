"""Samplers for the linear interpolant (t=1 noise -> t=0 data), as pure functions.

``model(x, t, y)`` returns the velocity eps - x for latents ``x`` [B, ...] at times ``t``
[B]; ``y`` is the condition or None (the null condition). Classifier-free guidance is
applied only while ``guidance_low <= t <= guidance_high`` (guidance interval) and the scale is
above 1, as in REPA/REPA-E's ``samplers.py``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .path import score_from_velocity

ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def guidance_active(t: float, y, scale: float, low: float, high: float) -> bool:
    """CFG applies when there is a condition, ``scale`` > 1 and ``low <= t <= high`` (REPA's samplers)."""
    return y is not None and scale > 1.0 and low <= t <= high


def guided_velocity(model: ModelFn, x: torch.Tensor, t: float, y, scale: float, guided: bool) -> torch.Tensor:
    """Velocity at time ``t``: ``uncond + scale (cond - uncond)`` when ``guided``, else the conditional one."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if not guided:
        return model(x, tb, y)
    both = model(torch.cat([x, x]), torch.cat([tb, tb]), _cat_null(y))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def _cat_null(y):
    """Conditions followed by as many null conditions (NaN rows mark 'null' for the model wrapper)."""
    return torch.cat([y, torch.full_like(y, float("nan"))])


def time_grid(steps: int, t_end: float, device, dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(1.0, t_end, steps, device=device, dtype=dtype)


@torch.no_grad()
def euler_maruyama(
    model: ModelFn,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 0.75,
    t_last: float = 0.04,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Reverse SDE dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW with w(t) = 2t (SiT/REPA),
    from t=1 to ``t_last`` in ``steps - 1`` stochastic steps, then one noise-free step to t=0.

    ``generator`` may be one generator per row, so that a row's path does not depend on the
    batch it is sampled in."""
    x = noise.to(torch.float64)
    ts = torch.cat([time_grid(steps, t_last, x.device), torch.zeros(1, device=x.device, dtype=torch.float64)])
    for i in range(steps):
        t_cur, t_next = float(ts[i]), float(ts[i + 1])
        dt = t_next - t_cur
        guided = guidance_active(t_cur, y, cfg_scale, guidance_low, guidance_high)
        v = guided_velocity(model, x, t_cur, y, cfg_scale, guided).to(torch.float64)
        tb = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float64)
        diffusion = 2.0 * t_cur
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, tb)
        x = x + drift * dt
        if i < steps - 1:  # the last step is noise-free
            x = x + (diffusion * abs(dt)) ** 0.5 * _randn_like(x, generator)
    return x.to(noise.dtype)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)


@torch.no_grad()
def ode_euler(model: ModelFn, noise: torch.Tensor, y=None, steps: int = 50, cfg_scale: float = 1.0,
              guidance_low: float = 0.0, guidance_high: float = 0.75) -> torch.Tensor:
    """Probability-flow ODE dx/dt = v from t=1 to t=0 with ``steps`` Euler steps."""
    x = noise.to(torch.float64)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        guided = guidance_active(float(ts[i]), y, cfg_scale, guidance_low, guidance_high)
        v = guided_velocity(model, x, float(ts[i]), y, cfg_scale, guided)
        x = x + (float(ts[i + 1]) - float(ts[i])) * v.to(torch.float64)
    return x.to(noise.dtype)


@torch.no_grad()
def ode_heun(model: ModelFn, noise: torch.Tensor, y=None, steps: int = 50, cfg_scale: float = 1.0,
             guidance_low: float = 0.0, guidance_high: float = 0.75) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Euler on the last step to t=0).

    Whether CFG applies is decided from t_cur for both evaluations of a step, as REPA's ``euler_sampler``."""
    x = noise.to(torch.float64)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t_cur, t_next = float(ts[i]), float(ts[i + 1])
        guided = guidance_active(t_cur, y, cfg_scale, guidance_low, guidance_high)
        v = guided_velocity(model, x, t_cur, y, cfg_scale, guided).to(torch.float64)
        x_euler = x + (t_next - t_cur) * v
        if i < steps - 1:
            v2 = guided_velocity(model, x_euler, t_next, y, cfg_scale, guided).to(torch.float64)
            x = x + (t_next - t_cur) * 0.5 * (v + v2)
        else:
            x = x_euler
    return x.to(noise.dtype)


SAMPLERS = {"sde": euler_maruyama, "euler": ode_euler, "heun": ode_heun}


def sit_velocity_fn(sit, dtype=torch.float32) -> ModelFn:
    """Wrap a SiT as ``model(x, t, y)``: rows of ``y`` that are NaN use the null condition."""

    def fn(x, t, y):
        x = x.to(dtype)
        t = t.to(dtype)
        if y is None:
            return sit(x, t, None, project=False)[0]
        y = y.to(dtype)
        drop = torch.isnan(y).any(dim=-1)
        return sit(x, t, torch.nan_to_num(y), drop=drop, project=False)[0]

    return fn
