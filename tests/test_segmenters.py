"""Deep tissue segmenters (--segmenter hest|grandqc): the released layouts load strictly, the forward
is TRIDENT's, and the tile stage runs with them (random weights: no weights can be downloaded).

Replayed: TRIDENT mahmoodlab/TRIDENT@a91fa84, trident/segmentation_models/load.py (HESTSegmenter:
``deeplabv3_resnet50``, ``classifier[4] = Conv2d(256, 2, 1)``, ``state_dict`` keys with ``model.``
removed and ``aux`` dropped, tissue = softmax[:, 1] > 0.5; GrandQCSegmenter: ``smp.UnetPlusPlus(
'timm-efficientnet-b0', classes=2)``, JPEG quality 80, tissue = (max prob >= 0.5) * (1 - class)).
"""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from cytosyn_data.cli import main
from cytosyn_encoders.segmenters import build_segmenter

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


def _patches(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)


def test_hest_lightning_checkpoint_loads_and_segments_as_trident(tmp_path):
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    trained = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)  # as HEST trained it
    trained.classifier[4] = nn.Conv2d(256, 2, kernel_size=1, stride=1)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, "epoch": 7}
    assert any("aux" in k for k in ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "deeplabv3_seg_v4.ckpt")
    seg = build_segmenter("hest", tmp_path / "deeplabv3_seg_v4.ckpt")
    x = _patches(1)
    # TRIDENT's HESTSegmenter: ToTensor, Normalize(ImageNet), model(image)['out'], softmax[:, 1] > 0.5
    ref = deeplabv3_resnet50(weights=None, weights_backbone=None)
    ref.classifier[4] = nn.Conv2d(256, 2, kernel_size=1, stride=1)
    ref.load_state_dict({k.replace("model.", ""): v for k, v in ckpt["state_dict"].items() if "aux" not in k})
    ref.eval()
    with torch.no_grad():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - IMAGENET[0]) / IMAGENET[1]
        want = (torch.softmax(ref(t)["out"], dim=1)[:, 1] > 0.5).numpy()
    assert np.array_equal(seg(x), want)


def test_grandqc_state_dict_loads_and_segments_as_trident(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(1)
    released = smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2, activation=None)
    torch.save(released.state_dict(), tmp_path / "Tissue_Detection_MPP10.pth")
    seg = build_segmenter("grandqc", tmp_path / "Tissue_Detection_MPP10.pth")
    x = _patches(1, seed=2)
    released.eval()
    jpeg = np.stack([cv2.imdecode(cv2.imencode(".jpg", p, [int(cv2.IMWRITE_JPEG_QUALITY), 80])[1], cv2.IMREAD_UNCHANGED)
                     for p in x])  # TRIDENT's JpegCompressionTransform(quality=80)
    t = (torch.from_numpy(jpeg).permute(0, 3, 1, 2).float() / 255 - IMAGENET[0]) / IMAGENET[1]
    probs = torch.softmax(released.predict(t), dim=1)
    max_probs, classes = torch.max(probs, dim=1)
    want = ((max_probs >= 0.5) * (1 - classes)).numpy().astype(bool)
    assert np.array_equal(seg(x), want)
    torch.save({"encoder.conv_stem.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="segmenter grandqc: .*other.pth does not match the model: missing"):
        build_segmenter("grandqc", tmp_path / "other.pth")


@pytest.mark.parametrize("segmenter", ["hest", "grandqc"])
def test_the_tile_stage_runs_with_a_deep_segmenter(tmp_path, cmu_slide, segmenter, capsys):
    if segmenter == "grandqc":
        pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / segmenter
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(out), "--tiles", "6", "--segmenter", segmenter,
                 "--segmenter-weights", "random:small"]) == 0
    slides = pl.read_parquet(out / "slides.parquet")
    assert slides["status"][0] == "ok" and (out / "qc" / "cmu-1-small-region.png").exists()
    assert "segmenter" in (out / "run.json").read_text()
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "x"), "--segmenter", segmenter]) == 2
    assert f"segmenter {segmenter} needs segmenter_weights" in capsys.readouterr().err
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "y"), "--segmenter", segmenter,
                 "--segmenter-weights", str(tmp_path / "missing.pth")]) == 2
    assert "segmenter_weights: file not found" in capsys.readouterr().err


def test_large_slides_are_segmented_patch_by_patch_like_whole(cmu_slide, monkeypatch):
    """Above WHOLE_PIXELS each network patch is read from the pyramid on its own: the mask agrees
    with the whole-image path but for pixels at tissue borders (the two resample differently)."""
    from cytosyn_data.wsi import dl_tissue
    from cytosyn_data.wsi.slide import load_wsi

    seg = build_segmenter("hest", "random:small:seed=6")  # a seed whose random mask is neither empty nor full
    with load_wsi(cmu_slide) as s:
        thumb = s.thumbnail((139, 185))
        whole = dl_tissue.segment_tissue(s, 0.499, thumb, seg, batch_size=4)
        monkeypatch.setattr(dl_tissue, "WHOLE_PIXELS", 1000)
        patched = dl_tissue.segment_tissue(s, 0.499, thumb, seg, batch_size=4)
    assert whole.shape == patched.shape == (185, 139)
    assert (whole == patched).mean() > 0.94 and 0.1 < whole.mean() < 0.9
