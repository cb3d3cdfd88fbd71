"""Model package: gradient flow of REPA-E, a CPU smoke run with exact resume, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tile_two_slides

from cytosyn_encoders.h0mini import build_h0_mini, resize_tokens
from cytosyn_model.checkpoint import load_into, map_state_dict
from cytosyn_model.cli import sample_main, train_main
from cytosyn_model.data import make_loader, model_images
from cytosyn_model.lpips import LPIPS
from cytosyn_model.train import NaNLossError, TrainConfig, Trainer, train
from cytosyn_model.vae import AutoencoderKL, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_conf(out: Path, **over) -> TrainConfig:
    d = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())["train"]
    d.update(out=str(out), **over)
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cmu_slide, tcga_slide):
    return tile_two_slides(tmp_path_factory.mktemp("tiles"), cmu_slide, tcga_slide, "64") / "shards"


def _batch(shards, n=4):
    return next(iter(make_loader(shards, n, seed=0, shuffle_buffer=1)))


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_gradient_flow_of_the_three_passes(tmp_path, shards):
    tr = Trainer(tiny_conf(tmp_path, gan_start_step=0))
    batch = _batch(shards)
    x = model_images(batch["image"], "cpu")
    cls, tok = tr._features(batch)
    noise = tr.draw_noise(4)
    rec, post, z = tr.encode(x, noise)

    # the SiT loss gives no gradient to the VAE
    tr.sit_losses(z, noise, cls, tok)["sit_total"].backward(retain_graph=True)
    assert all(g is None for g in _grads(tr.vae))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(tr.sit))
    tr.sit.zero_grad(set_to_none=True)

    # the VAE step (SiT frozen as in train_step) gives none to the SiT ...
    for p in tr.sit.parameters():
        p.requires_grad_(False)
    for p in tr.disc.parameters():
        p.requires_grad_(False)
    losses = tr.vae_losses(x, rec, post, z, noise, cls, tok)
    assert losses["gan_g"] != 0
    losses["vae_total"].backward(retain_graph=True)
    assert all(g is None for g in _grads(tr.sit)) and all(g is None for g in _grads(tr.disc))
    # ... and the alignment loss alone reaches the VAE encoder (not the decoder)
    tr.vae.zero_grad(set_to_none=True)
    losses["align_vae"].backward()
    enc = [g for g in _grads(tr.vae.encoder) if g is not None]
    assert enc and sum(float(g.abs().sum()) for g in enc) > 0
    assert all(g is None for g in _grads(tr.vae.decoder))


def test_smoke_training_losses_fall_resume_is_exact_and_samples_are_written(tmp_path, shards):
    conf = dict(max_steps=20, lr=1e-3, log_every=1, ckpt_every=10, sample_every=10, gan_start_step=8)
    full = train(tiny_conf(tmp_path / "full", **conf), shards)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = log[:5], log[-5:]
    for term in ("l1", "denoise"):
        assert np.mean([r[term] for r in last]) < np.mean([r[term] for r in first]), term
    assert "gan_d" in log[-1] and "gan_d" not in log[0]
    assert all(0 <= r["data_wait"] <= 1 for r in log)  # the fraction of each interval spent waiting for batches
    assert (tmp_path / "full" / "samples" / "step_0000020.png").exists()
    assert full.step == 20

    # stopped after step 10 (its checkpoint), resumed: step 11 on has identical losses
    part = tiny_conf(tmp_path / "part", **conf)
    train(part, shards, stop_after=10)
    train(part, shards)  # resume='auto' finds step_0000010
    resumed = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for a, b in zip(log[10:], resumed[10:]):
        for k in ("l1", "kl", "denoise", "align_sit", "gan_d", "grad_norm_sit"):
            assert a[k] == b[k], (a["step"], k)


def test_nan_loss_stops_with_the_step_and_term(tmp_path, shards):
    tr = Trainer(tiny_conf(tmp_path))
    batch = _batch(shards)
    batch["image"] = model_images(batch["image"], "cpu")  # the loader's uint8 as the model's floats
    batch["image"][0, 0, 0, 0] = float("nan")
    batch["cls"], batch["tok"] = tr._features(_batch(shards))
    with pytest.raises(NaNLossError, match=r"step 1: loss term 'l1' is nan"):
        tr.train_step(batch)


def test_cli_train_then_sample_all_modes(tmp_path, shards):
    cfg = tmp_path / "c.yaml"
    d = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())
    d["train"].update(max_steps=3, ckpt_every=3, sample_every=3)
    cfg.write_text(yaml.safe_dump(d))
    assert train_main(["--shards", str(shards), "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert (tmp_path / "run" / "report" / "img" / "step_0000003.png").exists()  # the run's page with its grid
    common = ["--checkpoint", str(ckpt), "--ref-shards", str(shards), "--h0-mini-weights", "random:small", "--steps", "4", "--batch-size", "3"]
    assert sample_main(common + ["--out", str(tmp_path / "c"), "--mode", "cond", "-n", "5", "--sampler", "sde"]) == 0
    pngs = sorted((tmp_path / "c").glob("gen__*.png"))
    assert len(pngs) == 5 and (tmp_path / "c" / "grid.png").exists()
    from PIL import Image

    assert Image.open(pngs[0]).size == (224, 224)
    assert sample_main(common + ["--out", str(tmp_path / "i"), "--mode", "interpolate", "--interp-steps", "4", "--sampler", "heun"]) == 0
    assert len(list((tmp_path / "i").glob("gen__*.png"))) == 4
    assert sample_main(common + ["--out", str(tmp_path / "v"), "--mode", "variations", "-n", "3", "--format", "shards"]) == 0
    assert (tmp_path / "v" / "generated-000000.tar").exists()
    assert sample_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "u"), "--mode", "uncond", "-n", "2", "--steps", "3", "--sampler", "euler"]) == 0
    # the batch size does not change the samples
    assert sample_main(common + ["--out", str(tmp_path / "c2"), "--mode", "cond", "-n", "5", "--sampler", "sde", "--batch-size", "5"]) == 0
    for p in pngs:
        assert p.read_bytes() == (tmp_path / "c2" / p.name).read_bytes()


def test_repa_e_style_checkpoints_load(tmp_path):
    vae = AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1))
    wrapped = {"state_dict": {f"module.vae.{k}": v.clone() for k, v in vae.state_dict().items()}}
    torch.save(wrapped, tmp_path / "e2e.pt")
    fresh = AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1))
    load_into(fresh, tmp_path / "e2e.pt", "vae", prefix="vae.")
    for k, v in vae.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert map_state_dict({"ema._orig_mod.blocks.0.w": torch.zeros(1)}) .keys() == {"blocks.0.w"}
    with pytest.raises(FileNotFoundError, match="vae: weights file not found at"):
        load_into(fresh, tmp_path / "missing.safetensors", "vae")


def test_lpips_module_and_missing_weights_message():
    with pytest.raises(FileNotFoundError, match="lpips_weight: 0"):
        LPIPS(None, None)
    lp = LPIPS("random", "random")
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(lp(a, a), torch.zeros(2))
    assert (lp(a, a.flip(-1)) > 0).all()


def test_h0_mini_tokens_and_missing_weights():
    with pytest.raises(FileNotFoundError, match="h0_mini: weights file not found at /nonexistent/h0-mini.safetensors"):
        build_h0_mini("/nonexistent/h0-mini.safetensors")
    tok = torch.randn(2, 256, 8)
    grid = tok.transpose(1, 2).reshape(2, 8, 16, 16)
    ref = F.interpolate(grid, size=(14, 14), mode="bicubic", antialias=True).reshape(2, 8, 196).transpose(1, 2)
    assert torch.equal(resize_tokens(tok), ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_seeks_to_the_same_batches_without_replaying(tmp_path, workers, monkeypatch):
    """Shards of 5 samples, batches of 3: a loader started at batch k yields batches k, k+1, ... of
    an uninterrupted loader, and reads at most one shard per stream before its first batch."""
    from cytosyn_data.io.png import encode_png
    from cytosyn_data.io.tar_write import write_tar_atomic
    from cytosyn_model import data as D

    rng = np.random.default_rng(0)
    for s in range(4):
        write_tar_atomic(tmp_path / f"s{s}.tar", [(f"k{s}_{i}.png", encode_png(rng.integers(0, 255, (224, 224, 3), np.uint8)))
                                                 for i in range(5)])
    def keys(done, n):
        it = iter(make_loader(tmp_path, 3, seed=4, num_workers=workers, shuffle_buffer=4, batches_done=done))
        return [next(it)["key"] for _ in range(n)]

    full = keys(0, 14)
    assert len({k for b in full for k in b}) > 10  # shards drawn with replacement, visit after visit
    for k in (1, 5, 9):
        assert keys(k, 14 - k) == full[k:]
    opened = []
    real = D.wds.tarfile_to_samples
    monkeypatch.setattr(D.wds, "tarfile_to_samples", lambda: (lambda src: (opened.append(1), real()(src))[1]))
    it = iter(D.VisitStream(sorted(str(p) for p in tmp_path.glob("*.tar")), seed=1, skip=37, shuffle_buffer=4)())
    next(it)
    assert len(opened) == 1  # 37 samples (7 visits) skipped by their counts, one shard read
    # the counts persist for later resumes (a shard whose file changed is counted again)
    cache = tmp_path / "counts" / "shard_samples.json"
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    next(iter(D.VisitStream(urls, seed=1, skip=37, shuffle_buffer=4, counts=D.SampleCounts(cache))()))
    assert {v[1] for v in json.loads(cache.read_text()).values()} == {5}
    import cytosyn_data.io.tar_read as T

    monkeypatch.setattr(T, "count_samples", lambda url: (_ for _ in ()).throw(AssertionError("recounted")))
    again = D.VisitStream(urls, seed=1, skip=37, shuffle_buffer=4, counts=D.SampleCounts(cache))
    assert next(iter(again())) is not None
