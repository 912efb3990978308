"""How much memory a run will need, worked out before it starts (the studio warns with it before queueing).

The peak of a run is the largest, over its stages, of the weights resident in that stage plus the stage's own
activations. Weights are exact (parameter counts × bytes per element, from the preset's model configs built on the
meta device). Activations follow the models' shapes:

- sampling: one MMDiT forward on a batch of guidance branches (2 for text-to-video, 3 with a reference) of
  N = video tokens + text tokens, holding `DIT_ACTIVATION_WIDTHS` hidden-widths per token at its peak (a block's
  input, modulated input, fused qkv + MLP projection, attention output, MLP activation, their concatenation and
  output; SDPA's fused kernels never hold the N×N scores);
- decoding (and encoding references): `VAE_ACTIVATION_COPIES` feature maps of the VAE's full-resolution channel
  count over every frame of one spatial tile (the whole frame when tiling is off).

Calibration. CPU (fp32): the peak RSS rise of the embedded model's sampling and decoding stages at 256×256 with
33, 65 and 129 frames grows as 32 widths and 10 copies (`bench`-style script: PeakRSSSampler per stage). CUDA
(bf16): Open-Sora 2.0 at 768×768, 129 frames, three branches, peaks at 60.3 GB on one H100; 18 widths give
23.8 GB (MMDiT) + 9.8 GB (T5 + CLIP) + 25.4 GB = 59.0 GB before headroom. One published point: treat the GPU
figure as an estimate until `bench/gpu_check.py` has compared it with a measured peak.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipelines.models import build_causal_vae, build_mmdit
from pipelines.options import ResolvedOptions
from pipelines.presets import ModelPreset
from pipelines.units import format_bytes

DIT_ACTIVATION_WIDTHS = {"cuda": 18, "cpu": 32}
VAE_ACTIVATION_COPIES = 10
HEADROOM = 1.1  # allocator caching and fragmentation
# Published sizes of the pretrained text encoders (they come from transformers, not from a config here).
TEXT_ENCODER_PARAMS = {"t5-clip": 4_762_310_656 + 123_060_480, "minilm": 22_713_216}
TEXT_TOKENS = {"t5-clip": 512, "minilm": 32}  # the encoders pad to these lengths


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes: weights per model, and resident weights + activations per stage."""

    weights: dict[str, int]
    stages: dict[str, int]
    device_type: str

    @property
    def peak(self) -> int:
        return int(max(self.stages.values()) * HEADROOM)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def verdict(self, available: int | None) -> tuple[bool, str]:
        """(fits, one line for the UI) against `available` bytes (None: unknown)."""
        where = "GPU" if self.device_type == "cuda" else "RAM"
        text = f"Estimated peak {format_bytes(self.peak)} of {where} (in {self.peak_stage.replace('_', ' ')})"
        if available is None:
            return True, text + "."
        if self.peak <= available:
            return True, f"{text}; {format_bytes(available)} available."
        return False, f"{text}, more than the {format_bytes(available)} available: it will likely run out of memory."


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


def preset_params(preset: ModelPreset) -> dict[str, int]:
    """Parameters of each model of a preset: MMDiT and VAE from their configs, text encoders from their sizes."""
    return {
        "mmdit": _config_params("mmdit", tuple(sorted((k, _freeze(v)) for k, v in preset.mmdit.items()))),
        "vae": _config_params("vae", tuple(sorted((k, _freeze(v)) for k, v in preset.vae.items()))),
        "text_encoder": TEXT_ENCODER_PARAMS.get(preset.text_encoder, 0),
    }


def _dit_activations(preset: ModelPreset, opts: ResolvedOptions, element: int, device_type: str) -> int:
    latent_frames = (opts.num_frames - 1) // preset.vae.get("time_compression_ratio", 4) + 1
    step = preset.spatial_compression
    video_tokens = latent_frames * -(-opts.height // step) * -(-opts.width // step)
    text_tokens = TEXT_TOKENS.get(preset.text_encoder, 0)
    branches = 3 if opts.cond_type != "t2v" else 2
    hidden = preset.mmdit["hidden_size"]
    widths = DIT_ACTIVATION_WIDTHS["cuda" if device_type == "cuda" else "cpu"]
    return branches * (video_tokens + text_tokens) * hidden * widths * element


def _vae_activations(preset: ModelPreset, opts: ResolvedOptions, element: int) -> int:
    vae = preset.vae
    channels = list(vae.get("block_out_channels", (128, 256, 512, 512)))[0]
    tile = vae.get("sample_size", 256) if vae.get("use_spatial_tiling", False) else None
    height, width = (min(opts.height, tile), min(opts.width, tile)) if tile else (opts.height, opts.width)
    feature_maps = VAE_ACTIVATION_COPIES * channels * opts.num_frames * height * width * element
    output = 3 * opts.num_frames * opts.height * opts.width * 4  # the stitched fp32 video
    return feature_maps + output


def estimate_memory(preset: ModelPreset, opts: ResolvedOptions, *, device_type: str, dtype: torch.dtype,
                    offload_plan: dict[str, tuple[str, ...]] | None = None) -> MemoryEstimate:
    """Peak memory of one run of `opts` on this preset. With an `offload_plan` (stage -> the models it keeps on
    the device) only those weights are resident in each stage; without one, all of them always are."""
    element = torch.empty((), dtype=dtype, device="meta").element_size()
    weights = {name: count * element for name, count in preset_params(preset).items()}
    vae = _vae_activations(preset, opts, element)  # the encoder sees a clip as large as the decoder makes
    activations = {"encode_text": 0, "encode_references": vae if opts.references else 0,
                   "sample": _dit_activations(preset, opts, element, device_type), "decode": vae}
    stages = {}
    for stage, extra in activations.items():
        resident = offload_plan[stage] if offload_plan else weights
        stages[stage] = sum(weights[name] for name in resident) + extra
    return MemoryEstimate(weights, stages, device_type)
