"""Two full REPA-E training steps of cytosyn's Trainer equal the reference step of REPA-E's
``train_repae.py`` replayed with the reference classes: every loss term, every gradient that reaches
the VAE, the discriminator and the SiT (before clipping), the clipped norms, the parameters after the
AdamW updates, the latent BatchNorm statistics and the EMA. The first step runs before
``discriminator_start`` (factor 0), the second after it."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from cytosyn_model.train import StepNoise, TrainConfig, Trainer

from repa_e_oracle import (
    ConditionAdapter, load_reference, load_train_script, loss_config, reference_step, save_lpips_weights,
)

SIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, depth=4, num_heads=4,
           encoder_depth=2, z_dims=[32], projector_dim=48, num_classes=10, qk_norm=False, fused_attn=False)
OUR_SIT = dict(size="tiny", depth=4, hidden=64, heads=4, input_size=8, encoder_depth=2, projector_dim=48, z_dim=32,
               cond_dim=16, class_dropout=0.1)
LR, EMA, CLIP = 1e-3, 0.9, 1.0


def _reference_models(ref, tmp_path):
    torch.manual_seed(0)
    vae = ref.autoencoder.AutoencoderKL(embed_dim=4, ch_mult=[1, 2, 2])  # f4: 32 px -> 8x8 latents
    sit = ref.sit.SiT(**SIT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sit.named_parameters():  # no adaLN-Zero: every path carries gradient
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sit.init_bn(latents_scale=torch.tensor([1.5, 0.8, 1.2, 2.0]), latents_bias=torch.tensor([0.1, -0.3, 0.0, 0.2]))
    loss_fn = ref.losses.ReconstructionLoss_Single_Stage(loss_config(discriminator_start=1))
    for i in range(5):
        getattr(loss_fn.perceptual_loss.lpips, f"lin{i}").model[1].weight.data.uniform_(0, 0.1)
    ck = tmp_path / "0000010.pt"
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict(), "vae": vae.state_dict(),
                "discriminator": loss_fn.discriminator.state_dict(), "args": argparse.Namespace(seed=0), "steps": 10}, ck)
    return vae, sit, loss_fn, ck


def _our_trainer(tmp_path, ck, lpips_files, disc_state):
    cfg = TrainConfig(
        out=str(tmp_path / "run"), vae={"ch": 128, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "z_channels": 4},
        sit=OUR_SIT, vae_init=str(ck), sit_init=str(ck), lr=LR, ema_decay=EMA, grad_clip=CLIP,
        lpips_vgg_weights=str(lpips_files[0]), lpips_lin_weights=str(lpips_files[1]), gan_start_step=1,
        disc_channels=64, batch_size=2, num_workers=0,
    )
    tr = Trainer(cfg)
    tr.disc.load_state_dict(disc_state)
    for m in (tr.vae, tr.sit, tr.bn, tr.ema_vae, tr.ema_sit, tr.ema_bn):
        m.double()
    return tr


def _capture(named_params, store: dict, rename=lambda n: n):
    for name, p in named_params:
        flag = p.requires_grad  # pos_embed starts frozen; REPA-E makes it trainable in step 1
        p.requires_grad_(True)
        p.register_post_accumulate_grad_hook(lambda p, n=rename(name): store.__setitem__(n, p.grad.detach().clone()))
        p.requires_grad_(flag)


def test_two_training_steps_equal_the_reference(tmp_path):
    ref = load_reference()
    script = load_train_script()
    vae, sit, loss_fn, ck = _reference_models(ref, tmp_path)
    lpips_files = save_lpips_weights(loss_fn.perceptual_loss.lpips, tmp_path)
    tr = _our_trainer(tmp_path, ck, lpips_files, loss_fn.discriminator.state_dict())

    g = torch.Generator().manual_seed(2)
    cond = torch.randn(2, 16, generator=g, dtype=torch.float64)
    tok = torch.randn(2, 16, 32, generator=g, dtype=torch.float64)
    vae, sit = vae.double(), sit.double()
    sit.y_embedder = ConditionAdapter(tr.sit.y_embedder, cond, torch.zeros(2, dtype=torch.bool))
    ema = copy.deepcopy(sit)
    script.requires_grad(ema, False)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    r = {"vae": vae, "sit": sit, "ema": ema, "loss_fn": loss_fn, "opts": {"vae": adamw(vae), "sit": adamw(sit), "disc": adamw(loss_fn)}}
    grads_ref, grads_ours = {}, {}
    _capture(vae.named_parameters(prefix="vae"), grads_ref)
    _capture(sit.named_parameters(prefix="sit"), grads_ref, lambda n: n.replace("y_embedder.inner.", "y_embedder."))
    _capture(loss_fn.discriminator.named_parameters(prefix="disc"), grads_ref)
    for name in ("vae", "sit", "disc"):
        _capture(getattr(tr, name).named_parameters(prefix=name), grads_ours)

    for step, drop in enumerate(([True, False], [False, True])):
        noise = StepNoise(
            posterior=torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
            t=torch.rand(2, generator=g, dtype=torch.float64),
            path=torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
            drop=torch.tensor(drop),
        )
        x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        grads_ref.clear(), grads_ours.clear()
        theirs = reference_step(script, r, x, tok, noise, step, clip=CLIP, ema_decay=EMA)
        ours = tr.train_step({"image": x, "cls": cond, "tok": tok}, noise)
        _compare_step(step, ours, theirs, grads_ours, grads_ref)
        _compare_state(tr, r)


def _compare_step(step, ours, theirs, grads_ours, grads_ref):
    # the models run in float64 here, but the VAE loss terms are computed in float32 on both sides (as
    # REPA-E does): LPIPS and the discriminator's logits (a mean of values of both signs) then differ by
    # float32 rounding, which depends on the convolution kernels oneDNN picks for this CPU (1.05e-5
    # relative for gan_g on one AMD EPYC VM); the float64 terms keep the tight tolerance
    f32 = {"lpips", "gan_g", "vae_total"}
    for k in ("l1", "lpips", "kl", "gan_g", "align_vae", "vae_total", "denoise", "align_sit", "sit_total",
              "grad_norm_vae", "grad_norm_sit"):
        assert ours[k] == pytest.approx(float(theirs[k]), rel=1e-4 if k in f32 else 1e-5, abs=1e-9), (step, k)
    if step == 0:  # before discriminator_start: factor 0, no GAN term, a zero discriminator loss
        assert float(theirs["gan_d"]) == 0 and ours["gan_g"] == 0 and "gan_d" not in ours
    else:
        assert ours["gan_g"] != 0
        for k in ("gan_d", "grad_norm_disc"):
            assert ours[k] == pytest.approx(float(theirs[k]), rel=1e-4), (step, k)
    assert set(grads_ours) == set(grads_ref), set(grads_ours) ^ set(grads_ref)
    for name, gr in grads_ref.items():
        _assert_rel(grads_ours[name], gr, 5e-5, f"step {step} gradient of {name}")
    assert any(n.startswith("sit.pos_embed") for n in grads_ref)  # REPA-E trains pos_embed after the VAE step


def _compare_state(tr, r):
    pairs = [
        (tr.vae.state_dict(), r["vae"].state_dict()),
        (tr.disc.state_dict(), r["loss_fn"].discriminator.state_dict()),
        (_sit_state(tr.sit, tr.bn), _ref_sit_state(r["sit"])),
        (_sit_state(tr.ema_sit, tr.ema_bn), _ref_sit_state(r["ema"])),
        (tr.ema_vae.state_dict(), None),
    ]
    for ours, theirs in pairs[:4]:
        assert set(ours) == set(theirs), set(ours) ^ set(theirs)
        for k, v in theirs.items():
            # AdamW's first steps move each weight by about +-lr whatever |grad| is, so float32 rounding
            # in a gradient near eps moves a rare weight by up to ~1% of a step: the RMS difference must
            # stay under 0.1% of one step (a wrong lr, beta, eps, EMA or BN rule is ~100% of it)
            if v.dtype.is_floating_point:
                rms = float((ours[k].to(v.dtype) - v).pow(2).mean().sqrt())
                assert rms <= 1e-3 * LR, f"{k}: RMS difference {rms:.3g}"
            else:
                assert torch.equal(ours[k], v), k


def _assert_rel(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    """||ours - theirs|| <= tol * ||theirs|| (exact match for integer buffers). The VAE loss runs in
    float32 in both codes (REPA-E casts to float32), so float32 rounding reaches the float64 gradients:
    small gradient tensors (norm ~1e-2) differ by up to ~1e-5 of their norm, depending on the BLAS build;
    the loss values are still held to 1e-5."""
    if not theirs.dtype.is_floating_point:
        assert torch.equal(ours, theirs), what
        return
    diff = float((ours.to(theirs.dtype) - theirs).norm())
    assert diff <= tol * float(theirs.norm()) + 1e-12, f"{what}: |diff| {diff:.3g} vs |ref| {float(theirs.norm()):.3g}"


def _sit_state(sit, bn):
    state = {k: v for k, v in sit.state_dict().items()}
    state.update({f"bn.{k}": v for k, v in bn.bn.state_dict().items()})
    return state


def _ref_sit_state(sit):
    return {k.replace("y_embedder.inner.", "y_embedder."): v for k, v in sit.state_dict().items()
            if not k.startswith("y_embedder.inner.") or k.split(".")[2] in ("mlp", "null")}
