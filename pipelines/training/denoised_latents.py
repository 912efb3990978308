"""Latents as the MMDiT leaves them, for teaching the VAE decoder to draw what the sampler makes.

A decoder trained only on the encoder's latents meets something else at generation time: the MMDiT's samples carry
errors the encoder never produces. `SampledLatents` noises a real clip's latents to t0 ~ U[lo, hi] and runs the
sampler's own guided Euler steps (the steps of the shifted `num_steps` schedule below t0) back to t = 0, so the
decoder can be fine-tuned to decode those latents to the real frames (`VAEStage` with `denoise_with`). On the Shapes
default this kept every mode but did not remove the halos around generated objects: they are in the sampled latents
themselves (README, "A decoder for the sampled latents").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pipelines.conditions import ReferenceLatents
from pipelines.models.mmdit import MMDiT, MMDiTConfig
from pipelines.sampling import GuidanceOptions, TextEmbeds
from pipelines.stages import sample
from pipelines.training.latent_pool import TextCache


def load_preset_mmdit(folder: str | Path) -> MMDiT:
    """The MMDiT of a preset folder (config.json + mmdit.safetensors, as `train_default` writes it): fp32, frozen."""
    import safetensors.torch

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "mmdit.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{folder} is not a preset folder: it needs config.json and mmdit.safetensors")
    model = MMDiT(MMDiTConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8"))["mmdit"]))
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(weights).items()})
    return model.requires_grad_(False).eval()


class SampledLatents:
    """Clean latents (B, C, T, h, w) + their captions -> what the t2v sampler makes of them noised to t0 (one t0
    per call, drawn uniformly from `t_range`; each clip its own noise)."""

    def __init__(self, model: MMDiT, text_encoder, t_range: tuple[float, float], num_steps: int, guidance: float):
        lo, hi = t_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"denoise_t must be [lo, hi] with 0 < lo <= hi < 1, got {list(t_range)}")
        self.model, self.text, self.lo, self.hi = model, TextCache(text_encoder), lo, hi
        self.opts = GuidanceOptions(num_steps=num_steps, guidance=guidance)

    @torch.no_grad()
    def __call__(self, z: Tensor, captions: list[str], generator: torch.Generator) -> Tensor:
        t0 = self.lo + (self.hi - self.lo) * float(torch.rand((), generator=generator))
        txt, y_vec = self.text.lookup(captions)
        null_txt, null_y = self.text.lookup([""])
        negative = TextEmbeds(null_txt.to(z), null_y.to(z))
        out = []
        for i in range(z.shape[0]):
            seed = int(torch.randint(2**31 - 1, (), generator=generator))
            text = TextEmbeds(txt[i:i + 1].to(z), y_vec[i:i + 1].to(z))
            out.append(sample(self.model, text, negative, ReferenceLatents(), "t2v", tuple(z.shape[1:]), seed,
                              self.opts, start=z[i:i + 1], start_t=t0))
        return torch.cat(out)
