"""Samplers against a model that returns the exact velocity of a known Gaussian target."""

import torch

from cytosyn_model.sampling import euler_maruyama, guidance_active, guided_velocity, ode_euler, ode_heun

MU, S = 1.5, 0.5  # data ~ N(MU, S^2) per coordinate


def exact_velocity(x, t, y=None):
    """E[eps - x0 | x_t] for x_t = (1-t) x0 + t eps, x0 ~ N(MU, S^2)."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    e_x0 = MU + (1 - t) * S**2 / var * centred
    e_eps = t / var * centred
    return e_eps - e_x0


def test_sde_and_odes_recover_the_gaussian():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for out in (
        euler_maruyama(exact_velocity, noise, steps=250, generator=torch.Generator().manual_seed(1)),
        ode_euler(exact_velocity, noise, steps=250),
        ode_heun(exact_velocity, noise, steps=50),
    ):
        assert abs(out.mean().item() - MU) < 0.02
        assert abs(out.std().item() - S) < 0.02


def _cond_model(x, t, y):
    """Velocity that depends on the condition: rows of y that are NaN mean 'null'."""
    base = exact_velocity(x, t)
    if y is None:
        return base
    null = torch.isnan(y).any(-1).view(-1, 1).to(x.dtype)
    return base + (1 - null) * torch.nan_to_num(y)[:, :1]


def test_cfg_outside_the_interval_equals_the_conditional_model():
    x = torch.randn(8, 1, dtype=torch.float64)
    y = torch.full((8, 3), 0.3, dtype=torch.float64)
    for t in (0.8, 0.9, 1.0):  # outside [0, 0.75]
        assert not guidance_active(t, y, 2.5, 0.0, 0.75)
        v = guided_velocity(_cond_model, x, t, y, 2.5, guidance_active(t, y, 2.5, 0.0, 0.75))
        assert torch.equal(v, _cond_model(x, torch.full((8,), t, dtype=torch.float64), y))
    assert guidance_active(0.5, y, 2.5, 0.0, 0.75) and not guidance_active(0.5, y, 1.0, 0.0, 0.75)
    assert not guidance_active(0.5, None, 2.5, 0.0, 0.75)
    v = guided_velocity(_cond_model, x, 0.5, y, 2.5, True)
    cond = _cond_model(x, torch.full((8,), 0.5, dtype=torch.float64), y)
    uncond = exact_velocity(x, torch.full((8,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(v, uncond + 2.5 * (cond - uncond))


def test_sampling_with_an_empty_interval_equals_the_conditional_sampler():
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.full((64, 2), 0.2, dtype=torch.float64)
    a = ode_heun(_cond_model, noise, y, steps=20, cfg_scale=4.0, guidance_low=2.0, guidance_high=3.0)
    b = ode_heun(_cond_model, noise, y, steps=20, cfg_scale=1.0)
    assert torch.equal(a, b)
    c = ode_heun(_cond_model, noise, y, steps=20, cfg_scale=4.0)
    assert not torch.equal(a, c)
