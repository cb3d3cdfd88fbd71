"""cytosyn_model computes what REPA-E computes: each part against the reference code
(../shared/reference/repa-e, see tests/repa_e_oracle.py), same weights and inputs, float64 where
the reference allows it."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from cytosyn_model.checkpoint import load_latent_stats, load_sit, load_vae
from cytosyn_model.latent_norm import LatentNorm
from cytosyn_model.discriminator import PatchDiscriminator
from cytosyn_model.losses import repa_loss
from cytosyn_model.lpips import LPIPS
from cytosyn_model.sampling import euler_maruyama, ode_euler, ode_heun, sit_velocity_fn
from cytosyn_model.sit import SiT, SiTConfig, sincos_pos_embed_2d
from cytosyn_model.vae import AutoencoderKL, VAEConfig

from repa_e_oracle import ConditionAdapter, load_reference

SMALL_SIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, decoder_hidden_size=64, depth=4,
                 num_heads=4, encoder_depth=2, z_dims=[32], projector_dim=48, num_classes=10, qk_norm=False,
                 fused_attn=False)
OUR_SIT = SiTConfig(size="tiny", depth=4, hidden=64, heads=4, input_size=8, encoder_depth=2, projector_dim=48,
                    z_dim=32, cond_dim=16)


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def _randomise(module: torch.nn.Module, seed: int, skip: tuple[str, ...] = ("pos_embed",)) -> None:
    """Non-zero values everywhere (adaLN-Zero and the zeroed output layer would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)


def _ref_sit(ref, seed=0):
    torch.manual_seed(seed)
    m = ref.sit.SiT(**SMALL_SIT).double()
    _randomise(m, seed)
    return m


