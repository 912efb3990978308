"""The one typed registry of model presets: what to build, where its weights are, and its sampling defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_PRESET = "shapes-default"
OFFICIAL_REPO = "hpcai-tech/Open-Sora-v2"

_OFFICIAL_MMDIT = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                       num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000,
                       qkv_bias=True, guidance_embed=False, fused_qkv=False, use_liger_rope=True, cond_embed=True,
                       patch_size=2)
_OFFICIAL_VAE = dict(in_channels=3, out_channels=3, layers_per_block=2, latent_channels=16,
                     use_spatial_tiling=True, use_temporal_tiling=False)


@dataclass(frozen=True)
class SamplingDefaults:
    resolution: str = "256px"
    aspect_ratio: str = "16:9"
    resolutions: tuple[str, ...] = ("256px", "768px")
    aspect_ratios: tuple[str, ...] = ("16:9", "9:16", "1:1", "2.39:1")
    num_frames: int = 129
    max_frames: int = 129
    fps: int = 24
    motion_score: int = 4
    num_steps: int = 50
    guidance: float = 7.5
    guidance_img: float = 3.0
    max_pixels: int = 768 * 1344  # largest H*W the preset accepts


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    mmdit: dict
    vae: dict
    text_encoder: str  # "t5-clip" | "minilm"
    mmdit_weights: str | None  # local path or hf://owner/repo/file
    vae_weights: str | None
    text_encoder_paths: dict = field(default_factory=dict)  # t5 / clip folders (local or hf://owner/repo/folder)
    sampling: SamplingDefaults = SamplingDefaults()
    trained: bool = True
    official: bool = False  # strict loading, bf16 on GPU
    notes: str = ""

    @property
    def spatial_compression(self) -> int:
        return self.vae.get("spatial_compression_ratio", 8) * self.mmdit.get("patch_size", 2)

    def video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """The MMDiT's video tokens for a clip: latent frames (causal VAE) × patches per frame."""
        latent_frames = (num_frames - 1) // self.vae.get("time_compression_ratio", 4) + 1
        step = self.spatial_compression
        return latent_frames * -(-height // step) * -(-width // step)


def _official(name: str, resolution: str) -> ModelPreset:
    return ModelPreset(
        name=name, description=f"Open-Sora 2.0 (11B MMDiT, Hunyuan VAE, T5-XXL + CLIP-L), {resolution} defaults",
        mmdit=_OFFICIAL_MMDIT, vae=_OFFICIAL_VAE, text_encoder="t5-clip",
        mmdit_weights=f"hf://{OFFICIAL_REPO}/Open_Sora_v2.safetensors",
        vae_weights=f"hf://{OFFICIAL_REPO}/hunyuan_vae.safetensors",
        text_encoder_paths={"t5": f"hf://{OFFICIAL_REPO}/google/t5-v1_1-xxl",
                            "clip": f"hf://{OFFICIAL_REPO}/openai/clip-vit-large-patch14"},
        sampling=SamplingDefaults(resolution=resolution), official=True)


def load_embedded_preset(folder: Path = ASSETS_DIR / DEFAULT_PRESET) -> ModelPreset:
    """The embedded default, described by the JSON config that training writes next to its weights."""
    config = json.loads((folder / "config.json").read_text())
    sampling = config.get("sampling", {})
    for key in ("resolutions", "aspect_ratios"):
        if key in sampling:
            sampling[key] = tuple(sampling[key])
    return ModelPreset(
        name=config.get("name", DEFAULT_PRESET), description=config.get("description", ""),
        mmdit=config["mmdit"], vae=config["vae"], text_encoder=config.get("text_encoder", "minilm"),
        mmdit_weights=str(folder / "mmdit.safetensors"), vae_weights=str(folder / "vae.safetensors"),
        sampling=SamplingDefaults(**sampling), trained=bool(config.get("trained", False)),
        notes=config.get("notes", ""))


def available_presets() -> list[str]:
    names = ["opensora-v2-256px", "opensora-v2-768px"]
    if (ASSETS_DIR / DEFAULT_PRESET / "config.json").exists():
        names.insert(0, DEFAULT_PRESET)
    return names


def get_preset(name: str, weights_dir: str | None = None) -> ModelPreset:
    """Look a preset up by name. `weights_dir` points the official presets at a local folder holding the same
    file names as the Hub repo (Open_Sora_v2.safetensors, hunyuan_vae.safetensors, google/..., openai/...)."""
    if name == DEFAULT_PRESET:
        folder = ASSETS_DIR / DEFAULT_PRESET
        if not (folder / "config.json").exists():
            raise ValueError(f"the embedded default is missing from {folder}; run `python -m "
                             "pipelines.training.train_default` to rebuild it")
        return load_embedded_preset(folder)
    resolution = {"opensora-v2-256px": "256px", "opensora-v2-768px": "768px"}.get(name)
    if resolution is None:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    preset = _official(name, resolution)
    if weights_dir:
        root = Path(weights_dir)
        preset = ModelPreset(**{**preset.__dict__, "mmdit_weights": str(root / "Open_Sora_v2.safetensors"),
                                "vae_weights": str(root / "hunyuan_vae.safetensors"),
                                "text_encoder_paths": {"t5": str(root / "google/t5-v1_1-xxl"),
                                                       "clip": str(root / "openai/clip-vit-large-patch14")}})
    return preset
