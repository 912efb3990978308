"""The MMDiT and causal VAE against the released key manifests and upstream's forward passes."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.models import build_causal_vae, build_mmdit
from tests.golden import golden_file, read_manifest

RELEASED_MMDIT = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                      num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000,
                      qkv_bias=True, guidance_embed=False, fused_qkv=False, use_liger_rope=True, cond_embed=True,
                      from_pretrained="./ckpts/Open_Sora_v2.safetensors", grad_ckpt_settings=None, cache_dir=None)
RELEASED_VAE = dict(in_channels=3, out_channels=3, layers_per_block=2, latent_channels=16)


def state_manifest(module):
    return [(k, tuple(t.shape)) for k, t in module.state_dict().items()]


def test_released_mmdit_config_matches_official_key_manifest():
    with torch.device("meta"):
        model = build_mmdit(**RELEASED_MMDIT)
    assert state_manifest(model) == read_manifest("opensora_v2_mmdit_keys.tsv")
    assert sum(p.numel() for p in model.parameters()) == 11_891_390_528


def test_released_vae_config_matches_official_key_manifest():
    with torch.device("meta"):
        vae = build_causal_vae(**RELEASED_VAE)
    assert state_manifest(vae) == read_manifest("hunyuan_vae_keys.tsv")
    assert sum(p.numel() for p in vae.parameters()) == 246_478_803


def test_fused_variant_uses_fused_names_and_guidance_embedder():
    cfg = dict(RELEASED_MMDIT, fused_qkv=True, guidance_embed=True, cond_embed=False, hidden_size=64, num_heads=2,
               axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1, context_in_dim=8, vec_in_dim=8)
    keys = set(build_mmdit(**cfg).state_dict())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.0.linear1.weight" in keys
    assert "guidance_in.in_layer.weight" in keys and not any(k.startswith("cond_in") for k in keys)
    assert not any("q_proj" in k or "v_mlp" in k for k in keys)


def test_unknown_config_field_is_refused():
    with pytest.raises(ValueError, match="unknown MMDiT config fields"):
        build_mmdit(**dict(RELEASED_MMDIT, hiden_size=3))


def test_data_prediction_returns_the_velocity_of_the_predicted_clean_latent():
    """prediction="data": the same weights' last layer reads as x̂, and the forward returns (x_t - x̂) / t with t held
    at DATA_PREDICTION_MIN_T or above; anything but velocity/data is refused."""
    from pipelines.models.mmdit import DATA_PREDICTION_MIN_T
    from tests.tiny_preset import TINY_MMDIT

    torch.manual_seed(0)
    velocity = build_mmdit(**TINY_MMDIT).eval()
    data = build_mmdit(**dict(TINY_MMDIT, prediction="data")).eval()
    data.load_state_dict(velocity.state_dict(), strict=True)  # no new weights
    b, frames, side = 2, 2, 2
    ids = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side), indexing="ij"),
                      dim=-1).reshape(1, -1, 3).expand(b, -1, -1).float()
    inputs = dict(img=torch.randn(b, ids.shape[1], 16), img_ids=ids, txt=torch.randn(b, 5, 384),
                  txt_ids=torch.zeros(b, 5, 3), y_vec=torch.randn(b, 384), cond=torch.randn(b, ids.shape[1], 16 + 2**2))
    t = torch.tensor([0.6, 0.01])
    with torch.no_grad():
        x_hat, out = velocity(timesteps=t, **inputs), data(timesteps=t, **inputs)
    expected = (inputs["img"] - x_hat) / torch.tensor([0.6, DATA_PREDICTION_MIN_T])[:, None, None]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="prediction must be one of"):
        build_mmdit(**dict(TINY_MMDIT, prediction="noise"))


def golden_mmdit(**overrides):
    """(model with the golden weights loaded strictly, its inputs, upstream's output) of the golden MMDiT case."""
    golden = load_file(golden_file("mmdit_A.safetensors"))
    config = json.loads(golden_file("mmdit_A.json").read_text())["config"]
    model = build_mmdit(**{**config, **overrides}).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in golden.items() if k.startswith("model.")}, strict=True)
    inputs = {k[len("input."):]: v for k, v in golden.items() if k.startswith("input.")}
    return model, inputs, golden["output"]


def test_mmdit_reproduces_upstream_forward():
    model, inputs, expected = golden_mmdit()
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float().cpu() - expected).abs().max() / expected.abs().max())


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions (TF32 alone would miss the fp32 tolerance), restored afterwards."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        yield
    torch.set_float32_matmul_precision(precision)


@needs_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_mmdit_reproduces_upstream_forward_on_cuda(dtype, tolerance, no_tf32):
    """The GPU path (SDPA kernels, bf16 inference) against the same golden forward."""
    model, inputs, expected = golden_mmdit()
    model = model.to("cuda", dtype)
    with torch.no_grad():
        out = model(**{k: v.to("cuda", dtype) for k, v in inputs.items()})
    assert out.dtype == dtype and _relative_error(out, expected) < tolerance


def test_rope_convention_matters_for_released_weights():
    """Flux's interleaved RoPE must give a different model: the golden file can tell the two apart."""
    model, inputs, expected = golden_mmdit(use_liger_rope=False)
    with torch.no_grad():
        out = model(**inputs)
    assert (out - expected).abs().max() > 1e-3


@pytest.fixture(scope="module")
def golden_vae():
    golden = load_file(golden_file("vae_C.safetensors"))
    config = json.loads(golden_file("vae_C.json").read_text())["config"]
    vae = build_causal_vae(**config).eval()
    vae.load_state_dict({k[len("model."):]: v for k, v in golden.items() if k.startswith("model.")}, strict=True)
    return vae, golden


