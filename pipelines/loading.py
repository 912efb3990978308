"""Checkpoint loading for any nn.Module: read the weights safely, check them, assign them.

``read_state_dict`` accepts a ``.safetensors`` file; HF sharded safetensors (an index JSON or a folder with
one); ``.pt``/``.pth``/``.bin`` read with ``weights_only=True`` (pickled objects are refused); this project's
training checkpoints (``<ckpt_dir>``, ``<ckpt_dir>/model/``, ``<ckpt_dir>/ema.safetensors``); and Hub files
``hf://owner/repo/path.safetensors`` (or ``owner/repo/path.safetensors`` when no such local path exists);
``pipelines.weight_files`` turns each of these into one local file.

Upstream Open-Sora loads with ``strict=False`` and only logs mismatches, so a fused/unfused or ``cond_in`` key
mismatch goes unnoticed; here a mismatch is an error unless the caller opts out, and the report names it.

``build_and_load`` builds on the meta device and assigns the loaded tensors, so weights never exist twice.
Non-persistent buffers (e.g. RoPE tables) are in no checkpoint and would stay on meta: compute them on the
fly, or give their module ``reset_non_persistent_buffers()``, called after loading, which must create them on
the device of the module's parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch
from torch import nn

from pipelines.weight_files import (MAX_LISTED, TORCH_SUFFIXES, CheckpointError, find_checkpoint_file,
                                   locate_checkpoint, read_weight_map)

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model")
HASH_CHUNK_BYTES = 1 << 20


@dataclass
class LoadReport:
    """What happened when a state dict met a model: names skipped on either side and shape conflicts."""

    missing: list[str] = field(default_factory=list)  # in the model, absent from (or unusable in) the file
    unexpected: list[str] = field(default_factory=list)  # in the file, absent from the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, model shape)
    loaded: int = 0  # tensors actually loaded into the model

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and nothing in the file was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """A few lines naming what was skipped (at most MAX_LISTED names of each kind)."""
        if self.ok:
            return f"checkpoint matches the model ({self.loaded} tensors loaded)"
        counts = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} wrong shape"
        lines = [f"loaded {self.loaded} tensors; {counts}" if self.loaded else counts]
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {_list_names(self.missing)}")
        if self.unexpected:
            lines.append(f"  not in the model ({len(self.unexpected)}): {_list_names(self.unexpected)}")
        if self.mismatched:
            shown = [f"{n}: checkpoint {tuple(a)} vs model {tuple(b)}" for n, a, b in self.mismatched]
            lines.append(f"  shape mismatch ({len(self.mismatched)}): {_list_names(shown)}")
        return "\n".join(lines)


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown}, ... (+{len(names) - MAX_LISTED} more)"


def read_state_dict(
    path: str | os.PathLike,
    *,
    rename_keys: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint (file, sharded folder, training checkpoint or Hub reference) into CPU tensors."""
    file = locate_checkpoint(str(path), cache_dir)
    state_dict = _read_checkpoint_file(file)
    return rename_state_dict_keys(state_dict, rename_keys) if rename_keys else state_dict


def rename_state_dict_keys(state_dict: dict[str, torch.Tensor], rename_keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rewrite key prefixes; rules apply in order, each at most once, to the key as earlier rules left it."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = key
        for old, new in rename_keys.items():
            if new_key.startswith(old):
                new_key = new + new_key[len(old):]
        if new_key in renamed:
            raise CheckpointError(
                f"rename_keys {rename_keys} maps two checkpoint keys onto '{new_key}' (one of them is '{key}'); "
                "use more specific prefixes."
            )
        renamed[new_key] = tensor
    return renamed


def _read_checkpoint_file(file: Path) -> dict[str, torch.Tensor]:
    name = file.name
    if name.endswith(".index.json"):
        return _read_sharded_safetensors(file)
    if name.endswith(".safetensors"):
        return _read_safetensors(file)
    if name.endswith(TORCH_SUFFIXES):
        return _read_torch_file(file)
    formats = f".safetensors, *.safetensors.index.json, {', '.join(TORCH_SUFFIXES)}"
    raise CheckpointError(f"Unknown checkpoint format '{file}': use one of {formats}.")


def _corrupt_error(file: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint '{file}' is corrupt or truncated ({exc}). Download or copy it again; an interrupted "
        "download leaves a partial file."
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(file, device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise _corrupt_error(file, exc) from exc


def _read_sharded_safetensors(index_file: Path) -> dict[str, torch.Tensor]:
    """Read only the tensors the index assigns to each shard (safe_open reads them one by one)."""
    weight_map = read_weight_map(index_file)
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)
    state_dict: dict[str, torch.Tensor] = {}
    for shard, keys in keys_by_shard.items():
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise CheckpointError(f"Shard '{shard_file}' listed in '{index_file}' is missing; copy the whole folder.")
        try:
            with safetensors.safe_open(shard_file, framework="pt", device="cpu") as reader:
                absent = sorted(set(keys) - set(reader.keys()))
                if absent:
                    raise CheckpointError(
                        f"Shard '{shard_file}' lacks {len(absent)} tensors that '{index_file.name}' assigns "
                        f"to it ({_list_names(absent)}); the index and shards come from different saves."
                    )
                for key in keys:
                    state_dict[key] = reader.get_tensor(key)
        except (safetensors.SafetensorError, OSError) as exc:
            raise _corrupt_error(shard_file, exc) from exc
    return state_dict


def _read_torch_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"Refusing '{file}': it contains a pickled Python object ({refused.group(1)}), and unpickling "
                "it could run arbitrary code. Only plain tensor checkpoints are accepted: re-save the weights "
                "as a dict of tensors (safetensors.torch.save_file(model.state_dict(), ...) is best)."
            ) from exc
        raise _corrupt_error(file, exc) from exc
    except MemoryError:
        raise
    except Exception as exc:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, ValueError, ...)
        raise _corrupt_error(file, exc) from exc
    return _unwrap_torch_state_dict(loaded, file)


