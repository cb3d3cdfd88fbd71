"""Training and sampling speed of cytosyn against the REPA-E reference loop, same sizes, one run.

    python benchmarks/repa_e_speed.py --model small --image 64 --batch 2     # CPU sanity check
    python benchmarks/repa_e_speed.py --model xl --image 224 --batch 32      # SiT-XL/2 + f8d4, bf16 on a GPU

Training: images/s of cytosyn's ``Trainer.train_step`` and of REPA-E's ``train_repae.py`` step replayed
with the reference classes (tests/repa_e_oracle.py; LPIPS with random VGG weights on both sides,
discriminator on from step 0). Sampling: images/s of the Euler-Maruyama SDE (``--sde-steps``, CFG
2.5 on [0, 0.75]) of latents with cytosyn's sampler and with REPA-E's ``euler_maruyama_sampler``.
Needs ../shared/reference/repa-e. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from repa_e_oracle import (  # noqa: E402
    ConditionAdapter, load_reference, load_train_script, loss_config, reference_step, save_lpips_weights,
)

from cytosyn_model.sampling import euler_maruyama, sit_velocity_fn  # noqa: E402
from cytosyn_model.train import TrainConfig, Trainer  # noqa: E402

SIZES = {"xl": dict(depth=28, hidden_size=1152, num_heads=16), "small": dict(depth=4, hidden_size=128, num_heads=4)}


def _timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def build(args, dev, tmp: Path):
    ref = load_reference()
    size, latent = SIZES[args.model], args.image // 8
    rsit = ref.sit.SiT(input_size=latent, patch_size=2, in_channels=4, decoder_hidden_size=size["hidden_size"],
                       encoder_depth=min(8, size["depth"]), z_dims=[768], projector_dim=2048, num_classes=1000,
                       qk_norm=False, fused_attn=True, **size)
    rvae = ref.autoencoder.vae_models["f8d4"]()
    loss_fn = ref.losses.ReconstructionLoss_Single_Stage(loss_config(discriminator_start=0))
    files = save_lpips_weights(loss_fn.perceptual_loss.lpips, tmp)
    cfg = TrainConfig(
        out=str(tmp / "run"), sit={"size": "XL" if args.model == "xl" else "tiny", "input_size": latent,
                                   "depth": size["depth"], "hidden": size["hidden_size"], "heads": size["num_heads"],
                                   "encoder_depth": min(8, size["depth"])},
        batch_size=args.batch, mixed_precision="bf16" if dev.type == "cuda" else "no", gan_start_step=0,
        lpips_vgg_weights=str(files[0]), lpips_lin_weights=str(files[1]), num_workers=0,
    )
    return ref, rsit.to(dev), rvae.to(dev), loss_fn.to(dev), Trainer(cfg)


def bench_training(args, dev, ref, rsit, rvae, loss_fn, tr) -> tuple[float, float]:
    from cytosyn_model.train import StepNoise

    b, latent = args.batch, args.image // 8
    x = torch.rand(b, 3, args.image, args.image, device=dev) * 2 - 1
    cls, tok = torch.randn(b, 768, device=dev), torch.randn(b, latent * latent // 4, 768, device=dev)
    batch = {"image": x, "cls": cls, "tok": tok}
    ours = _timed(lambda: tr.train_step(batch), args.steps, args.warmup)
    script = load_train_script()
    rsit.y_embedder = ConditionAdapter(tr.sit.y_embedder, cls, torch.zeros(b, dtype=torch.bool, device=dev)).to(dev)
    ema = copy.deepcopy(rsit).requires_grad_(False)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    r = {"vae": rvae, "sit": rsit, "ema": ema, "loss_fn": loss_fn, "opts": {"vae": adamw(rvae), "sit": adamw(rsit), "disc": adamw(loss_fn)}}

    def ref_step():
        noise = StepNoise.draw(b, (4, latent, latent), 0.1, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            reference_step(script, r, x, tok, noise, 1)

    theirs = _timed(ref_step, args.steps, args.warmup)
    return b / ours, b / theirs


def bench_sampling(args, dev, rsit, tr) -> tuple[float, float]:
    ref = load_reference()
    n, latent = args.n, args.image // 8
    noise = torch.randn(n, 4, latent, latent, device=dev)
    labels = torch.randint(0, 1000, (n,), device=dev)
    cond = torch.randn(n, 768, device=dev)
    sit = tr.ema_sit.eval()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kw = dict(cfg_scale=2.5, guidance_low=0.0, guidance_high=0.75)
    # the reference SiT samples with its own class-label embedder
    rsit.y_embedder = ref.sit.LabelEmbedder(1000, rsit.pos_embed.shape[-1], 0.1).to(dev)
    rsit.eval()

    def ours(steps):
        return euler_maruyama(sit_velocity_fn(sit), noise, cond, steps=steps, **kw)

    def theirs(steps):
        return ref.samplers.euler_maruyama_sampler(rsit, noise, labels, num_steps=steps, **kw)

    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
        ours(4), theirs(4)  # warm-up: kernels, allocator, thread pools
        t_ours = _timed(lambda: ours(args.sde_steps), 1, 0)
        t_theirs = _timed(lambda: theirs(args.sde_steps), 1, 0)
        t_ours = min(t_ours, _timed(lambda: ours(args.sde_steps), 1, 0))  # both timed twice, alternating
        t_theirs = min(t_theirs, _timed(lambda: theirs(args.sde_steps), 1, 0))
    return n / t_ours, n / t_theirs


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(SIZES), default="small")
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n", type=int, default=8, help="images sampled")
    ap.add_argument("--sde-steps", type=int, default=250)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        ref, rsit, rvae, loss_fn, tr = build(args, dev, Path(tmp))
        ours, theirs = bench_training(args, dev, ref, rsit, rvae, loss_fn, tr)
        s_ours, s_theirs = bench_sampling(args, dev, rsit, tr)
    prec = "bf16" if dev.type == "cuda" else "float32"
    print(f"device: {name}; SiT-{args.model} + f8d4 VAE + LPIPS + PatchGAN; {args.image} px; batch {args.batch}; {prec}")
    print(f"train step   cytosyn {ours:8.2f} images/s | REPA-E loop {theirs:8.2f} images/s | ratio {ours / theirs:.2f}")
    print(f"SDE {args.sde_steps} steps cytosyn {s_ours:8.3f} images/s | REPA-E sampler {s_theirs:8.3f} images/s | ratio {s_ours / s_theirs:.2f}")


if __name__ == "__main__":
    main()