def _repa_e_checkpoint(path, sit=None, vae=None, ema=None):
    """A REPA-E training checkpoint as train_repae.py writes it (torch.save of state dicts + args)."""
    ck = {"args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8, seed=0), "steps": 10}
    if sit is not None:
        ck["model"] = sit.state_dict()
        ck["ema"] = (ema or sit).state_dict()
    if vae is not None:
        ck["vae"] = vae.state_dict()
    torch.save(ck, path)
    return path


# ------------------------------------------------------------------------- SiT
def test_pos_embed_equals_the_reference(ref):
    for dim, grid in ((64, 4), (1152, 14), (768, 16)):
        ours = sincos_pos_embed_2d(dim, grid)
        theirs = ref.sit.get_2d_sincos_pos_embed(dim, grid)
        assert ours.shape == theirs.shape
        assert (ours == theirs).all(), (dim, grid)
    sit = SiT(OUR_SIT)
    theirs = torch.from_numpy(ref.sit.get_2d_sincos_pos_embed(64, 4)).float().unsqueeze(0)
    assert torch.equal(sit.pos_embed.data, theirs)
    assert not sit.pos_embed.requires_grad and "pos_embed" in sit.state_dict()


def test_sit_velocity_and_repa_features_equal_the_reference(ref, tmp_path, capsys):
    theirs = _ref_sit(ref)
    with torch.no_grad():  # a checkpoint's pos_embed may differ from the formula (REPA-E trains it)
        theirs.pos_embed.add_(torch.randn_like(theirs.pos_embed) * 0.01)
    ours = SiT(OUR_SIT).double()
    report = load_sit(ours, _repa_e_checkpoint(tmp_path / "repae.pt", sit=theirs))
    assert report.skipped == {"y_embedder.embedding_table.weight": "REPA-E class-label embedder; CytoSyn conditions on the H0-mini CLS"}
    assert report.kept_at_init == ["y_embedder.null", "y_embedder.mlp.0.weight", "y_embedder.mlp.0.bias",
                                   "y_embedder.mlp.2.weight", "y_embedder.mlp.2.bias"]
    assert "skipped y_embedder.embedding_table.weight" in report.summary()
    assert torch.equal(ours.pos_embed.data, theirs.pos_embed.data)
    _randomise(ours.y_embedder, 7, skip=())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    cond = torch.randn(3, 16, generator=g, dtype=torch.float64)
    theirs.y_embedder = ConditionAdapter(ours.y_embedder, cond, torch.zeros(3, dtype=torch.bool))
    theirs.eval()
    ours.eval()
    v, zs = ours(x, t, cond)
    torch.testing.assert_close(v, theirs.inference(x, t, None), rtol=1e-12, atol=1e-12)
    h = theirs.forward_feats(x, t, None, depth=2)
    torch.testing.assert_close(zs, theirs.projectors[0](h), rtol=1e-12, atol=1e-12)


def test_sit_checkpoint_mismatches_are_listed(ref, tmp_path):
    theirs = ref.sit.SiT(**{**SMALL_SIT, "input_size": 16})  # 64 tokens: pos_embed of another size
    state = theirs.state_dict()
    state["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    torch.save({"ema": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError) as e:
        load_sit(SiT(OUR_SIT), tmp_path / "other.pt")
    msg = str(e.value)
    assert msg.startswith(f"sit_init: {tmp_path / 'other.pt'} does not match the model: ")
    assert "unexpected (1): blocks.9.attn.qkv.weight" in msg
    assert "pos_embed (1, 64, 64) != (1, 16, 64)" in msg and "mis-shaped (1)" in msg


def test_parameter_counts_equal_the_reference_classes(ref):
    with torch.device("meta"):
        theirs = ref.sit.SiT_XL_2(input_size=28, num_classes=1000, z_dims=[768], encoder_depth=8, qk_norm=False)
        ours = SiT(SiTConfig(size="XL", input_size=28, cond_dim=768, z_dim=768, projector_dim=2048))
        ref_vae, our_vae = ref.autoencoder.vae_models["f8d4"](), AutoencoderKL(VAEConfig())

    def count(m, skip=None):
        return sum(p.numel() for n, p in m.named_parameters() if skip is None or not n.startswith(skip))

    assert count(ours, "y_embedder.") == count(theirs, "y_embedder.")  # the condition embedders differ by design
    assert count(theirs.y_embedder) == 1001 * 1152
    assert count(ours.y_embedder) == 768 * 1152 + 1152 + 1152 * 1152 + 1152 + 768
    assert count(our_vae) == count(ref_vae) == 83_653_863
    assert count(PatchDiscriminator(64)) == count(ref.discriminator.NLayerDiscriminator(3, 64, 3))


# ------------------------------------------------------------------------- VAE
def test_vae_posterior_and_decoder_equal_the_reference_from_its_checkpoint(ref, tmp_path):
    torch.manual_seed(0)
    theirs = ref.autoencoder.vae_models["f8d4"]().double()
    ours = AutoencoderKL(VAEConfig()).double()
    load_vae(ours, _repa_e_checkpoint(tmp_path / "repae.pt", vae=theirs))
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    p_ref, p_ours = theirs.encode(x), ours.encode(x)
    torch.testing.assert_close(p_ours.mean, p_ref.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p_ours.logvar, p_ref.logvar, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p_ours.kl(), p_ref.kl(), rtol=1e-10, atol=1e-12)
    eps = torch.randn_like(p_ref.mean)
    z = p_ref.mean + p_ref.std * eps
    torch.testing.assert_close(p_ours.sample(noise=eps), z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-10, atol=1e-10)
    # a bare E2E-VAE state dict (the published e2e-vae .pt) loads the same
    torch.save(theirs.state_dict(), tmp_path / "e2e-vae.pt")
    again = AutoencoderKL(VAEConfig()).double()
    load_vae(again, tmp_path / "e2e-vae.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_diffusers_autoencoder_file_loads_and_decodes_identically(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=32,
    )
    _randomise(theirs, 3, skip=("encoder.conv_norm_out", "decoder.conv_norm_out"))
    theirs.save_pretrained(tmp_path / "vae")
    ours = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    load_vae(ours, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    theirs, ours = theirs.double().eval(), ours.double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, dist.mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(post.logvar, dist.logvar, rtol=1e-9, atol=1e-10)
        z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-9, atol=1e-9)
    folder = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).double()
    load_vae(folder, tmp_path / "vae")  # the save_pretrained folder itself
    assert all(torch.equal(a, b) for a, b in zip(folder.state_dict().values(), ours.state_dict().values()))


def test_vae_checkpoint_mismatch_lists_the_keys(tmp_path):
    state = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict()
    torch.save({"vae": state}, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"vae_init: .*small.pt does not match the model: missing \(28\): encoder\.down\.1\.downsample\.conv\.weight, "):
        load_vae(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)), tmp_path / "small.pt")


def test_latent_statistics_initialise_the_batchnorm(ref, tmp_path):
    scale, bias = torch.tensor([[[[2.0]], [[0.5]], [[1.0]], [[4.0]]]]), torch.tensor([[[[0.1]], [[-0.2]], [[0.3]], [[0.0]]]])
    torch.save({"latents_scale": scale, "latents_bias": bias}, tmp_path / "sdvae-f8d4-latents-stats.pt")
    bn = LatentNorm()
    bn.set_statistics(*load_latent_stats(tmp_path / "sdvae-f8d4-latents-stats.pt"))
    theirs = ref.sit.SiT(**{**SMALL_SIT, "input_size": 4})
    theirs.init_bn(latents_scale=scale.squeeze(), latents_bias=bias.squeeze())
    theirs.eval()
    bn.eval()
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn(z), theirs.bn(z))
    # the same statistics read back from a REPA-E checkpoint's BatchNorm
    mean, var = load_latent_stats(_repa_e_checkpoint(tmp_path / "ck.pt", sit=theirs))
    torch.testing.assert_close(var, theirs.bn.running_var)
    torch.testing.assert_close(mean, theirs.bn.running_mean)


