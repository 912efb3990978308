"""Atomic, resumable training checkpoints for any nn.Module (plain, DDP or FSDP2).

Layout of `save_dir/epoch{E}-global_step{S}/`:
    model/                         sharded safetensors + model.safetensors.index.json
    optimizer.pt                   full optimizer state, keyed by parameter name (loads with weights_only)
    lr_scheduler.json              scheduler state
    ema.safetensors                EMA weights (fp32)
    sampler.json                   {"sampler": caller's data-order state, "rng": [per-rank RNG states]}
    config.json                    the run's config
    running_states.json            epoch, step, global_step, batch_size — written last
Everything is written into `.tmp-epoch{E}-global_step{S}-<pid>/` and renamed into place as the very
last step, so a crash never leaves a half checkpoint under a final name. In a multi-process run, call
`save`/`load` on every rank (FSDP2 gathers collectively); only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipelines.training import checkpoint_files as files
from pipelines.training.distributed import barrier, is_main_process

__all__ = [
    "CheckpointIO",
    "CheckpointSaveError",
    "RunningStates",
    "is_complete_checkpoint",
    "latest_checkpoint",
    "rm_checkpoints",
]

logger = logging.getLogger(__name__)

RUNNING_STATES = "running_states.json"
_NAME_PATTERN = re.compile(r"^epoch(\d+)-global_step(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointSaveError(RuntimeError):
    """A background checkpoint save failed (reported on the next `wait()` or `save()`)."""


@dataclass(frozen=True)
class RunningStates:
    """Where training stood when the checkpoint was taken."""

    epoch: int
    step: int
    global_step: int
    batch_size: int
    sampler_state: dict[str, Any] | None


@dataclass
class _Snapshot:
    """Everything a checkpoint holds, detached from live training state."""

    model: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    lr_scheduler: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None
    sampler: dict[str, Any]
    config: dict[str, Any]
    running: dict[str, int]


def is_complete_checkpoint(path: Path | str) -> bool:
    """True for a published checkpoint folder (final name and running_states.json present)."""
    path = Path(path)
    return bool(_NAME_PATTERN.match(path.name)) and (path / RUNNING_STATES).is_file()


def _complete_checkpoints(save_dir: Path) -> list[Path]:
    """Published checkpoints in `save_dir`, oldest first by (global_step, epoch)."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and is_complete_checkpoint(p)]

    def order(path: Path) -> tuple[int, int]:
        epoch, global_step = _NAME_PATTERN.match(path.name).groups()
        return int(global_step), int(epoch)

    return sorted(found, key=order)


def latest_checkpoint(save_dir: Path | str) -> Path | None:
    """The complete checkpoint with the highest global_step in `save_dir`, or None."""
    found = _complete_checkpoints(Path(save_dir))
    return found[-1] if found else None


