"""Feature extractors by name, built offline (timm / torchvision), weights from local paths only.

Each spec states in one place: the architecture, input size, resize filter, normalisation and
which tokens make the feature. ``tiny=True`` builds a small random model of the same family for
tests (its features mean nothing).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    input_size: int
    resize: str  # torch interpolate mode used to reach input_size ("bilinear", "bicubic")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature: str  # "pool" | "cls" | "cls+meanpatch"
    timm_name: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    dim: int = 0

    def identity(self, weights: str | None) -> str:
        """Hash of the spec and the weights file: the key of cached features."""
        from ..checkpoint import file_digest

        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        if weights:
            h.update(file_digest(weights).encode())
        return h.hexdigest()[:16]


def _swiglu():
    from timm.layers import SwiGLUPacked

    return dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)


REGISTRY: dict[str, ExtractorSpec] = {
    # torchvision Inception-V3, 2048-d pool features at 299 px (the FID variant's input and layer;
    # the TF-FID weights use a slightly different graph: give torchvision-format weights)
    "inception_v3": ExtractorSpec("inception_v3", 299, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pool", dim=2048),
    "dinov2_vitb14": ExtractorSpec("dinov2_vitb14", 224, "bicubic", *IMAGENET, "cls", "vit_base_patch14_dinov2",
                                   dict(img_size=224, init_values=1e-5), 768),
    "h_optimus_0": ExtractorSpec("h_optimus_0", 224, "bicubic", *HOPTIMUS, "cls", "vit_giant_patch14_reg4_dinov2",
                                 dict(img_size=224, init_values=1e-5), 1536),
    "uni": ExtractorSpec("uni", 224, "bicubic", *IMAGENET, "cls", "vit_large_patch16_224",
                         dict(img_size=224, init_values=1e-5), 1024),
    "uni2_h": ExtractorSpec("uni2_h", 224, "bicubic", *IMAGENET, "cls", "vit_giant_patch14_224",
                            dict(img_size=224, patch_size=14, depth=24, num_heads=24, embed_dim=1536, init_values=1e-5,
                                 mlp_ratio=2.66667 * 2, reg_tokens=8, no_embed_class=True, swiglu=True), 1536),
    "virchow2": ExtractorSpec("virchow2", 224, "bicubic", *IMAGENET, "cls+meanpatch", "vit_huge_patch14_224",
                              dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, swiglu=True), 2560),
    "phikon_v2": ExtractorSpec("phikon_v2", 224, "bicubic", *IMAGENET, "cls", "vit_large_patch16_224",
                               dict(img_size=224, init_values=1e-5), 1024),
    "h0_mini": ExtractorSpec("h0_mini", 224, "bicubic", *HOPTIMUS, "cls", "vit_base_patch14_reg4_dinov2",
                             dict(img_size=224, init_values=1e-5, mlp_ratio=4096 / 768 + 1e-4, swiglu=True), 768),
}


class Extractor(nn.Module):
    """images RGB in [0, 1], [B, 3, H, W] -> features [B, D] (float32)."""

    def __init__(self, spec: ExtractorSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.spec.input_size
        if images.shape[-1] != s or images.shape[-2] != s:
            images = F.interpolate(images, size=(s, s), mode=self.spec.resize, antialias=True, align_corners=False)
        x = (images - self.mean) / self.std
        if self.spec.feature == "pool":
            return self.model(x).float()
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.spec.feature == "cls+meanpatch":
            return torch.cat([cls, tokens[:, self.model.num_prefix_tokens:].mean(1)], dim=-1).float()
        return cls.float()


def build_extractor(name: str, weights: str | Path | None = None, tiny: bool = False) -> Extractor:
    """The named extractor; ``weights`` is required unless ``tiny`` (FileNotFoundError names both)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown extractor {name!r}; known: {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    if not tiny:
        if weights is None or not Path(weights).exists():
            raise FileNotFoundError(f"extractor {name}: weights file not found at {weights!r}; give its local path in the config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(spec, tiny)
    if not tiny:
        from ..checkpoint import load_state_dict, map_state_dict

        state = map_state_dict(load_state_dict(weights, f"extractor {name}"))
        res = model.load_state_dict(state, strict=False)
        if res.missing_keys:
            raise ValueError(f"extractor {name}: {weights} does not fit (missing {res.missing_keys[:4]})")
    return Extractor(spec, model)


def _build(spec: ExtractorSpec, tiny: bool) -> nn.Module:
    if spec.name == "inception_v3":
        from torchvision.models import inception_v3

        if tiny:
            m = nn.Sequential(nn.Conv2d(3, 8, 7, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            return m
        m = inception_v3(weights=None, aux_logits=False, init_weights=False)
        m.fc = nn.Identity()
        return m
    import timm

    kw = dict(spec.timm_kwargs)
    if kw.pop("swiglu", False):
        kw.update(_swiglu())
    if tiny:
        kw.update(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kw)


# ------------------------------------------------------------ preprocessing
def jpeg_roundtrip(quality: int) -> Callable:
    """uint8 [H, W, 3] -> the same tile after JPEG encoding at ``quality`` (Pillow, 4:2:0)."""
    import io

    import numpy as np
    from PIL import Image

    def f(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    f.__name__ = f"jpeg{quality}"
    return f


def center_crop(size: int) -> Callable:
    """uint8 [H, W, 3] -> its central size x size pixels (e.g. 256 -> 224)."""

    def f(img):
        h, w = img.shape[:2]
        y, x = (h - size) // 2, (w - size) // 2
        return img[y : y + size, x : x + size]

    f.__name__ = f"centercrop{size}"
    return f
