"""A tiny randomly initialised preset for engine tests (real MiniLM text encoder, small MMDiT and VAE)."""

from pipelines.presets import ModelPreset, SamplingDefaults

TINY_VAE = dict(latent_channels=4, block_out_channels=[16, 16, 16], layers_per_block=1, norm_num_groups=4,
                spatial_compression_ratio=4, scale_factor=1.0)
TINY_MMDIT = dict(in_channels=16, vec_in_dim=384, context_in_dim=384, hidden_size=64, num_heads=2,
                  axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1, cond_embed=True)


def tiny_preset(**sampling) -> ModelPreset:
    defaults = dict(resolution="64px", aspect_ratio="1:1", resolutions=("64px",), aspect_ratios=("1:1",),
                    num_frames=9, max_frames=69, fps=8, num_steps=3, guidance=4.0, guidance_img=2.0, max_pixels=4096)
    return ModelPreset(name="tiny-test", description="random weights for tests", mmdit=TINY_MMDIT, vae=TINY_VAE,
                       text_encoder="minilm", mmdit_weights=None, vae_weights=None,
                       sampling=SamplingDefaults(**{**defaults, **sampling}), trained=False)
