"""Frozen tissue-segmentation networks, built offline in their published layouts, weights from local
files only (strict loading), as TRIDENT a91fa84 builds and runs them
(``trident/segmentation_models/load.py``: ``HESTSegmenter``, ``GrandQCSegmenter``):

- ``hest``: HEST's DeepLabV3-ResNet50 (torchvision, classifier head 2 classes), 512-px patches at
  1 micron per pixel; the released ``deeplabv3_seg_v4.ckpt`` is a Lightning checkpoint: its
  ``state_dict`` with the ``model.`` prefix removed and the auxiliary head dropped. Tissue where the
  softmax of class 1 is > 0.5.
- ``grandqc``: GrandQC's tissue detector, UNet++ with a timm-efficientnet-b0 encoder
  (segmentation-models-pytorch, ``pip install cytosyn[seg]``), 512-px patches at 10 microns per
  pixel, each JPEG-compressed at quality 80 first (it was trained so); ``Tissue_Detection_MPP10.pth``
  is a plain state dict. Tissue where class 0 has probability >= 0.5.

Both normalise with ImageNet's mean and std. ``random:small`` builds a small random network of the
same interface for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

from .registry import IMAGENET
from .weights import RandomWeights, load_state_dict, parse_weights, strict_load, weights_identity

__all__ = ["SEGMENTERS", "Segmenter", "SegmenterSpec", "build_segmenter", "convert_segmenter_state"]


@dataclass(frozen=True)
class SegmenterSpec:
    name: str
    mpp: float  # microns per pixel of the network's input
    input_size: int  # patch side, pixels
    jpeg_quality: int | None  # JPEG-compress each patch first (GrandQC was trained on JPEG thumbnails)
    weights: str  # what file to give


SEGMENTERS = {
    "hest": SegmenterSpec("hest", 1.0, 512, None, "deeplabv3_seg_v4.ckpt (huggingface MahmoodLab/hest-tissue-seg)"),
    "grandqc": SegmenterSpec("grandqc", 10.0, 512, 80, "Tissue_Detection_MPP10.pth (GrandQC, MahmoodLab/hest-tissue-seg)"),
}


def _network(name: str, small: bool) -> nn.Module:
    if small:  # the interface (RGB -> 2-class logits at the input's size), not the architecture
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    if name == "hest":
        m = deeplabv3_resnet50(weights=None, weights_backbone=None)
        m.classifier[4] = nn.Conv2d(256, 2, kernel_size=1, stride=1)
        return m
    try:
        import segmentation_models_pytorch as smp  # optional: the 'seg' extra
    except ImportError:
        raise ImportError("the grandqc segmenter needs segmentation-models-pytorch: pip install cytosyn[seg]") from None
    return smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2, activation=None)


def convert_segmenter_state(name: str, state: dict) -> dict:
    """A released file's tensors -> the network's names: HEST's Lightning checkpoint (``model.``
    prefix, ``aux`` head dropped, as TRIDENT's HESTSegmenter loads it); GrandQC's as it is."""
    if name == "hest" and any(k.startswith("model.") for k in state):
        return {k.replace("model.", "", 1): v for k, v in state.items() if "aux" not in k}
    return state


class Segmenter(nn.Module):
    """A frozen tissue segmenter: RGB uint8 patches [B, S, S, 3] at ``spec.mpp`` -> bool tissue [B, S, S]."""

    def __init__(self, spec: SegmenterSpec, network: nn.Module, weights):
        super().__init__()
        self.spec, self.network = spec, network
        self.weights_id = weights_identity(weights)
        self.register_buffer("mean", torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET[1]).view(1, 3, 1, 1), persistent=False)

    def _jpeg(self, patches: np.ndarray) -> np.ndarray:
        q = [int(cv2.IMWRITE_JPEG_QUALITY), self.spec.jpeg_quality]
        return np.stack([cv2.imdecode(cv2.imencode(".jpg", p, q)[1], cv2.IMREAD_UNCHANGED) for p in patches])

    @torch.no_grad()
    def forward(self, patches: np.ndarray) -> np.ndarray:
        if self.spec.jpeg_quality is not None:
            patches = self._jpeg(patches)
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(self.mean.device).permute(0, 3, 1, 2).float() / 255
        x = (x - self.mean) / self.std
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            out = self.network(x)
        logits = (out["out"] if isinstance(out, dict) else out).float()
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        p = torch.softmax(logits, dim=1)
        tissue = p[:, 1] > 0.5 if self.spec.name == "hest" else p[:, 0] >= 0.5
        return tissue.cpu().numpy()


def build_segmenter(name: str, weights, device: str = "cpu") -> Segmenter:
    """Segmenter ``name`` of :data:`SEGMENTERS` with ``weights`` (a local file, or ``random:small``)."""
    if name not in SEGMENTERS:
        raise KeyError(f"unknown segmenter {name!r}; known: {', '.join(sorted(SEGMENTERS))}")
    spec, w = SEGMENTERS[name], parse_weights(weights)
    if w is None:
        raise FileNotFoundError(f"segmenter {name}: no weights given (--segmenter-weights); weights are never "
                                f"downloaded: give the local file ({spec.weights})")
    random = isinstance(w, RandomWeights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(w.seed if random else 0)
        net = _network(name, random and w.small)
    if not random:
        strict_load(net, convert_segmenter_state(name, load_state_dict(w, f"segmenter {name}")), f"segmenter {name}", w)
    return Segmenter(spec, net.eval().requires_grad_(False), weights).to(device)
