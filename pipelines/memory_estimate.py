"""How much memory a run will need, worked out before it starts (the studio warns with it before a run).

The peak of a run is the largest, over its stages, of the weights resident in that stage plus the stage's own
activations. Weights are exact (parameter counts × bytes per element, from the preset's model configs built on the
meta device). Activations follow the models' shapes:

- sampling: one MMDiT forward on the batch of guidance branches the sampler runs (`needed_branches`: 2 for
  text-to-video, 3 with a reference) of N = video tokens + text tokens, holding `DIT_ACTIVATION_WIDTHS`
  hidden-widths per token at its peak (a block's input, modulated input, fused qkv + MLP projection, attention
  output, MLP activation, their concatenation and output; SDPA's fused kernels never hold the N×N scores);
- decoding: `VAE_ACTIVATION_COPIES` feature maps of the VAE's full-resolution channel count over every frame of
  one spatial tile (the whole frame when tiling is off); encoding references: the same over their frames.

Calibration. CPU (fp32): the peak RSS rise of the embedded model's sampling and decoding stages at 256×256 with
33, 65 and 129 frames grows as 32 widths and 10 copies (`python bench/memory.py`). CUDA (bf16): Open-Sora 2.0 at
768×768, 129 frames, three branches, peaks at 60.3 GB on one H100; 18 widths give 23.8 GB (MMDiT) + 0.5 GB (VAE)
+ 9.8 GB (T5 + CLIP) + 25.4 GB of activations = 59.4 GB. Activations get `HEADROOM` on top for the allocator's
caching. One published point: treat the GPU figure as an estimate until `bench/gpu_check.py` has compared it with
a measured peak.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipelines.models import CausalVAEConfig, build_causal_vae, build_mmdit
from pipelines.models.text_encoders import TEXT_TOKENS
from pipelines.options import ResolvedOptions
from pipelines.presets import ModelPreset
from pipelines.sampling import needed_branches
from pipelines.units import format_bytes

DIT_ACTIVATION_WIDTHS = {"cuda": 18, "cpu": 32}
VAE_ACTIVATION_COPIES = 10
HEADROOM = 1.1  # on activations: allocator caching and fragmentation
# Published sizes of the pretrained text encoders (they come from transformers, not from a config here).
TEXT_ENCODER_PARAMS = {"t5-clip": 4_762_310_656 + 123_060_480, "minilm": 22_713_216}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes: weights per model, and resident weights + activations per stage."""

    weights: dict[str, int]
    stages: dict[str, int]
    device_type: str
    host: int = 0  # RAM the run holds besides the device's: with offloading, every model's weights live there
    host_available: int | None = None  # what the host has for it (set by the engine; None: not judged)

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        """The stage with the peak; on a tie the later one (decoding, not encoding the references)."""
        return max(reversed(list(self.stages)), key=self.stages.get)

    def verdict(self, available: int) -> tuple[bool, str]:
        """(fits, one line for the UI) against `available` bytes of the device, and, when offloading, the host's
        RAM against `host_available`."""
        where = "GPU" if self.device_type == "cuda" else "RAM"
        text = f"Estimated peak {format_bytes(self.peak)} of {where} (in {self.peak_stage.replace('_', ' ')})"
        host = f" plus {format_bytes(self.host)} of RAM for the offloaded weights" if self.host else ""
        if self.peak > available:
            return False, (f"{text}{host}, more than the {format_bytes(available)} available: it will likely run "
                           "out of memory.")
        if self.host and self.host_available is not None and self.host > self.host_available:
            return False, (f"{text}{host}, more than the {format_bytes(self.host_available)} of RAM available: "
                           "the offloaded weights will likely not fit.")
        return True, f"{text}{host}; {format_bytes(available)} available."