def _unwrap_torch_state_dict(loaded: object, file: Path) -> dict[str, torch.Tensor]:
    """Accept a plain {name: tensor} dict, or one nested under 'state_dict' / 'model'."""
    if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        for wrapper in WRAPPER_KEYS:
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict):
        raise CheckpointError(f"'{file}' holds a {type(loaded).__name__}, not a mapping of tensor names to tensors.")
    bad = [str(k) for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(
            f"'{file}' is not a plain state dict: {len(bad)} entries are not name -> tensor ({_list_names(bad)}). "
            f"Expected {{name: tensor}}, optionally wrapped as {{'state_dict': ...}} or {{'model': ...}}."
        )
    return loaded


def compare_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Compare names and shapes only (so a meta-device model works) without loading anything."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report = LoadReport()
    report.missing = [name for name in expected if name not in state_dict]
    report.unexpected = [name for name in state_dict if name not in expected]
    report.mismatched = [
        (name, tuple(t.shape), expected[name])
        for name, t in state_dict.items()
        if name in expected and tuple(t.shape) != expected[name]
    ]
    return report


def _mismatch_error(report: LoadReport, hint: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint does not match the model.\n{report.summary()}\n{hint}")


def _convert_tensor(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    # Integer/bool tensors (step counters, index tables) keep their dtype; only floating weights convert.
    target_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
    return tensor.to(device=device, dtype=target_dtype)


def _meta_tensor_names(model: nn.Module) -> list[str]:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in tensors if t.is_meta]


def _reset_non_persistent_buffers(model: nn.Module) -> None:
    for module in model.modules():
        reset = getattr(module, "reset_non_persistent_buffers", None)
        if callable(reset):
            reset()


def load_into(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    assign: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoadReport:
    """Check names and shapes, convert dtype/device, then load; strict raises on any mismatch."""
    report = compare_state_dict(model, state_dict)
    fix_hint = (
        "Check that the checkpoint belongs to this model configuration, map key prefixes with rename_keys "
        "(e.g. {'module.': ''}), or pass strict=False to load only the matching tensors."
    )
    if strict and not report.ok:
        raise _mismatch_error(report, fix_hint)
    if not assign and _meta_tensor_names(model):
        raise CheckpointError("The model has tensors on the meta device; load it with assign=True.")
    skipped = set(report.unexpected) | {name for name, _, _ in report.mismatched}
    # Without an explicit device, a materialized model keeps each tensor where it is (assign would move it);
    # without a dtype, assign gives the model the checkpoint's dtype.
    current = {k: v.device for k, v in model.state_dict().items() if not v.is_meta}
    usable = {
        k: _convert_tensor(v, dtype, device if device is not None else current.get(k))
        for k, v in state_dict.items()
        if k not in skipped
    }
    model.load_state_dict(usable, strict=False, assign=assign)
    report.loaded = len(usable)
    still_meta = _meta_tensor_names(model)
    if still_meta:
        _reset_non_persistent_buffers(model)
        known = set(report.missing)
        report.missing += [name for name in _meta_tensor_names(model) if name not in known]
    if strict and report.missing:
        raise _mismatch_error(
            report,
            "Tensors outside the checkpoint are still on the meta device: compute non-persistent buffers on "
            "the fly, or give their module a reset_non_persistent_buffers() method.",
        )
    if not report.ok:
        logger.warning("partial checkpoint load: %s", report.summary())
    return report


def _materialize_missing(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> list[str]:
    """Replace tensors still on meta with zeros so the model can move; returns their names."""
    names = _meta_tensor_names(model)
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        meta = getattr(owner, attr)
        zeros = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
        zeros = _convert_tensor(zeros, dtype, device)
        is_param = isinstance(meta, nn.Parameter)
        setattr(owner, attr, nn.Parameter(zeros, requires_grad=meta.requires_grad) if is_param else zeros)
    return names


def build_and_load(
    factory: Callable[[], nn.Module],
    path: str | os.PathLike,
    *,
    strict: bool = True,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    rename_keys: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build the model on the meta device and assign the checkpoint's tensors, so weights exist once."""
    with torch.device("meta"):
        model = factory()
    state_dict = read_state_dict(path, rename_keys=rename_keys, cache_dir=cache_dir)
    target = torch.device(device)
    # Convert entry by entry in our own dict, so at most one tensor exists in both precisions at a time.
    for key in list(state_dict):
        state_dict[key] = _convert_tensor(state_dict[key], dtype, target)
    try:
        report = load_into(model, state_dict, strict=strict, assign=True)
    except CheckpointError as exc:
        raise CheckpointError(f"Loading '{path}': {exc}") from exc
    del state_dict
    zeroed = _materialize_missing(model, target, dtype)
    if zeroed:
        logger.warning("%d tensors missing from '%s' are zeros: %s", len(zeroed), path, _list_names(zeroed))
    return model.to(target), report


def file_sha256(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """SHA-256 of a checkpoint file (streamed; a folder hashes its index); max_bytes hashes only the start."""
    file = Path(path).expanduser()
    if not file.exists():
        raise CheckpointError(f"Cannot hash '{file}': it does not exist.")
    file = find_checkpoint_file(file)
    digest = hashlib.sha256()
    remaining = max_bytes if max_bytes is not None else float("inf")
    with open(file, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(int(min(HASH_CHUNK_BYTES, remaining)))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()
