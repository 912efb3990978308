"""Training reports: parameter counts, memory, durations, dtype names, and optional TensorBoard scalars."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ScalarLog",
    "format_duration",
    "format_numel_str",
    "get_model_numel",
    "log_cuda_max_memory",
    "log_cuda_memory",
    "log_model_params",
    "to_torch_dtype",
]

logger = logging.getLogger(__name__)

GIGABYTE = 1024**3
_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "fp32"/"fp16"/"bf16" (or their long names, or a torch.dtype) to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def get_model_numel(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied parameters count once."""
    params = list(model.parameters())  # parameters() already yields each tied tensor once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def format_numel_str(numel: int) -> str:
    """Parameter count with a decimal suffix: 11_000_000_000 -> "11.00 B", 1234 -> "1.23 K"."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(numel) >= scale:
            return f"{numel / scale:.2f} {suffix}"
    return str(numel)


def format_duration(seconds: float) -> str:
    """Seconds as "1d 02h 03m 04s", dropping leading zero units ("42.0s" under a minute)."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds}")
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m {secs:02d}s"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def log_model_params(model: nn.Module) -> None:
    """Log total and trainable parameter counts."""
    total, trainable = get_model_numel(model)
    logger.info("model parameters: %s total, %s trainable", format_numel_str(total), format_numel_str(trainable))


def log_cuda_memory(stage: str | None = None) -> None:
    """Log the CUDA memory currently allocated (nothing without CUDA)."""
    if not torch.cuda.is_available():
        return
    where = f" at {stage}" if stage else ""
    logger.info("CUDA memory%s: %.1f GB allocated", where, torch.cuda.memory_allocated() / GIGABYTE)


def log_cuda_max_memory(stage: str | None = None) -> None:
    """Log peak CUDA memory allocated and reserved so far (nothing without CUDA)."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    where = f" at {stage}" if stage else ""
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    logger.info(
        "CUDA peak memory%s: %.1f GB allocated, %.1f GB reserved", where, allocated / GIGABYTE, reserved / GIGABYTE
    )


class ScalarLog:
    """Training scalars (loss, learning rate, pace) as TensorBoard events under `folder`; does nothing without one.

    `tensorboard --logdir OUTPUTS/tensorboard` shows them. The package is optional (tests/requirements.txt has it):
    asking for the log without it fails at once, before a long pool build, with how to install it.
    """

    def __init__(self, folder: Path | None):
        self.folder, self._writer = folder, None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is missing
            raise RuntimeError("tensorboard=true writes TensorBoard events and needs the tensorboard package: "
                               "pip install tensorboard (or set tensorboard=false)") from None
        self._writer = SummaryWriter(log_dir=str(folder))

    def write(self, step: int, **scalars: float) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(f"train/{name}", value, global_step=step)
        self._writer.flush()  # a crashed or killed run keeps what it logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