@pytest.mark.parametrize("suffix", ["", "_img"])
def test_vae_reproduces_upstream_encode_and_decode(golden_vae, suffix):
    vae, golden = golden_vae
    x = golden["input.x" + suffix]
    with torch.no_grad():
        z, posterior = vae.encode(x, return_posterior=True)
        y = vae.decode(golden["output.z" + suffix])
    torch.testing.assert_close(z, golden["output.z" + suffix], atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.mean, golden["output.posterior_mean" + suffix], atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.logvar, golden["output.posterior_logvar" + suffix], atol=1e-5, rtol=0)
    torch.testing.assert_close(y, golden["output.y" + suffix], atol=1e-5, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_vae_reproduces_upstream_decode_on_cuda(golden_vae, dtype, tolerance, no_tf32):
    vae, golden = golden_vae
    gpu = copy.deepcopy(vae).to("cuda", dtype)  # the module-scoped fixture stays on the CPU
    with torch.no_grad():
        z = gpu.encode(golden["input.x"].to("cuda", dtype))
        y = gpu.decode(golden["output.z"].to("cuda", dtype))
    assert _relative_error(z, golden["output.z"]) < tolerance
    assert _relative_error(y, golden["output.y"]) < tolerance


@pytest.mark.parametrize("frames,latent", [(1, 1), (5, 2), (9, 3), (17, 5)])
def test_vae_causal_frame_counts(golden_vae, frames, latent):
    vae, _ = golden_vae
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, frames, 16, 16))
        assert z.shape[2] == latent == vae.latent_frames(frames)
        assert vae.decode(z).shape[2] == frames == vae.video_frames(latent)


def test_causal_conv_and_attention_never_see_future_frames():
    """GroupNorm statistics span all frames (as upstream), so causality is a property of the conv and attention."""
    from pipelines.models.vae_blocks import CausalConv3d, FrameCausalAttention

    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 4, 4)
    x_future_changed = x.clone()
    x_future_changed[:, :, 3:] = torch.randn(1, 8, 2, 4, 4)
    for layer in (CausalConv3d(8, 8, 3), FrameCausalAttention(8, groups=1)):
        layer.group_norm = torch.nn.Identity() if hasattr(layer, "group_norm") else None
        with torch.no_grad():
            a, b = layer(x), layer(x_future_changed)
        torch.testing.assert_close(a[:, :, :3], b[:, :, :3])
        assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_vae_posterior_sampling_is_seeded(golden_vae):
    vae, golden = golden_vae
    with torch.no_grad():
        a = vae.encode(golden["input.x"], sample_posterior=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(golden["input.x"], sample_posterior=True, generator=torch.Generator().manual_seed(3))
        mean = vae.encode(golden["input.x"])
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, mean)


class LocalEncoder(torch.nn.Module):
    """A receptive-field-free stand-in (frame subsampling + average pooling) so tiling must be exact."""

    def __init__(self, latent_channels):
        super().__init__()
        self.latent_channels = latent_channels

    def forward(self, x):  # (B, 3, T, H, W) -> (B, 2 * C, (T - 1) / 4 + 1, H / 8, W / 8)
        pooled = torch.nn.functional.avg_pool3d(x[:, :, ::4], (1, 8, 8))
        return pooled.repeat(1, 2 * self.latent_channels // 3 + 1, 1, 1, 1)[:, : 2 * self.latent_channels]


class LocalDecoder(torch.nn.Module):
    def forward(self, z):  # (B, C, T_lat, h, w) -> (B, 3, 4 (T_lat - 1) + 1, 8h, 8w)
        frames = torch.cat([z[:, :3, :1], z[:, :3, 1:].repeat_interleave(4, dim=2)], dim=2)
        return torch.nn.functional.interpolate(frames, scale_factor=(1, 8, 8), mode="nearest")


def test_vae_tiling_stitches_tiles_exactly_for_a_local_model():
    config = json.loads(golden_file("vae_C.json").read_text())["config"]
    plain = build_causal_vae(**config).eval()
    tiled = build_causal_vae(**dict(config, use_spatial_tiling=True, use_temporal_tiling=True, sample_size=64,
                                    sample_tsize=16)).eval()
    tiled.load_state_dict(plain.state_dict())
    for vae in (plain, tiled):
        vae.encoder, vae.decoder = LocalEncoder(4), LocalDecoder()
    x = torch.rand(1, 3, 33, 112, 144) * 2 - 1
    with torch.no_grad():
        z_plain, z_tiled = plain.encode(x), tiled.encode(x)
        y_plain, y_tiled = plain.decode(z_plain), tiled.decode(z_plain)
    assert z_plain.shape == (1, 4, 9, 14, 18) and y_plain.shape == x.shape
    torch.testing.assert_close(z_tiled, z_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_tiled, y_plain, atol=1e-5, rtol=0)


def test_vae_tiles_blend_with_already_blended_neighbours_as_upstream():
    # Upstream blends each tile in place, so a tile's top/left neighbours are read after their own blending: the
    # top-left pixel of tile (1, 1) ends up as its diagonal neighbour (0, 0), not as (0, 1) or (1, 0).
    from pipelines.models.vae import _stitch_tiles

    size, blend, keep = 8, 4, 4
    tiles = [[torch.full((1, 1, 1, size, size), float(value)) for value in row] for row in ((1, 2), (3, 4))]
    out = _stitch_tiles(tiles, blend, keep)
    assert out.shape[-2:] == (2 * keep, 2 * keep)
    assert out[..., keep, keep].item() == 1.0 and out[..., 0, 0].item() == 1.0
    assert out[..., keep, keep + 1].item() != 3.0  # the rest of the corner mixes all four
