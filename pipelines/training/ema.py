"""Exponential moving average (EMA) of a model's weights, kept in fp32.

The EMA copy is a plain, unwrapped `nn.Module` on the same device as the model it was
created from. When the trained model runs in bf16 and the optimizer keeps fp32 master
copies, pass them as `master_params` so the average is taken over the precise weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pipelines.training.distributed import unwrap_model

__all__ = ["create_ema", "place_ema", "update_ema"]


def create_ema(model: nn.Module) -> nn.Module:
    """Return an fp32, eval-mode, frozen deep copy of `model` (unwrapped) to hold the EMA."""
    source = unwrap_model(model)
    if any(_is_dtensor(p) for p in source.parameters()):
        raise ValueError("create_ema needs the model before FSDP sharding: call it before wrap_model")
    ema = copy.deepcopy(source)
    ema.float()
    ema.eval()
    ema.requires_grad_(False)
    return ema


def place_ema(ema_model: nn.Module, device: torch.device | str, sharded: bool) -> nn.Module:
    """Keep the EMA beside the weights it follows: on the training device, so each update is one kernel per
    parameter instead of a device-to-host copy. A sharded model (FSDP, ZeRO) is sharded because a full copy does
    not fit one device, so its EMA stays in host memory."""
    return ema_model if sharded else ema_model.to(device)


@torch.no_grad()
def update_ema(
    ema_model: nn.Module,
    model: nn.Module,
    decay: float = 0.9999,
    master_params: dict[str, Tensor] | None = None,
) -> None:
    """Move `ema_model` toward `model`: ema = decay·ema + (1−decay)·weights (fp32 masters if given).

    Only trainable parameters are averaged (frozen ones never change, so their EMA equals the
    copy taken by `create_ema`). Floating buffers are copied as they are. With FSDP2 the
    sharded parameters are gathered, so every rank must call this together.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    source = unwrap_model(model)
    ema_params = dict(ema_model.named_parameters())
    masters = master_params or {}
    for name, param in source.named_parameters():
        if not param.requires_grad:
            continue
        if name not in ema_params:
            raise ValueError(f"EMA model has no parameter {name!r}: was it created from a different model?")
        weights = masters.get(name, param)
        weights = weights.full_tensor() if _is_dtensor(weights) else weights
        target = ema_params[name]
        if weights.shape != target.shape:
            raise ValueError(
                f"EMA parameter {name!r} has shape {tuple(target.shape)}, model has {tuple(weights.shape)}"
            )
        # lerp_(w, 1−decay) is ema + (1−decay)(w − ema): the same average with one kernel.
        target.lerp_(weights.to(device=target.device, dtype=target.dtype), 1.0 - decay)
    _copy_buffers(ema_model, source)


def _copy_buffers(ema_model: nn.Module, source: nn.Module) -> None:
    """Copy floating buffers (e.g. norm statistics) verbatim; averaging them has no meaning."""
    ema_buffers = dict(ema_model.named_buffers())
    for name, buf in source.named_buffers():
        target = ema_buffers.get(name)
        if target is not None and buf.is_floating_point() and target.shape == buf.shape:
            target.copy_(buf.full_tensor() if _is_dtensor(buf) else buf)


def _is_dtensor(tensor: Tensor) -> bool:
    """True for FSDP2 / tensor-parallel DTensors (checked by name to avoid importing them eagerly)."""
    return type(tensor).__name__ == "DTensor"
