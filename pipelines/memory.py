"""Memory and parameter measurements: what the studio's status bar and the benchmarks report.

On CUDA the numbers come from PyTorch's caching allocator; on the CPU there is no allocator to ask, so the process
RSS stands in (sampled in a background thread to catch the peak of a run).
"""

from __future__ import annotations

import functools
import ctypes
import gc
import sys
import logging
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from pipelines.units import format_bytes, format_count  # noqa: F401 - re-exported for callers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryStats:
    """A snapshot of device and host memory; the CUDA allocator fields are None on other devices."""

    device_name: str
    device_type: str
    allocated_bytes: int | None
    reserved_bytes: int | None
    peak_allocated_bytes: int | None
    total_bytes: int | None
    process_rss_bytes: int
    system_used_bytes: int
    system_total_bytes: int


@dataclass(frozen=True)
class ParamStats:
    """Parameter counts of one module, with the dtype and device of its first parameter."""

    name: str
    total: int
    trainable: int
    dtype: str | None
    device: str | None
    checkpoint: str | None


def read_memory_stats(device: str | torch.device) -> MemoryStats:
    """Allocator numbers for a CUDA device (None elsewhere) plus this process's RSS and system RAM."""
    device = _resolve_device(device)
    process_rss = psutil.Process().memory_info().rss
    system = psutil.virtual_memory()
    host = dict(
        process_rss_bytes=process_rss,
        system_used_bytes=system.total - system.available,
        system_total_bytes=system.total,
    )
    if device.type == "cuda":
        return MemoryStats(
            device_name=torch.cuda.get_device_name(device),
            device_type="cuda",
            allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
            peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
            total_bytes=torch.cuda.get_device_properties(device).total_memory,
            **host,
        )
    return MemoryStats(
        device_name=_cpu_name() if device.type == "cpu" else device.type,
        device_type=device.type,
        allocated_bytes=None,
        reserved_bytes=None,
        peak_allocated_bytes=None,
        total_bytes=None,
        **host,
    )


def available_bytes(device: str | torch.device, held_bytes: int = 0) -> int:
    """What a run on `device` can count on: free memory plus what this process already holds for it (the loaded
    weights are part of any estimate: on CUDA the allocator's reserve, elsewhere `held_bytes`)."""
    device = _resolve_device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    return psutil.virtual_memory().available + held_bytes


def reset_peak(device: str | torch.device) -> None:
    """Restart CUDA peak tracking; a no-op elsewhere (use PeakRSSSampler for the CPU)."""
    device = _resolve_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: str | torch.device) -> None:
    """Collect garbage, return cached CUDA blocks to the driver, and trim the C heap.

    glibc keeps freed memory in per-thread arenas; a server that runs jobs on many threads would otherwise hold
    hundreds of MB after a burst of requests, which users read as a leak.
    """
    device = _resolve_device(device)
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_c_heap()


def _trim_c_heap() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def count_params(name: str, module: torch.nn.Module, checkpoint: str | Path | None = None) -> ParamStats:
    """Total and trainable parameters of a module (shared weights counted once; meta tensors are fine)."""
    params = list(module.parameters())  # parameters() already skips tied duplicates
    first = params[0] if params else None
    return ParamStats(
        name=name,
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else None,
        device=str(first.device) if first is not None else None,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
    )


class PeakRSSSampler:
    """Context manager sampling this process's RSS every `interval_s` in a thread and keeping the maximum.

    The CPU has no allocator peak to query, so sampling is the only way to see a run's high-water mark; short
    spikes between samples can be missed. Given a CUDA device it also records `max_memory_allocated`.
    """

    def __init__(self, interval_s: float = 0.05, device: str | torch.device | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}.")
        self.interval_s = interval_s
        self.device = _resolve_device(device) if device is not None else None
        self.start_rss_bytes = 0
        self.peak_rss_bytes = 0
        self.peak_device_bytes: int | None = None
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_increase_bytes(self) -> int:
        """How far RSS rose above its value on entry."""
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)

    def __enter__(self) -> PeakRSSSampler:
        if self._thread is not None:
            raise RuntimeError("a PeakRSSSampler cannot be entered twice.")
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss_bytes = self.peak_rss_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="peak-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._record()  # one last sample, so a run shorter than the interval still counts
        if self.device is not None and self.device.type == "cuda":
            self.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def _record(self) -> None:
        try:
            self.peak_rss_bytes = max(self.peak_rss_bytes, self._process.memory_info().rss)
        except psutil.Error as exc:  # the process is being torn down
            logger.debug("RSS sample failed: %s", exc)


def _resolve_device(device: str | torch.device) -> torch.device:
    """torch.device with an explicit index for CUDA, checking CUDA is there at all."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("a CUDA device was requested but CUDA is not available on this machine.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