def rm_checkpoints(save_dir: Path | str, keep_n_latest: int = 0, keep: Path | None = None) -> list[Path]:
    """Delete all but the `keep_n_latest` newest complete checkpoints (0 keeps all); returns those removed.

    `keep` (the one just written) survives whatever its step: a run resumed from an earlier step, in a folder that
    still holds later checkpoints, must not delete each checkpoint it writes."""
    if keep_n_latest < 0:
        raise ValueError(f"keep_n_latest must be >= 0, got {keep_n_latest}")
    if keep_n_latest == 0:
        return []
    found = _complete_checkpoints(Path(save_dir))
    kept = found[-keep_n_latest:]
    if keep is not None and Path(keep) in found and Path(keep) not in kept:
        kept = [*kept[1:], Path(keep)]  # the one just written takes the place of the oldest kept
    doomed = [path for path in found if path not in kept]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class CheckpointIO:
    """Saves and restores model, optimizer, scheduler, EMA, data order and RNG states; optional background writes."""

    def __init__(self, shard_size_mb: float = 4096, keep_n_latest: int = 0):
        if shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb}")
        if keep_n_latest < 0:
            raise ValueError(f"keep_n_latest must be >= 0, got {keep_n_latest}")
        self.shard_size_mb = shard_size_mb
        self.keep_n_latest = keep_n_latest
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Block until a background save finishes; raise CheckpointSaveError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointSaveError(f"background checkpoint save failed: {error}") from error

    def save(
        self,
        save_dir: Path | str,
        *,
        model: nn.Module | None,
        ema: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        sampler_state: dict[str, Any] | None = None,
        epoch: int,
        step: int,
        global_step: int,
        batch_size: int,
        config: dict[str, Any] | None = None,
        background: bool = False,
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write `save_dir/epoch{E}-global_step{S}/` atomically and return that path (on every rank).

        `background=True` copies all tensors to CPU now and writes them in a thread, so training can
        continue; call `wait()` before relying on the files. `write_extra(tmp_dir)` lets an engine add
        its own files (e.g. ColossalAI's sharded optimizer) before publishing; all ranks call it.
        """
        self.wait()
        running = _check_running_states(epoch, step, global_step, batch_size)
        _check_json("sampler_state", sampler_state)
        _check_json("config", config)
        if background and write_extra is not None:
            raise ValueError("write_extra runs collective engine I/O and cannot run in the background")
        if optimizer is not None and model is None:
            raise ValueError("saving an optimizer needs its model (parameter names key the optimizer state)")
        save_dir = Path(save_dir)
        name = f"epoch{epoch}-global_step{global_step}"
        snapshot = _take_snapshot(model, ema, optimizer, lr_scheduler, sampler_state, config, running, copy=background)
        tmp_dir = save_dir / f"{files.TMP_PREFIX}{name}-{_writer_pid()}"
        if is_main_process():
            files.remove_stale_tmp_dirs(save_dir)
            # No save of ours is in flight (wait() above): a folder of this very name was left by a killed run
            # whose pid this process now has (a container's pid 1, say).
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        if write_extra is not None:
            barrier()
            try:
                write_extra(tmp_dir)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            barrier()
        if not is_main_process():
            return save_dir / name
        if background:
            self._thread = threading.Thread(
                target=self._write_in_background, args=(snapshot, tmp_dir, save_dir / name), daemon=False
            )
            self._thread.start()
        else:
            self._write(snapshot, tmp_dir, save_dir / name)
        return save_dir / name

    def _write_in_background(self, snapshot: _Snapshot, tmp_dir: Path, final: Path) -> None:
        try:
            self._write(snapshot, tmp_dir, final)
        except Exception as exc:  # noqa: BLE001 -- any failure is handed to the training thread by wait()
            logger.error("background checkpoint save to %s failed: %s", final, exc)
            self._error = exc

    def _write(self, snapshot: _Snapshot, tmp_dir: Path, final: Path) -> None:
        """Write every file into `tmp_dir`, then publish it under `final`; clean up on failure."""
        try:
            _write_snapshot(snapshot, tmp_dir, self.shard_size_mb)
            files.publish_dir(tmp_dir, final)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        removed = rm_checkpoints(final.parent, self.keep_n_latest, keep=final)
        logger.info("saved checkpoint %s%s", final, f" (removed {len(removed)} older)" if removed else "")

    def load(
        self,
        path: Path | str,
        *,
        model: nn.Module | None,
        ema: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        strict: bool = True,
        read_extra: Callable[[Path], None] | None = None,
    ) -> RunningStates:
        """Restore everything `save` wrote (RNG states included) and return the running states.

        With `strict`, a part asked for but absent from the checkpoint is an error; otherwise it is
        skipped with a warning (e.g. enabling EMA when resuming a run that had none).
        """
        path = Path(path)
        if not is_complete_checkpoint(path):
            raise ValueError(
                f"'{path}' is not a complete checkpoint (expected epoch*-global_step*/ with {RUNNING_STATES})"
            )
        if optimizer is not None and model is None:
            raise ValueError("loading an optimizer needs its model (parameter names key the optimizer state)")
        if model is not None and _present(path / "model", "model", strict):
            set_model_state_dict(model, _read_model(path), options=StateDictOptions(full_state_dict=True, strict=True))
        if optimizer is not None and _present(path / "optimizer.pt", "optimizer", strict):
            state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        if lr_scheduler is not None:
            _load_scheduler(path, lr_scheduler, strict)
        if ema is not None and _present(path / "ema.safetensors", "EMA", strict):
            ema.load_state_dict(safetensors.torch.load_file(path / "ema.safetensors", device="cpu"), strict=True)
        if read_extra is not None:
            read_extra(path)
        sampler = json.loads((path / "sampler.json").read_text(encoding="utf-8"))
        _restore_rng(sampler.get("rng") or [])
        running = json.loads((path / RUNNING_STATES).read_text(encoding="utf-8"))
        return RunningStates(
            epoch=running["epoch"],
            step=running["step"],
            global_step=running["global_step"],
            batch_size=running["batch_size"],
            sampler_state=sampler.get("sampler"),
        )


def _take_snapshot(model, ema, optimizer, lr_scheduler, sampler_state, config, running, copy: bool) -> _Snapshot:
    """Collect full (gathered) state dicts and RNG states; with `copy`, detach them from live tensors."""
    # Only tensors still backed by training memory need cloning; gathered/offloaded ones are fresh already.
    live = files.live_storages(model, optimizer, ema) if copy else None
    model_state = optim_state = ema_state = None
    if model is not None:
        model_state = files.snapshot_tensors(get_model_state_dict(model, options=_FULL), copy, live)
    if optimizer is not None:
        optim_state = files.snapshot_tensors(get_optimizer_state_dict(model, optimizer, options=_FULL), copy, live)
    if ema is not None:
        ema_state = files.snapshot_tensors(ema.state_dict(), copy, live)
    scheduler_state = None if lr_scheduler is None else files.snapshot_tensors(lr_scheduler.state_dict(), True)
    sampler = {"sampler": json.loads(json.dumps(sampler_state)), "rng": _gather_rng_states()}
    config = json.loads(json.dumps(config or {}))  # a deep copy: the caller may edit its config meanwhile
    return _Snapshot(model_state, optim_state, scheduler_state, ema_state, sampler, config, running)


def _write_snapshot(snapshot: _Snapshot, tmp_dir: Path, shard_size_mb: float) -> None:
    """Write the checkpoint files; running_states.json goes last, as the completeness marker."""
    if snapshot.model is not None:
        files.write_sharded_safetensors(snapshot.model, tmp_dir / "model", shard_size_mb)
    if snapshot.optimizer is not None:
        _write_torch(snapshot.optimizer, tmp_dir / "optimizer.pt")
    if snapshot.lr_scheduler is not None:
        _write_scheduler(snapshot.lr_scheduler, tmp_dir)
    if snapshot.ema is not None:
        files.write_safetensors(snapshot.ema, tmp_dir / "ema.safetensors")
    files.write_json(snapshot.sampler, tmp_dir / "sampler.json")
    files.write_json(snapshot.config, tmp_dir / "config.json")
    files.write_json(snapshot.running, tmp_dir / RUNNING_STATES)
    files.fsync_dir(tmp_dir)


def _write_torch(obj: Any, path: Path) -> None:
    """Indirection so tests can simulate a crash part-way through a save."""
    files.write_torch(obj, path)


def _write_scheduler(state: dict[str, Any], tmp_dir: Path) -> None:
    """JSON when the state is plain data (our schedulers), torch.save otherwise."""
    try:
        text = json.dumps(state)
    except (TypeError, ValueError):
        _write_torch(state, tmp_dir / "lr_scheduler.pt")
        return
    files.write_json(json.loads(text), tmp_dir / "lr_scheduler.json")


def _load_scheduler(path: Path, lr_scheduler: Any, strict: bool) -> None:
    if (path / "lr_scheduler.json").is_file():
        lr_scheduler.load_state_dict(json.loads((path / "lr_scheduler.json").read_text(encoding="utf-8")))
    elif (path / "lr_scheduler.pt").is_file():
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
    else:
        _present(path / "lr_scheduler.json", "LR scheduler", strict)


def _read_model(path: Path) -> dict[str, torch.Tensor]:
    from pipelines.loading import read_state_dict

    return read_state_dict(path / "model")


def _present(path: Path, what: str, strict: bool) -> bool:
    if path.exists():
        return True
    if strict:
        raise ValueError(
            f"checkpoint '{path.parent}' has no {what} state ({path.name} missing); pass strict=False to skip it"
        )
    logger.warning("checkpoint %s has no %s state; keeping the current one", path.parent, what)
    return False


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (each rank draws its own noise)."""
    state = files.capture_rng_state()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def _restore_rng(states: list[dict[str, Any]]) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(states) != world:
        logger.warning(
            "checkpoint has RNG states for %d ranks, this run has %d: RNG states not restored", len(states), world
        )
        return
    files.restore_rng_state(states[rank])


def _writer_pid() -> int:
    """Rank 0's pid, shared with all ranks so that collective extra writes target the same folder."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return os.getpid()
    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _check_running_states(epoch: int, step: int, global_step: int, batch_size: int) -> dict[str, int]:
    values = {"epoch": epoch, "step": step, "global_step": global_step, "batch_size": batch_size}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return values


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (plain dicts, lists, numbers, strings): {exc}") from exc
