"""Training checkpoints: layout, exact resume, atomic publication, pruning, background writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from pipelines.loading import read_state_dict
from pipelines.training import checkpoint_io
from pipelines.training.checkpoint_io import (
    CheckpointIO,
    CheckpointSaveError,
    is_complete_checkpoint,
    latest_checkpoint,
    rm_checkpoints,
)
from pipelines.training.ema import create_ema, update_ema
from pipelines.training.lr_schedulers import LinearWarmupLR, create_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_X = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))  # (N, 8)
DATA_Y = torch.randn(64, 4, generator=torch.Generator().manual_seed(8))  # (N, 4)
BATCH = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.2)  # consumes the torch RNG every step
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B, 4)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LinearWarmupLR
    ema: nn.Module
    cursor: int = 0


def build_run(seed: int) -> Run:
    torch.manual_seed(seed)
    model = Net()
    optimizer = create_optimizer(model, lr=1e-2, weight_decay=0.01)
    return Run(model, optimizer, LinearWarmupLR(optimizer, initial_lr=1e-5, warmup_steps=3), create_ema(model))


def train(run: Run, steps: int) -> None:
    """Each step draws from torch, python and numpy RNGs, so a resume must restore all three."""
    run.model.train()
    for _ in range(steps):
        start = (run.cursor * BATCH) % len(DATA_X)
        x = DATA_X[start : start + BATCH]  # (B, 8)
        x = x + 0.05 * random.random() * torch.randn_like(x) + float(np.random.rand()) * 1e-3
        loss = nn.functional.mse_loss(run.model(x), DATA_Y[start : start + BATCH])
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        update_ema(run.ema, run.model, decay=0.9)
        run.cursor += 1


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_run(io: CheckpointIO, save_dir: Path, run: Run, global_step: int, **kwargs) -> Path:
    return io.save(
        save_dir, model=run.model, ema=run.ema, optimizer=run.optimizer, lr_scheduler=run.scheduler,
        sampler_state={"cursor": run.cursor}, epoch=0, step=global_step, global_step=global_step,
        batch_size=BATCH, config={"lr": 1e-2}, **kwargs,
    )  # fmt: skip


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ---- layout -----------------------------------------------------------------------------------


def test_save_writes_the_documented_layout(tmp_path):
    seed_everything(0)
    run = build_run(0)
    train(run, 2)
    path = save_run(CheckpointIO(), tmp_path, run, global_step=2)
    assert path == tmp_path / "epoch0-global_step2" and is_complete_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step2"]  # no temp folder left
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "model", "optimizer.pt", "lr_scheduler.json", "ema.safetensors", "sampler.json", "config.json",
        "running_states.json",
    ])  # fmt: skip
    assert json.loads((path / "running_states.json").read_text()) == {
        "epoch": 0,
        "step": 2,
        "global_step": 2,
        "batch_size": 8,
    }
    assert json.loads((path / "config.json").read_text()) == {"lr": 1e-2}
    sampler = json.loads((path / "sampler.json").read_text())
    assert sampler["sampler"] == {"cursor": 2}
    assert len(sampler["rng"]) == 1 and {"torch", "python", "numpy"} <= sampler["rng"][0].keys()
    assert json.loads((path / "lr_scheduler.json").read_text())["last_epoch"] == 2
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)  # no pickled objects inside
    assert set(optimizer_state["state"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert_same_tensors(safetensors.torch.load_file(path / "ema.safetensors"), run.ema.state_dict())
    assert_same_tensors(read_state_dict(path), run.model.state_dict())


def test_model_is_sharded_by_size_with_an_hf_index(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))  # 1024 + 64 bytes per layer
    path = CheckpointIO(shard_size_mb=1100 / 2**20).save(
        tmp_path, model=model, epoch=1, step=0, global_step=3, batch_size=1
    )
    names = sorted(p.name for p in (path / "model").iterdir())
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert names == sorted(shards + ["model.safetensors.index.json"])
    index = json.loads((path / "model" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 3 * 1088}
    assert index["weight_map"] == {f"{i}.{kind}": shards[i] for i in range(3) for kind in ("weight", "bias")}
    for shard in shards:
        keys = safetensors.torch.load_file(path / "model" / shard).keys()
        assert set(keys) == {k for k, v in index["weight_map"].items() if v == shard}


# ---- resume -----------------------------------------------------------------------------------


def test_resume_is_bit_exact_with_uninterrupted_training(tmp_path):
    seed_everything(0)
    straight = build_run(0)
    train(straight, 7)

    seed_everything(0)
    first = build_run(0)
    train(first, 4)
    path = save_run(CheckpointIO(), tmp_path, first, global_step=4)
    train(first, 3)  # saving must not disturb the run that saved

    seed_everything(123)  # a later process: other RNG states, other initial weights
    resumed = build_run(42)
    states = CheckpointIO().load(
        path, model=resumed.model, ema=resumed.ema, optimizer=resumed.optimizer, lr_scheduler=resumed.scheduler
    )
    assert (states.epoch, states.step, states.global_step, states.batch_size) == (0, 4, 4, BATCH)
    resumed.cursor = states.sampler_state["cursor"]
    train(resumed, 3)

    for run in (first, resumed):
        assert_same_tensors(run.model.state_dict(), straight.model.state_dict())
        assert_same_tensors(run.ema.state_dict(), straight.ema.state_dict())
        assert run.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
        for key, state in straight.optimizer.state_dict()["state"].items():
            assert_same_tensors(run.optimizer.state_dict()["state"][key], state)


def test_load_restores_rng_states(tmp_path):
    seed_everything(5)
    path = CheckpointIO().save(tmp_path, model=Net(), epoch=0, step=0, global_step=0, batch_size=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    seed_everything(99)
    CheckpointIO().load(path, model=Net())
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_load_is_strict_about_missing_parts_unless_told(tmp_path):
    path = CheckpointIO().save(tmp_path, model=Net(), epoch=0, step=0, global_step=0, batch_size=1)
    with pytest.raises(ValueError, match="no EMA state"):
        CheckpointIO().load(path, model=Net(), ema=create_ema(Net()))
    CheckpointIO().load(path, model=Net(), ema=create_ema(Net()), strict=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointIO().load(tmp_path, model=Net())


# ---- atomicity --------------------------------------------------------------------------------


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    seed_everything(0)
    run = build_run(0)
    train(run, 1)
    io = CheckpointIO()
    previous = save_run(io, tmp_path, run, global_step=1)
    train(run, 1)

    def crash(obj, path):
        assert (path.parent / "model" / "model.safetensors.index.json").is_file()  # shards already written
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io, "_write_torch", crash)
    with pytest.raises(OSError, match="disk full"):
        save_run(io, tmp_path, run, global_step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step1"]
    assert latest_checkpoint(tmp_path) == previous
    fresh = build_run(3)
    assert CheckpointIO().load(previous, model=fresh.model, optimizer=fresh.optimizer).global_step == 1


_SAVE_FOREVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from pipelines.training.checkpoint_io import CheckpointIO
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)])  # ~12.6 MB of fp32
    io = CheckpointIO(shard_size_mb=2, keep_n_latest=2)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))  # every tensor tells which save it belongs to
        io.save(sys.argv[1], model=model, epoch=0, step=step, global_step=step, batch_size=1)
""")