# ------------------------------------------------------------------ losses
def test_lpips_equals_the_reference(ref, tmp_path):
    from repa_e_oracle import save_lpips_weights

    torch.manual_seed(0)
    theirs = ref.lpips.LPIPS().eval()
    for i in range(5):  # LPIPS lin weights are non-negative
        getattr(theirs, f"lin{i}").model[1].weight.data.uniform_(0, 0.1)
    ours = LPIPS(*save_lpips_weights(theirs, tmp_path))
    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    d = ours(a, b)
    assert d.shape == (3,)
    torch.testing.assert_close(d, theirs((a + 1) / 2, (b + 1) / 2).flatten(), rtol=1e-5, atol=1e-7)


def test_discriminator_is_initialised_as_taming(ref):
    torch.manual_seed(5)
    theirs = ref.discriminator.NLayerDiscriminator(3, 64, 3).apply(ref.discriminator.weights_init)
    torch.manual_seed(5)
    ours = PatchDiscriminator(64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    bn = ours.main[3].weight
    assert abs(float(bn.mean()) - 1) < 0.01 and abs(float(bn.std()) - 0.02) < 0.005


def test_repa_loss_equals_the_reference_projection_loss(ref):
    g = torch.Generator().manual_seed(2)
    zt, z = torch.randn(3, 16, 32, generator=g, dtype=torch.float64), torch.randn(3, 16, 32, generator=g, dtype=torch.float64)
    proj = torch.tensor(0.0, dtype=torch.float64)
    for zj, ztj in zip(z, zt):  # the reference's loop (models/sit.py, SiT.forward)
        proj += ref.sit.mean_flat(-(F.normalize(zj, dim=-1) * F.normalize(ztj, dim=-1)).sum(dim=-1))
    torch.testing.assert_close(repa_loss(zt, z), proj / 3, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------- samplers
class _LabelModel:
    """REPA's sampler interface (``inference(x, t, labels)``, null label 1000) over our SiT."""

    def __init__(self, sit, table):
        self.sit, self.table = sit, table

    def inference(self, x, t, y):
        drop = y == 1000
        return self.sit(x, t, self.table[y.clamp(max=self.table.shape[0] - 1)], drop=drop)[0]


@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_samplers_with_cfg_interval_equal_the_reference(ref, sampler):
    torch.manual_seed(0)
    sit = SiT(OUR_SIT).double().eval()
    _randomise(sit, 4)
    table = torch.randn(10, 16, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7])
    noise = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    kw = dict(cfg_scale=2.0, guidance_low=0.3, guidance_high=0.7)
    fn = sit_velocity_fn(sit, torch.float64)
    with torch.no_grad():
        if sampler == "sde":
            torch.manual_seed(11)
            theirs = ref.samplers.euler_maruyama_sampler(_LabelModel(sit, table), noise, labels, num_steps=12, **kw)
            ours = euler_maruyama(fn, noise, table[labels], steps=12, generator=torch.Generator().manual_seed(11), **kw)
        else:
            theirs = ref.samplers.euler_sampler(_LabelModel(sit, table), noise, labels, num_steps=12, heun=sampler == "heun", **kw)
            ours = (ode_heun if sampler == "heun" else ode_euler)(fn, noise, table[labels], steps=12, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # the guidance interval matters: without it the result differs
    unguided = (ode_heun if sampler == "heun" else ode_euler)(fn, noise, table[labels], steps=12) if sampler != "sde" else None
    if unguided is not None:
        assert not torch.allclose(unguided, ours)


def test_heun_decides_guidance_from_t_cur_for_both_evaluations(ref):
    """A step whose t_cur is inside the interval and t_next outside: the corrector is guided too."""
    torch.manual_seed(1)
    sit = SiT(OUR_SIT).double().eval()
    _randomise(sit, 5)
    table = torch.randn(10, 16, dtype=torch.float64)
    labels, noise = torch.tensor([2, 3]), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    kw = dict(cfg_scale=3.0, guidance_low=0.55, guidance_high=1.0)  # t = 1, 0.75, 0.5: the 2nd step ends outside
    with torch.no_grad():
        theirs = ref.samplers.euler_sampler(_LabelModel(sit, table), noise, labels, num_steps=4, heun=True, **kw)
        ours = ode_heun(sit_velocity_fn(sit, torch.float64), noise, table[labels], steps=4, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
