"""The files inside a training checkpoint: sharded safetensors, durable JSON/torch writes, RNG states,
and publishing a finished temporary folder under its final name.

Every writer here fsyncs what it wrote, so that once `checkpoint_io` renames a finished
temporary folder into place, its contents are on disk (a power cut cannot publish a
checkpoint whose files are still in the page cache).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from pipelines.atomic_io import fsync_dir, fsync_file  # noqa: F401 - part of this module's API

logger = logging.getLogger(__name__)

__all__ = [
    "capture_rng_state",
    "fsync_dir",
    "live_storages",
    "publish_dir",
    "remove_stale_tmp_dirs",
    "restore_rng_state",
    "snapshot_tensors",
    "write_json",
    "write_safetensors",
    "write_sharded_safetensors",
    "write_torch",
]

INDEX_NAME = "model.safetensors.index.json"
TMP_PREFIX = ".tmp-"  # unfinished checkpoint folders; never taken for checkpoints
_MB = 1024 * 1024


def write_json(obj: Any, path: Path) -> None:
    """Write `obj` as indented JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def write_torch(obj: Any, path: Path) -> None:
    """`torch.save` `obj` and fsync it."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Write one safetensors file (tensors that share memory are split apart first) and fsync it."""
    safetensors.torch.save_file(_unshare(tensors), str(path), metadata={"format": "pt"})
    fsync_file(path)


def write_sharded_safetensors(tensors: dict[str, Tensor], out_dir: Path, shard_size_mb: float) -> list[Path]:
    """Write `model-0000i-of-0000N.safetensors` shards of at most `shard_size_mb` MB plus an HF-style index.

    A single tensor larger than the limit gets a shard of its own. Returns the files written.
    """
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors, int(shard_size_mb * _MB))
    total = len(shards)
    weight_map: dict[str, str] = {}
    written = []
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{total:05d}.safetensors"
        write_safetensors({name: tensors[name] for name in names}, out_dir / filename)
        weight_map.update({name: filename for name in names})
        written.append(out_dir / filename)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json({"metadata": {"total_size": total_size}, "weight_map": weight_map}, out_dir / INDEX_NAME)
    fsync_dir(out_dir)
    return written + [out_dir / INDEX_NAME]


def _plan_shards(tensors: dict[str, Tensor], limit_bytes: int) -> list[list[str]]:
    """Greedy packing in key order: start a new shard when the next tensor would overflow this one."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > limit_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make every tensor own its memory: safetensors refuses tied weights and strided views."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
        out[name] = tensor if (whole and ptr not in seen) else tensor.contiguous().clone()
        seen.add(ptr)
    return out


def publish_dir(tmp_dir: Path, final: Path) -> None:
    """Rename the finished folder into place (replacing an older save of the same step)."""
    if final.exists():
        # Park the old one under a .tmp- name first: rename cannot replace a non-empty folder.
        parked = final.parent / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
        os.rename(final, parked)
        os.rename(tmp_dir, final)
        shutil.rmtree(parked, ignore_errors=True)
    else:
        os.rename(tmp_dir, final)
    fsync_dir(final.parent)


def remove_stale_tmp_dirs(save_dir: Path) -> None:
    """Drop `.tmp-*` folders left by crashed saves (their writer process is gone)."""
    if not save_dir.is_dir():
        return
    for path in save_dir.glob(f"{TMP_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def snapshot_tensors(obj: Any, copy: bool, live: set[int] | None = None) -> Any:
    """Recursively move tensors in dicts/lists/tuples to CPU, detached from training.

    With `copy`, tensors that training could still modify are cloned: every tensor, or, when
    `live` (storage addresses of the live parameters, buffers and optimizer states) is given,
    only CPU tensors that share one of those storages; GPU tensors are copied by the move anyway.
    """
    if isinstance(obj, Tensor):
        obj = obj.detach()
        if hasattr(obj, "full_tensor"):  # a DTensor that escaped gathering: make it a plain tensor
            obj = obj.full_tensor()
        if copy and live is None:
            return obj.to("cpu", copy=True)
        moved = obj.cpu()
        if copy and moved.untyped_storage().data_ptr() in live:
            moved = moved.clone()
        return moved
    if isinstance(obj, dict):
        return {key: snapshot_tensors(value, copy, live) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_tensors(value, copy, live) for value in obj)
    return obj


def live_storages(*sources: Any) -> set[int]:
    """Storage addresses of tensors in modules (params, buffers), optimizers (states) or nested containers."""
    found: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            local = getattr(obj, "_local_tensor", obj)  # a DTensor's shard on this rank
            found.add(local.untyped_storage().data_ptr())
        elif isinstance(obj, torch.nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                visit(tensor)
        elif isinstance(obj, torch.optim.Optimizer):
            visit(list(obj.state.values()))
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for source in sources:
        visit(source)
    return found


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-ready lists: torch CPU, CUDA (if present), python, numpy (if imported)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNGs captured by `capture_rng_state` (skipping CUDA on a machine without it)."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():  # e.g. resumed with fewer GPUs visible
            logger.warning("checkpoint has RNG states for %d GPUs, this process sees %d: restoring the first %d",
                           len(cuda_states), torch.cuda.device_count(),
                           min(len(cuda_states), torch.cuda.device_count()))
        for index, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(cuda_state, dtype=torch.uint8), index)
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))
