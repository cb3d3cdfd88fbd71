"""`cytosyn-export`: a diffusers-style folder that diffusers loads and that samples as the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cytosyn_model.cli import export_main, sample_main
from cytosyn_model.generate import Generator
from cytosyn_model.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    d = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())["train"]
    # channels multiples of 32: diffusers' AutoencoderKL has one GroupNorm group count (as f8d4)
    d.update(out=str(out), h0_mini_weights="random:small", vae={"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                                                                 "z_channels": 4})
    tr = Trainer(TrainConfig.from_dict(d))
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial EMA weights and latent statistics
        for m in (tr.ema_vae, tr.ema_sit):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        tr.ema_bn.set_statistics(torch.randn(4) * 0.3, torch.rand(4) + 0.5)
    return tr.save_checkpoint()


def test_export_loads_in_diffusers_and_decodes_as_ours(checkpoint, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"), "--steps", "20"]) == 0
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "m" / "vae").eval()
    ours = Generator.from_checkpoint(checkpoint, "cpu").vae
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, ours.encode(x).mean, rtol=1e-5, atol=1e-5)
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and json.loads((tmp_path / "m" / "sampler.json").read_text())["steps"] == 20
    card = (tmp_path / "m" / "README.md").read_text()
    assert "## Training" in card and "steps: 0" in card


def test_samples_from_the_folder_equal_the_checkpoints(checkpoint, tmp_path):
    from cytosyn_model.export import export_model

    export_model(checkpoint, tmp_path / "m")
    a = Generator.from_checkpoint(checkpoint, "cpu").generate(None, 2, seed=3, sampler="euler", steps=4)
    b = Generator.from_model_dir(tmp_path / "m", "cpu").generate(None, 2, seed=3, sampler="euler", steps=4)
    assert np.array_equal(a, b)
    args = ["--out", str(tmp_path / "s"), "--mode", "uncond", "-n", "2", "--steps", "4", "--sampler", "euler", "--seed", "3"]
    assert sample_main(["--model", str(tmp_path / "m"), *args]) == 0
    assert sample_main(["--checkpoint", str(checkpoint), *[a.replace("/s", "/t") for a in args]]) == 0
    assert (tmp_path / "s" / "grid.png").read_bytes() == (tmp_path / "t" / "grid.png").read_bytes()


def test_a_vae_diffusers_cannot_express_is_refused(tmp_path):
    from cytosyn_data.core.errors import UsageError
    from cytosyn_model.export import diffusers_vae_config
    from cytosyn_model.vae import VAEConfig

    with pytest.raises(UsageError, match=r"channels \[16, 16, 32, 32\] are not all multiples of 32"):
        diffusers_vae_config(VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1), 64)


def test_export_of_a_folder_that_is_no_checkpoint_exits_2(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a cytosyn-train checkpoint" in capsys.readouterr().err