def test_sigkill_mid_save_leaves_a_complete_latest_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)], cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while latest_checkpoint(tmp_path) is None:
            assert child.poll() is None, "the saving process died on its own"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        while not list(tmp_path.glob(".tmp-*")):  # strike while a later save is half written
            assert time.monotonic() < deadline, "no second save started"
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    # The kill came while a temp folder was seen; should the save have been published in the microseconds between,
    # leave the dead writer's folder by hand, so that the sweep below is checked every time.
    if not list(tmp_path.glob(".tmp-*")):
        (tmp_path / f".tmp-epoch0-global_step999-{child.pid}").mkdir()
    latest = latest_checkpoint(tmp_path)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(12)])
    states = CheckpointIO().load(latest, model=model)
    assert all(torch.all(p == states.global_step) for p in model.parameters())
    # The next save in this folder sweeps the dead writer's temp folder away.
    CheckpointIO().save(tmp_path, model=nn.Linear(2, 2), epoch=9, step=0, global_step=10**6, batch_size=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_latest_checkpoint_ignores_temp_and_incomplete_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    io = CheckpointIO()
    for step in (3, 12):
        io.save(tmp_path, model=nn.Linear(2, 2), epoch=step // 10, step=0, global_step=step, batch_size=1)
    (tmp_path / ".tmp-epoch5-global_step99-1").mkdir()
    (tmp_path / "epoch5-global_step50").mkdir()  # no running_states.json: incomplete
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch1-global_step12"


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    io = CheckpointIO()
    io.save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=0, global_step=1, batch_size=1, config={"v": 1})
    path = io.save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=0, global_step=1, batch_size=1, config={"v": 2})
    assert json.loads((path / "config.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step1"]


def test_save_rejects_bad_arguments(tmp_path):
    io = CheckpointIO()
    with pytest.raises(ValueError, match="JSON"):
        io.save(
            tmp_path,
            model=Net(),
            sampler_state={"gen": torch.Generator()},
            epoch=0,
            step=0,
            global_step=0,
            batch_size=1,
        )
    with pytest.raises(ValueError, match="global_step"):
        io.save(tmp_path, model=Net(), epoch=0, step=0, global_step=-1, batch_size=1)
    assert not list(tmp_path.iterdir())


def test_engine_extra_files_join_the_atomic_save(tmp_path):
    def write_extra(folder: Path) -> None:
        assert folder.name.startswith(".tmp-")  # written before publication
        (folder / "optimizer").mkdir()
        (folder / "optimizer" / "shard-0.bin").write_bytes(b"engine state")

    io = CheckpointIO()
    path = io.save(tmp_path, model=Net(), epoch=0, step=0, global_step=1, batch_size=1, write_extra=write_extra)
    assert (path / "optimizer" / "shard-0.bin").read_bytes() == b"engine state"
    seen = []
    io.load(path, model=Net(), read_extra=seen.append)
    assert seen == [path]

    def broken(folder: Path) -> None:
        raise OSError("engine write failed")

    with pytest.raises(OSError, match="engine write failed"):
        io.save(tmp_path, model=Net(), epoch=0, step=0, global_step=2, batch_size=1, write_extra=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0-global_step1"]
    with pytest.raises(ValueError, match="background"):
        io.save(
            tmp_path, model=Net(), epoch=0, step=0, global_step=3, batch_size=1, write_extra=broken, background=True
        )


# ---- pruning and background writes ------------------------------------------------------------


def test_keep_n_latest_prunes_older_complete_checkpoints(tmp_path):
    (tmp_path / ".tmp-epoch0-global_step0-1").mkdir(parents=True)
    io = CheckpointIO(keep_n_latest=2)
    for step in range(1, 5):
        io.save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=step, global_step=step, batch_size=1)
    kept = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-"))
    assert kept == ["epoch0-global_step3", "epoch0-global_step4"]
    assert rm_checkpoints(tmp_path, keep_n_latest=1) == [tmp_path / "epoch0-global_step3"]
    assert rm_checkpoints(tmp_path, keep_n_latest=0) == []


def test_a_run_resumed_from_an_earlier_step_never_prunes_what_it_just_wrote(tmp_path):
    io = CheckpointIO(keep_n_latest=2)
    for step in (2200, 2300):  # a run that went bad, rolled back to step 1000
        io.save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=step, global_step=step, batch_size=1)
    written = io.save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=1100, global_step=1100, batch_size=1)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert written.is_dir() and kept == ["epoch0-global_step1100", "epoch0-global_step2300"]
    assert rm_checkpoints(tmp_path, keep_n_latest=1, keep=written) == [tmp_path / "epoch0-global_step2300"]


