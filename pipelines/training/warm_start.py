"""Warm-starting an MMDiT from weights trained with a coarser patch size or a narrower width (and a VAE from one
with more latent channels: `narrow_vae_state`).

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

A new latent space (a VAE with another compression, say 2x instead of 4x, with the patch grown to match so a token
still covers the same pixels) makes the three layers meaningless: `fresh_io` keeps every block, the text, time and
vector embedders and the final modulation, and leaves the three layers (weights and biases) at the model's own
initialisation. The token grid, and so the RoPE positions, are those the blocks were trained on.

Widening (hidden size D -> k·D, head size kept, so k times the heads) *is* exact: every D-wide activation is
carried as k copies of itself. Layer norms over a repeated vector see the same mean and variance, so a layer that
writes D-wide features repeats its rows k times, and a layer that reads them splits each weight over the k copies
(1/k each). The new heads are copies of the old ones. So that the copies can grow apart, each split gets a small
noise that sums to zero over the copies: the function is unchanged, but the next layers' copies differ, and so do
their gradients.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PATCH_LAYERS = {"img_in.weight": "in", "cond_in.weight": "in", "final_layer.linear.weight": "out",
                 "final_layer.linear.bias": "out"}
_IO_LAYERS = tuple(dict.fromkeys(key.rsplit(".", 1)[0] + "." for key in _PATCH_LAYERS))  # their prefixes, once


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


# (rows, columns) of each layer in units of the hidden size D ("d"), the MLP width M ("m") or a fixed size ("-"),
# keyed by the layer's name without its block prefix. Norm scales (per head) and anything absent stay as they are.
_WIDTH_LAYOUT = {
    "img_in": ("d", "-"), "cond_in": ("d", "-"), "txt_in": ("d", "-"),
    "in_layer": ("d", "-"), "out_layer": ("d", "d"),
    "img_mod.lin": ("dddddd", "d"), "txt_mod.lin": ("dddddd", "d"), "modulation.lin": ("ddd", "d"),
    "q_proj": ("d", "d"), "k_proj": ("d", "d"), "v_proj": ("d", "d"), "qkv": ("ddd", "d"), "proj": ("d", "d"),
    "mlp.0": ("m", "d"), "mlp.2": ("d", "m"),
    "v_mlp": ("dm", "d"), "linear1": ("dddm", "d"), "linear2": ("d", "dm"),
    "adaLN_modulation.1": ("dd", "d"), "final_layer.linear": ("-", "d"),
}


def _layout(key: str) -> tuple[str, str] | None:
    name = key.rsplit(".", 1)[0]
    for suffix in sorted(_WIDTH_LAYOUT, key=len, reverse=True):
        if name == suffix or name.endswith("." + suffix) or name.endswith("_" + suffix):
            return _WIDTH_LAYOUT[suffix]
    return None


def _widen_axis(t: torch.Tensor, axis: int, units: str, sizes: dict[str, int], k: int, split: bool,
                generator: torch.Generator, noise: float) -> torch.Tensor:
    """Repeat each D/M segment of `axis` k times; on a read axis (`split`) divide by k and add zero-sum noise."""
    if units == "-":
        return t
    pieces = torch.split(t, [sizes[u] for u in units], dim=axis)
    out = []
    for piece in pieces:
        copies = torch.stack([piece] * k)  # (k, ...)
        if split:
            jitter = torch.randn(copies.shape, generator=generator) * noise * float(piece.std())
            copies = copies / k + (jitter - jitter.mean(dim=0, keepdim=True)).to(copies)
        out.append(torch.cat(list(copies), dim=axis))
    return torch.cat(out, dim=axis)


def _mlp_width(state: dict[str, torch.Tensor], hidden: int) -> int:
    """The MLP width, read from a double block's MLP or a single block's output layer (models may lack either)."""
    for key, tensor in state.items():
        if key.endswith("_mlp.0.weight"):
            return tensor.shape[0]
        if key.endswith("linear2.weight"):
            return tensor.shape[1] - hidden
    return 0


def widen_mmdit_state(state: dict[str, torch.Tensor], factor: int, noise: float = 1e-3,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of an MMDiT state dict `factor` times as wide (hidden size and heads), computing the same function."""
    if factor == 1:
        return dict(state)
    if factor < 1:
        raise ValueError(f"can only widen an MMDiT by a whole factor >= 1, got {factor}")
    hidden = state["txt_in.weight"].shape[0]
    sizes = {"d": hidden, "m": _mlp_width(state, hidden)}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        layout = _layout(key)
        if layout is None or key.endswith(".scale"):
            out[key] = tensor.clone()
            continue
        rows, cols = layout
        t = _widen_axis(tensor, 0, rows, sizes, factor, False, generator, noise)
        if tensor.ndim == 2:
            t = _widen_axis(t, 1, cols, sizes, factor, True, generator, noise)
        out[key] = t.contiguous()
    return out


