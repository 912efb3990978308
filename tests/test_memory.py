"""Memory and parameter measurements on the CPU."""

import mmap
import time

import pytest
import torch

from pipelines.memory import (
    MemoryStats,
    PeakRSSSampler,
    count_params,
    format_bytes,
    format_count,
    free_memory,
    read_memory_stats,
    reset_peak,
)


def test_cpu_memory_stats_have_positive_rss_and_no_allocator_fields():
    stats = read_memory_stats("cpu")
    assert isinstance(stats, MemoryStats)
    assert stats.device_type == "cpu" and stats.device_name
    assert stats.process_rss_bytes > 0
    assert 0 < stats.system_used_bytes <= stats.system_total_bytes
    assert stats.allocated_bytes is None and stats.reserved_bytes is None
    assert stats.peak_allocated_bytes is None and stats.total_bytes is None
    reset_peak("cpu")
    free_memory(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA"):
        read_memory_stats("cuda")


def test_peak_rss_sampler_sees_a_large_allocation():
    size = 64 * 1024 * 1024
    with PeakRSSSampler(interval_s=0.01) as sampler:
        # A fresh anonymous mapping: malloc could hand back pages an earlier test already made resident.
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)  # touch every page so it counts in RSS
        time.sleep(0.1)  # several sampling intervals while the block is held
        block.close()
    assert sampler.peak_increase_bytes >= 32 * 1024 * 1024
    assert sampler.peak_device_bytes is None
    with pytest.raises(RuntimeError):
        with sampler:
            pass


def test_count_params_on_a_small_linear():
    layer = torch.nn.Linear(10, 5)  # 10*5 weights + 5 biases
    stats = count_params("head", layer, checkpoint="ckpt.safetensors")
    assert (stats.total, stats.trainable) == (55, 55)
    assert (stats.dtype, stats.device, stats.checkpoint) == ("float32", "cpu", "ckpt.safetensors")
    layer.bias.requires_grad_(False)
    assert count_params("head", layer).trainable == 50


def test_count_params_counts_tied_weights_once_and_handles_meta_and_empty():
    embed = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = embed.weight
    assert count_params("tied", torch.nn.ModuleList([embed, head])).total == 800
    with torch.device("meta"):
        big = torch.nn.Linear(4096, 4096).to(torch.bfloat16)
    meta = count_params("meta", big)
    assert meta.total == 4096 * 4096 + 4096 and (meta.dtype, meta.device) == ("bfloat16", "meta")
    empty = count_params("empty", torch.nn.ReLU())
    assert (empty.total, empty.dtype, empty.device) == (0, None, None)


def test_format_helpers():
    assert format_count(11_890_000_000) == "11.89B"
    assert format_count(7_300_000) == "7.3M"
    assert format_count(12_500) == "12.5K"
    assert format_count(512) == "512"
    assert format_bytes(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536 * 1024 * 1024) == "1.50 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