def test_a_leftover_temp_folder_with_this_processes_pid_does_not_block_saving(tmp_path):
    stale = tmp_path / f".tmp-epoch0-global_step5-{os.getpid()}"  # a killed run that had this pid (pid 1 in a box)
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "half.safetensors").write_bytes(b"\0" * 10)
    written = CheckpointIO().save(tmp_path, model=nn.Linear(2, 2), epoch=0, step=5, global_step=5, batch_size=1)
    assert written.is_dir() and not stale.exists()
    assert not (written / "model" / "half.safetensors").exists()


def test_background_save_equals_foreground_save_despite_training_on(tmp_path, monkeypatch):
    seed_everything(0)
    run = build_run(0)
    train(run, 3)
    io = CheckpointIO(shard_size_mb=0.001)
    foreground = save_run(io, tmp_path / "fg", run, global_step=3)
    trained_on = threading.Event()
    write_snapshot = checkpoint_io._write_snapshot

    def write_after_training(*args):
        assert trained_on.wait(timeout=30)
        write_snapshot(*args)

    monkeypatch.setattr(checkpoint_io, "_write_snapshot", write_after_training)
    background = save_run(io, tmp_path / "bg", run, global_step=3, background=True)
    train(run, 2)  # training goes on before the thread writes: the snapshot must not see it
    trained_on.set()
    io.wait()
    assert sorted(p.name for p in foreground.iterdir()) == sorted(p.name for p in background.iterdir())
    assert_same_tensors(read_state_dict(foreground), read_state_dict(background))
    assert_same_tensors(
        safetensors.torch.load_file(foreground / "ema.safetensors"),
        safetensors.torch.load_file(background / "ema.safetensors"),
    )
    fg_opt, bg_opt = (torch.load(p / "optimizer.pt", weights_only=True) for p in (foreground, background))
    assert fg_opt["param_groups"] == bg_opt["param_groups"]
    for key in fg_opt["state"]:
        assert_same_tensors(fg_opt["state"][key], bg_opt["state"][key])
    for name in ("sampler.json", "config.json", "running_states.json", "lr_scheduler.json"):
        assert (foreground / name).read_text() == (background / name).read_text(), name


def test_failed_background_save_is_reported_on_wait(tmp_path, monkeypatch):
    def crash(obj, path):
        raise OSError("quota exceeded")

    monkeypatch.setattr(checkpoint_io, "_write_torch", crash)
    run = build_run(0)
    io = CheckpointIO()
    save_run(io, tmp_path, run, global_step=1, background=True)
    with pytest.raises(CheckpointSaveError, match="quota exceeded"):
        io.wait()
    io.wait()  # reported once
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.iterdir())
