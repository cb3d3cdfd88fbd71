"""GPU paths (bf16 training steps, sampling on CUDA); skipped cleanly without a GPU."""

from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision than the
    first Accelerator's: each test here starts (and leaves) a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_multi_step_training_and_sampling(tmp_path, precision):
    from cytosyn_model.generate import Generator
    from cytosyn_model.train import TrainConfig, Trainer

    d = yaml.safe_load((ROOT / "cytosyn_data" / "configs" / "train_tiny.yaml").read_text())["train"]
    d.update(out=str(tmp_path), mixed_precision=precision, gan_start_step=0)
    tr = Trainer(TrainConfig.from_dict(d))
    assert tr.device.type == "cuda"
    batch = {"image": torch.rand(4, 3, 224, 224) * 2 - 1, "cls": torch.randn(4, 64), "tok": torch.randn(4, 196, 64)}
    losses = [tr.train_step(batch)["sit_total"] for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpt = tr.save_checkpoint()
    gen = Generator.from_checkpoint(ckpt, "cuda")
    out = gen.generate(torch.randn(2, 64), 2, steps=5, sampler="heun")
    assert out.shape == (2, 224, 224, 3)
