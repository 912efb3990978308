"""Warm-starting an MMDiT from weights trained with a coarser patch size.

Only three layers depend on the patch size: the image embedder `img_in` (C·p² -> D), the condition embedder
`cond_in` ((1 + C)·p² -> D) and the output projection `final_layer.linear` (D -> C·p²); every block works on
D-wide tokens whatever p is. Going from patch P to patch p (P a multiple of p) the transformer blocks are kept as
they are and the three layers are folded so that the new model starts where the old one stood on smooth latents:

- embedders: a p×p token is read as if its content tiled the old P×P patch, so the weights of the (P/p)² old
  positions that share an offset inside the small patch are summed. On latents constant over each old patch,
  every new token then embeds exactly like the old patch it lies in.
- output: each new position predicts the mean of what the old layer predicted at the positions it folds.

The RoPE grid is in patch units, so the model still has to learn the finer token spacing: this is a start, not
an equivalent model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PATCH_LAYERS = {"img_in.weight": "in", "cond_in.weight": "in", "final_layer.linear.weight": "out",
                 "final_layer.linear.bias": "out"}


def _fold(weight: torch.Tensor, old: int, new: int, direction: str) -> torch.Tensor:
    """Fold the packed (c, ph, pw) axis of a patch-`old` tensor to patch `new`: axis 1 for inputs, 0 for outputs."""
    f = old // new
    if direction == "in":  # (D, c * old * old)
        w = weight.reshape(weight.shape[0], -1, f, new, f, new)  # (D, c, sub_h, ph, sub_w, pw)
        return w.sum(dim=(2, 4)).reshape(weight.shape[0], -1)
    w = weight.reshape(-1, f, new, f, new, *weight.shape[1:])  # (c, sub_h, ph, sub_w, pw, [D])
    return w.mean(dim=(1, 3)).reshape(-1, *weight.shape[1:])


def repatch_mmdit_state(state: dict[str, torch.Tensor], old_patch: int, new_patch: int) -> dict[str, torch.Tensor]:
    """A copy of an MMDiT state dict for `new_patch`, folded from `old_patch` (which `new_patch` must divide)."""
    if old_patch == new_patch:
        return dict(state)
    if new_patch > old_patch or old_patch % new_patch:
        raise ValueError(f"can only fold an MMDiT to a patch size that divides its own: {old_patch} -> {new_patch}")
    out = dict(state)
    for key, direction in _PATCH_LAYERS.items():
        if key in state:
            out[key] = _fold(state[key], old_patch, new_patch, direction).contiguous()
    return out


def _patch_of(state: dict[str, torch.Tensor], latent_channels: int) -> int:
    """The patch size a state dict was trained with, read from its image embedder's input width."""
    width = state["img_in.weight"].shape[1]
    patch = round((width / latent_channels) ** 0.5)
    if patch * patch * latent_channels != width:
        raise ValueError(f"img_in takes {width} features: not {latent_channels} latent channels times a square patch")
    return patch


def load_warm_start(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model` strictly, folding patch-dependent layers first when the patch sizes differ."""
    cfg = model.config
    old = _patch_of(state, cfg.latent_channels)
    if old != cfg.patch_size:
        logger.info("warm start: folding patch-%d weights to patch %d", old, cfg.patch_size)
        state = repatch_mmdit_state(state, old, cfg.patch_size)
    model.load_state_dict(state, strict=True)
