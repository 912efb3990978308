"""Reference conditions: which latent frames are given, as a mask and a masked latent, and putting them back.

Condition types (upstream names): t2v; i2v_head / i2v_tail (one image as first / last frame); i2v_loop (first and
last); v2v_head / v2v_tail (33 video frames -> 9 latent frames at the start / end); *_easy (65 frames -> 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")


@dataclass(frozen=True)
class ReferenceSpec:
    """What a condition type needs from the user: images or a clip, and how many frames of it."""

    kind: str  # "none" | "image" | "video"
    head: bool
    tail: bool
    video_frames: int = 0  # frames of the clip that are encoded (causal: 33 -> 9 latents, 65 -> 17)

    @property
    def latent_frames(self) -> int:
        return 1 if self.kind == "image" else (self.video_frames - 1) // 4 + 1


def reference_spec(cond_type: str) -> ReferenceSpec:
    if cond_type not in COND_TYPES:
        raise ValueError(f"unknown condition type {cond_type!r}; expected one of {', '.join(COND_TYPES)}")
    if cond_type == "t2v":
        return ReferenceSpec("none", False, False)
    if cond_type.startswith("i2v"):
        return ReferenceSpec("image", cond_type in ("i2v_head", "i2v_loop"), cond_type in ("i2v_tail", "i2v_loop"))
    frames = 65 if cond_type.endswith("_easy") else 33
    return ReferenceSpec("video", "head" in cond_type, "tail" in cond_type, frames)


@dataclass(frozen=True)
class ReferenceLatents:
    """Encoded references for a batch: head / tail latents (N, C, k, h, w), either may be None."""

    head: Tensor | None = None
    tail: Tensor | None = None


def prepare_inference_condition(z: Tensor, cond_type: str, refs: ReferenceLatents | None) -> tuple[Tensor, Tensor]:
    """Mask (N, 1, T, h, w) with 1 on given latent frames and the masked latent (N, C, T, h, w), for every item."""
    spec = reference_spec(cond_type)
    masks = torch.zeros_like(z[:, :1])
    masked = torch.zeros_like(z)
    if spec.kind == "none":
        return masks, masked
    if refs is None:
        raise ValueError(f"condition {cond_type!r} needs reference latents")
    t_lat = z.shape[2]
    for side, latent in (("head", refs.head), ("tail", refs.tail)):
        if not getattr(spec, side):
            continue
        if latent is None:
            raise ValueError(f"condition {cond_type!r} needs a {side} reference")
        k = latent.shape[2]
        if k > t_lat:
            raise ValueError(f"the {side} reference covers {k} latent frames but the video has only {t_lat}")
        frames = slice(0, k) if side == "head" else slice(t_lat - k, t_lat)
        masks[:, :, frames] = 1
        masked[:, :, frames] = latent.to(z).expand(z.shape[0], -1, -1, -1, -1)
    return masks, masked


def replace_conditioned_frames(z: Tensor, masks: Tensor, masked: Tensor) -> Tensor:
    """After sampling, put the given latent frames back exactly (upstream only did this for batch item 0)."""
    return torch.where(masks.bool(), masked, z)
