"""Training-time reference conditions for a causal VAE (Open-Sora 2.0's `prepare_visual_condition_causal`).

Per sample a condition type is drawn by weight; its reference frames are encoded through the VAE's *real*
`encode` (scaled posterior mean, exactly what inference does with a user's image or clip), and the condition is
`cat(mask, mask * reference_latent)` over the latent frames. Upstream's trainer swapped `encode` for the bare
encoder (no quant_conv, no scaling); here the encode is the one the studio uses, so training and inference agree.

x0 also uses the posterior *mean*: the conditioned frames the model sees at inference are posterior means, and a
mean target lets the latents of a fixed clip pool be cached (the VAE is trained with a small KL, so its posterior
std is small and a sample would differ little anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.conditions import COND_TYPES, reference_spec

V2V_FRAMES, V2V_EASY_FRAMES = 33, 65  # video frames a v2v reference covers (-> 9 / 17 causal latent frames)


@dataclass
class ClipReferences:
    """Encoded references of one clip (each (C, k, h, w) or None when the clip is too short for it)."""

    head_image: Tensor | None = None  # encode(first frame alone)
    tail_image: Tensor | None = None  # encode(last frame alone)
    head_video: Tensor | None = None  # encode(first 33 frames)
    tail_video: Tensor | None = None  # encode(last 33 frames)
    head_video_easy: Tensor | None = None  # encode(first 65 frames)
    tail_video_easy: Tensor | None = None  # encode(last 65 frames)


def allowed_condition_types(condition_config: dict[str, float], t_lat: int) -> dict[str, float]:
    """The weighted types usable at T_lat latent frames: v2v needs T_lat > 9, *_easy needs T_lat > 17."""
    unknown = set(condition_config) - set(COND_TYPES)
    if unknown:
        raise ValueError(f"unknown condition types {sorted(unknown)}; expected some of {', '.join(COND_TYPES)}")
    if any(w < 0 for w in condition_config.values()):
        raise ValueError(f"condition weights must be non-negative, got {condition_config}")
    allowed = {}
    for name, weight in condition_config.items():
        if name.startswith("v2v") and t_lat <= 9:
            continue
        if name.endswith("_easy") and t_lat <= 17:
            continue
        if weight > 0:
            allowed[name] = float(weight)
    if not allowed:
        raise ValueError(f"no condition type of {condition_config} applies to clips of {t_lat} latent frames")
    return allowed


def draw_condition_types(condition_config: dict[str, float], t_lat: int, batch: int,
                         generator: torch.Generator | None = None) -> list[str]:
    """Draw one condition type per sample, by weight, among those allowed at T_lat (weights renormalised)."""
    allowed = allowed_condition_types(condition_config, t_lat)
    names = list(allowed)
    weights = torch.tensor([allowed[n] for n in names], dtype=torch.float64)
    picks = torch.multinomial(weights, batch, replacement=True, generator=generator)
    return [names[i] for i in picks.tolist()]


@torch.no_grad()
def encode_references(x: Tensor, vae, cond_types: list[str] | None = None) -> list[ClipReferences]:
    """Encode every reference each clip of x (B, 3, T, H, W) can provide (or only those `cond_types` need)."""
    num_frames = x.shape[2]
    wanted = set(cond_types) if cond_types is not None else set(COND_TYPES)
    refs = [ClipReferences() for _ in range(x.shape[0])]

    def fill(field: str, frames: slice, need: bool) -> None:
        if not need:
            return
        latents = vae.encode(x[:, :, frames])  # (B, C, k, h, w), scaled posterior mean
        for ref, latent in zip(refs, latents):
            setattr(ref, field, latent)

    fill("head_image", slice(0, 1), bool(wanted & {"i2v_head", "i2v_loop"}))
    fill("tail_image", slice(num_frames - 1, num_frames), bool(wanted & {"i2v_tail", "i2v_loop"}))
    for suffix, span in (("", V2V_FRAMES), ("_easy", V2V_EASY_FRAMES)):
        if num_frames > span:
            fill(f"head_video{suffix}", slice(0, span), f"v2v_head{suffix}" in wanted)
            fill(f"tail_video{suffix}", slice(num_frames - span, num_frames), f"v2v_tail{suffix}" in wanted)
    return refs


def _reference_latents(refs: ClipReferences, cond_type: str) -> tuple[Tensor | None, Tensor | None]:
    """(head, tail) reference latents a condition type uses, each (C, k, h, w) or None."""
    spec = reference_spec(cond_type)
    if spec.kind == "none":
        return None, None
    if spec.kind == "image":
        return (refs.head_image if spec.head else None), (refs.tail_image if spec.tail else None)
    suffix = "_easy" if cond_type.endswith("_easy") else ""
    return (getattr(refs, f"head_video{suffix}") if spec.head else None,
            getattr(refs, f"tail_video{suffix}") if spec.tail else None)


def build_condition(x0: Tensor, cond_types: list[str], refs: list[ClipReferences]) -> Tensor:
    """cond (B, 1 + C, T_lat, h, w) = cat(mask, mask * reference) for latents x0 (B, C, T_lat, h, w)."""
    if len(cond_types) != x0.shape[0] or len(refs) != x0.shape[0]:
        raise ValueError(f"need one condition type and reference set per sample ({x0.shape[0]}), "
                         f"got {len(cond_types)} and {len(refs)}")
    t_lat = x0.shape[2]
    masks = torch.zeros_like(x0[:, :1])  # (B, 1, T, h, w)
    masked = torch.zeros_like(x0)  # (B, C, T, h, w)
    for i, (cond_type, ref) in enumerate(zip(cond_types, refs)):
        head, tail = _reference_latents(ref, cond_type)
        if reference_spec(cond_type).kind != "none" and head is None and tail is None:
            raise ValueError(f"sample {i} has no encoded reference for {cond_type!r}")
        for latent, at_head in ((head, True), (tail, False)):
            if latent is None:
                continue
            k = latent.shape[1]
            if k > t_lat:
                raise ValueError(f"a {k}-latent-frame reference does not fit a {t_lat}-frame latent")
            frames = slice(0, k) if at_head else slice(t_lat - k, t_lat)
            masks[i, :, frames] = 1.0
            masked[i, :, frames] = latent.to(x0)
    return torch.cat([masks, masked], dim=1)


@torch.no_grad()
def prepare_visual_condition_causal(x: Tensor, condition_config: dict[str, float], vae,
                                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Video x (B, 3, T, H, W) in [-1, 1] -> (x0 (B, C, T_lat, h, w), cond (B, 1 + C, T_lat, h, w), types)."""
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"expected videos (B, 3, T, H, W), got {tuple(x.shape)}")
    t_lat = vae.latent_frames(x.shape[2])
    cond_types = draw_condition_types(condition_config, t_lat, x.shape[0], generator)
    x0 = vae.encode(x)  # (B, C, T_lat, h, w): scaled posterior mean
    refs = encode_references(x, vae, cond_types)
    return x0, build_condition(x0, cond_types, refs), cond_types


def conditioned_frame_mask(cond: Tensor) -> Tensor:
    """(B, T_lat) bool: which latent frames a condition (B, 1 + C, T_lat, h, w) gives."""
    return cond[:, 0].flatten(2).amax(dim=2) > 0