def load_warm_start(model: nn.Module, state: dict[str, torch.Tensor], fresh_io: bool = False) -> None:
    """Load `state` into `model` strictly: patch-dependent layers folded when the patch sizes differ (or, with
    `fresh_io`, left at the model's initialisation), then every layer widened when the model is a whole multiple
    of the weights' hidden size."""
    cfg = model.config
    width = state["txt_in.weight"].shape[0]
    if fresh_io:
        logger.info("warm start: keeping the blocks, fresh image/condition embedders and output projection")
        state = {k: v for k, v in state.items() if not k.startswith(_IO_LAYERS)}
    else:
        old = _patch_of(state, cfg.latent_channels)
        if old != cfg.patch_size:
            logger.info("warm start: folding patch-%d weights to patch %d", old, cfg.patch_size)
            state = repatch_mmdit_state(state, old, cfg.patch_size)
    if width != cfg.hidden_size:
        if cfg.hidden_size % width:
            raise ValueError(f"can only widen an MMDiT by a whole factor: hidden size {width} -> {cfg.hidden_size}")
        logger.info("warm start: widening hidden size %d to %d", width, cfg.hidden_size)
        state = widen_mmdit_state(state, cfg.hidden_size // width)
    if fresh_io:
        state = {**{k: v for k, v in model.state_dict().items() if k.startswith(_IO_LAYERS)}, **state}
    model.load_state_dict(state, strict=True)


def narrow_vae_state(state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """A copy of a causal-VAE state dict with only the latent channels `keep` (indices, in that order).

    Four layers (seven tensors) depend on the latent width C: the encoder's output conv and `quant_conv` write the
    posterior's 2C moments (C means, then C log-variances), `post_quant_conv` and the decoder's input conv read C
    latents. Each is sliced to the kept channels' means and log-variances (and inputs), everything else is kept.
    With `quant_conv` and `post_quant_conv` at identity the narrowed VAE encodes exactly the kept channels of the
    old one; in general it is a start that drops the other channels' contributions."""
    width = state["post_quant_conv.weight"].shape[0]
    if not keep or len(set(keep)) != len(keep) or not all(0 <= c < width for c in keep):
        raise ValueError(f"latent channels to keep must be distinct indices below {width}, got {keep}")
    idx = torch.tensor(keep)
    moments = torch.cat([idx, idx + width])
    out = dict(state)
    out["encoder.conv_out.conv.weight"] = state["encoder.conv_out.conv.weight"][moments]
    out["encoder.conv_out.conv.bias"] = state["encoder.conv_out.conv.bias"][moments]
    out["quant_conv.weight"] = state["quant_conv.weight"][moments][:, moments]
    out["quant_conv.bias"] = state["quant_conv.bias"][moments]
    out["post_quant_conv.weight"] = state["post_quant_conv.weight"][idx][:, idx]
    out["post_quant_conv.bias"] = state["post_quant_conv.bias"][idx]
    out["decoder.conv_in.conv.weight"] = state["decoder.conv_in.conv.weight"][:, idx]
    return {k: v.contiguous() for k, v in out.items()}