@functools.lru_cache(maxsize=8)
def _config_params(kind: str, config_items: tuple) -> int:
    """Parameter count of a model config, built on the meta device (no memory, no weights read)."""
    build = build_mmdit if kind == "mmdit" else build_causal_vae
    with torch.device("meta"):
        model = build(**{key: _unfreeze(value) for key, value in config_items})
    return sum(p.numel() for p in model.parameters())


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _unfreeze(value):
    return list(value) if isinstance(value, tuple) else value


def count_preset_params(preset: ModelPreset) -> dict[str, int]:
    """Parameters of each model of a preset: MMDiT and VAE from their configs, text encoders from their sizes."""
    if preset.text_encoder not in TEXT_ENCODER_PARAMS:
        raise ValueError(f"no size known for text encoder {preset.text_encoder!r}")
    return {
        "mmdit": _config_params("mmdit", tuple(sorted((k, _freeze(v)) for k, v in preset.mmdit.items()))),
        "vae": _config_params("vae", tuple(sorted((k, _freeze(v)) for k, v in preset.vae.items()))),
        "text_encoder": TEXT_ENCODER_PARAMS[preset.text_encoder],
    }


def guidance_branches(opts: ResolvedOptions) -> int:
    """Branches the sampler batches per model call at its full guidance scales (see `needed_branches`)."""
    return len(needed_branches(opts.guidance, opts.guidance_img, opts.has_condition))


def _dit_activations(preset: ModelPreset, opts: ResolvedOptions, element: int,
                     device_type: str, branches: int) -> int:
    tokens = preset.video_tokens(opts.num_frames, opts.height, opts.width) + TEXT_TOKENS[preset.text_encoder]
    widths = DIT_ACTIVATION_WIDTHS["cuda" if device_type == "cuda" else "cpu"]
    return branches * tokens * preset.mmdit["hidden_size"] * widths * element


def _vae_activations(vae: CausalVAEConfig, frames: int, height: int, width: int, element: int) -> int:
    """Feature maps of the widest full-resolution stage over `frames` frames of one tile, plus the fp32 video."""
    if vae.use_spatial_tiling:
        tile_h, tile_w = min(height, vae.sample_size), min(width, vae.sample_size)
    else:
        tile_h, tile_w = height, width
    feature_maps = VAE_ACTIVATION_COPIES * vae.block_out_channels[0] * frames * tile_h * tile_w * element
    return feature_maps + 3 * frames * height * width * 4


def estimate_memory(preset: ModelPreset, opts: ResolvedOptions, *, device_type: str, dtype: torch.dtype,
                    offload_plan: dict[str, tuple[str, ...]] | None = None,
                    branches: int | None = None) -> MemoryEstimate:
    """Peak memory of one run of `opts` on this preset. With an `offload_plan` (stage -> the models it keeps on
    the device) only those weights are resident in each stage; without one, all of them always are. `branches`
    overrides the guidance batch (e.g. 3 for upstream's sampler, which never skips a branch)."""
    element = torch.empty((), dtype=dtype, device="meta").element_size()
    weights = {name: count * element for name, count in count_preset_params(preset).items()}
    branches = branches or guidance_branches(opts)
    # References are images (one frame each, encoded one at a time) or the clip's conditioning frames.
    reference_frames = opts.reference_frames or 1
    vae = CausalVAEConfig.from_dict(preset.vae)
    activations = {
        "encode_text": 0,
        "encode_references": (_vae_activations(vae, reference_frames, opts.height, opts.width, element)
                              if opts.references else 0),
        "sample": _dit_activations(preset, opts, element, device_type, branches),
        "decode": _vae_activations(vae, opts.num_frames, opts.height, opts.width, element),
    }
    stages = {}
    for stage, extra in activations.items():
        resident = offload_plan[stage] if offload_plan else weights
        stages[stage] = sum(weights[name] for name in resident) + int(extra * HEADROOM)
    # Offloaded models load into RAM and wait there between their stages: the host holds all of them at load.
    return MemoryEstimate(weights, stages, device_type, host=sum(weights.values()) if offload_plan else 0)
