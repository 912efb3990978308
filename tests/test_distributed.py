"""The torch.distributed engine: single-process behaviour, a 2-rank gloo DDP/FSDP2 run, ColossalAI guards."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.training.colossal import INSTALL_HINT, ColossalAIMissingError, create_colossalai_plugin
from pipelines.training.distributed import (
    DistributedConfig,
    TorchEngine,
    all_reduce_mean,
    all_reduce_sum,
    create_engine,
    is_main_process,
    setup_distributed,
    unwrap_model,
    wrap_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_COLOSSALAI = importlib.util.find_spec("colossalai") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    """Run tests/ddp_smoke.py once on 2 gloo ranks for both backends; rank 0's JSON findings."""
    work = tmp_path_factory.mktemp("ddp")
    out = work / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(REPO_ROOT / "tests" / "ddp_smoke.py"),
        "--backends", "ddp,fsdp", "--out", str(out), "--ckpt-dir", str(work / "ckpt"),
    ]  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""  # two gloo ranks on the CPU even on a one-GPU machine (NCCL wants a GPU per rank)
    proc = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_rank_training_keeps_ranks_identical_and_matches_one_process(two_rank_results, backend):
    assert two_rank_results["world_size"] == 2
    result = two_rank_results[backend]
    assert result["identical_across_ranks"] and result["ema_identical_across_ranks"]
    # Averaged half-batch gradients equal the whole-batch gradient, up to float summation order.
    assert result["max_diff_vs_single_process"] < 1e-5
    assert result["reload_matches"]


def test_single_process_setup_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = setup_distributed()
    assert (state.rank, state.world_size, state.local_rank, state.is_main) == (0, 1, 0, True)
    assert state.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert is_main_process()
    t = torch.tensor([2.0, 4.0])
    assert all_reduce_mean(t) is t and torch.equal(all_reduce_sum(t), torch.tensor([2.0, 4.0]))


def test_incomplete_torchrun_environment_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun variables"):
        setup_distributed()


def test_config_rejects_unknown_backend_and_dtype():
    with pytest.raises(ValueError, match="colossalai-zero2"):
        DistributedConfig(backend="deepspeed")
    with pytest.raises(ValueError, match="dtype"):
        DistributedConfig(dtype="fp8")


def test_single_process_engine_steps_and_clips(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = setup_distributed()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    engine = create_engine(model, DistributedConfig(grad_clip=1e-3), state, lr=0.1)
    assert isinstance(engine, TorchEngine) and engine.unwrapped_model is model
    before = model.weight.detach().clone()
    engine.backward((model(torch.randn(8, 4, device=state.device)) * 100).pow(2).mean())
    norm = engine.step()
    assert norm is not None and norm > 1e-3  # reported before clipping
    assert model.weight.grad is None and not torch.equal(model.weight, before)
    with engine.no_sync():
        pass


def test_wrapping_needs_a_process_group_and_unwrap_sees_through_compile(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = setup_distributed()
    model = nn.Linear(2, 2)
    assert wrap_model(model, DistributedConfig(), state) is model
    with pytest.raises(ValueError, match="torchrun"):
        wrap_model(model, DistributedConfig(backend="ddp"), state)
    with pytest.raises(ValueError, match="create_engine"):
        wrap_model(model, DistributedConfig(backend="colossalai-zero2"), state)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert unwrap_model(compiled) is model


# ---- ColossalAI (optional, GPU-only) ----------------------------------------------------------


@pytest.mark.skipif(HAS_COLOSSALAI, reason="colossalai is installed here")
def test_colossalai_backend_without_colossalai_says_how_to_install(monkeypatch):
    with pytest.raises(ColossalAIMissingError, match="requirements-colossalai.txt"):
        create_colossalai_plugin("zero2", "bf16", grad_clip=1.0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = setup_distributed()
    with pytest.raises(ColossalAIMissingError) as info:
        create_engine(nn.Linear(2, 2), DistributedConfig(backend="colossalai-zero2"), state, lr=1e-4)
    assert str(info.value) == INSTALL_HINT


def test_colossalai_plugin_names_are_checked_before_importing():
    with pytest.raises(ValueError, match="zero1, zero2 or hybrid"):
        create_colossalai_plugin("zero3", "bf16", grad_clip=1.0)


def test_colossalai_requirements_file_pins_its_own_stack():
    pins = (REPO_ROOT / "requirements-colossalai.txt").read_text()
    for pin in ("colossalai==0.5.0", "torch==2.5.1", "transformers==4.51.3"):
        assert pin in pins


def test_colossalai_zero2_plugin_uses_open_sora_defaults():
    pytest.importorskip("colossalai")
    if not torch.cuda.is_available() or not torch.distributed.is_initialized():
        pytest.skip("ColossalAI ZeRO plugins need CUDA and a launched process group")
    plugin = create_colossalai_plugin("zero2", "bf16", grad_clip=1.0, reduce_bucket_size_in_m=128)
    assert plugin.stage == 2
