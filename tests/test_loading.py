"""Checkpoint loading: every place weights can come from, and every way they can fail to fit."""

import json
import os
import random
import socket

import pytest
import safetensors.torch
import torch
from torch import nn

from pipelines.loading import (
    CheckpointError,
    LoadReport,
    build_and_load,
    file_sha256,
    load_into,
    read_state_dict,
)


class TinyMLP(nn.Module):
    """Two linear layers plus an integer buffer, so dtype conversion has something to leave alone."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))


class MLPWithTable(TinyMLP):
    """A model with a non-persistent buffer, like a RoPE frequency table, rebuilt by the loading hook."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.arange(4.0), persistent=False)

    def reset_non_persistent_buffers(self):
        self.freqs = torch.arange(4.0, device=self.fc1.weight.device)


class PickledThing:
    pass


def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyMLP().state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def write_sharded(folder, state_dict) -> None:
    """HF layout: one shard per layer plus model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for layer in ("fc1", "fc2"):
        part = {k: v for k, v in state_dict.items() if k.startswith(layer)}
        shard = f"model-{layer}.safetensors"
        safetensors.torch.save_file(part, folder / shard)
        weight_map.update({k: shard for k in part})
    rest = {k: v for k, v in state_dict.items() if k not in weight_map}
    safetensors.torch.save_file(rest, folder / "model-rest.safetensors")
    weight_map.update({k: "model-rest.safetensors" for k in rest})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------------------------- formats


def test_single_safetensors_file_reads_to_cpu(tmp_path):
    expected = reference_state_dict()
    safetensors.torch.save_file(expected, tmp_path / "w.safetensors")
    loaded = read_state_dict(tmp_path / "w.safetensors")
    assert_same_tensors(loaded, expected)
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_sharded_safetensors_reads_from_index_or_folder(tmp_path):
    expected = reference_state_dict()
    write_sharded(tmp_path / "sharded", expected)
    assert_same_tensors(read_state_dict(tmp_path / "sharded" / "model.safetensors.index.json"), expected)
    assert_same_tensors(read_state_dict(str(tmp_path / "sharded")), expected)


def test_sharded_index_naming_a_missing_shard_is_refused(tmp_path):
    write_sharded(tmp_path / "sharded", reference_state_dict())
    (tmp_path / "sharded" / "model-fc2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-fc2.safetensors.*missing"):
        read_state_dict(tmp_path / "sharded")


def test_torch_pt_file_reads_plain_state_dict(tmp_path):
    expected = reference_state_dict()
    torch.save(expected, tmp_path / "w.pt")
    assert_same_tensors(read_state_dict(tmp_path / "w.pt"), expected)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_torch_pth_file_unwraps_common_wrappers(tmp_path, wrapper):
    expected = reference_state_dict()
    torch.save({wrapper: expected, "epoch": 3}, tmp_path / "w.pth")
    assert_same_tensors(read_state_dict(tmp_path / "w.pth"), expected)


def test_pickled_object_in_pt_file_is_refused(tmp_path):
    torch.save({"fc1.weight": torch.zeros(2), "extra": PickledThing()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python object.*PickledThing.*plain tensor"):
        read_state_dict(tmp_path / "evil.pt")


def test_training_checkpoint_folder_reads_model_or_ema(tmp_path):
    model_weights, ema_weights = reference_state_dict(0), reference_state_dict(1)
    ckpt = tmp_path / "epoch0-global_step100"
    write_sharded(ckpt / "model", model_weights)
    safetensors.torch.save_file(ema_weights, ckpt / "ema.safetensors")
    (ckpt / "running_states.json").write_text("{}")
    assert_same_tensors(read_state_dict(ckpt), model_weights)
    assert_same_tensors(read_state_dict(ckpt / "model"), model_weights)
    assert_same_tensors(read_state_dict(ckpt / "ema.safetensors"), ema_weights)


def test_folder_without_weights_names_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="No checkpoint found.*notes.txt"):
        read_state_dict(tmp_path)


def test_rename_keys_rewrites_prefixes_in_order(tmp_path):
    expected = reference_state_dict()
    wrapped = {f"module.model.{k}": v for k, v in expected.items()}
    safetensors.torch.save_file(wrapped, tmp_path / "ddp.safetensors")
    loaded = read_state_dict(tmp_path / "ddp.safetensors", rename_keys={"module.": "", "model.": ""})
    assert_same_tensors(loaded, expected)


def test_rename_keys_collision_is_refused(tmp_path):
    safetensors.torch.save_file({"a.x": torch.zeros(1), "b.x": torch.ones(1)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="two checkpoint keys"):
        read_state_dict(tmp_path / "w.safetensors", rename_keys={"a.": "", "b.": ""})


# ----------------------------------------------------------------------------------------------- failures


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*does-not-exist.safetensors"):
        read_state_dict(tmp_path / "does-not-exist.safetensors")


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path):
    safetensors.torch.save_file(reference_state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt"])
def test_garbage_bytes_are_reported_as_corrupt(tmp_path, name):
    rng = random.Random(name)
    for _ in range(50):  # random bytes trip the unpickler in many different ways
        (tmp_path / name).write_bytes(rng.randbytes(2048))
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            read_state_dict(tmp_path / name)


def test_truncated_pt_file_is_reported_as_corrupt(tmp_path):
    torch.save(reference_state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(tmp_path / "cut.pt")


# ----------------------------------------------------------------------------------------------- hub


def test_hub_reference_offline_with_empty_cache_says_not_cached(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not cached.*HF_HUB_OFFLINE.*hf download owner/repo"):
        read_state_dict("hf://owner/repo/weights/w.safetensors", cache_dir=tmp_path / "cache")


def test_bare_hub_reference_offline_mentions_missing_local_path(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not cached.*no local file"):
        read_state_dict("owner/repo/w.safetensors", cache_dir=tmp_path / "cache")


def test_hub_reference_downloads_through_hf_hub_download(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    expected = reference_state_dict()
    safetensors.torch.save_file(expected, tmp_path / "w.safetensors")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("cache_dir")))
        return str(tmp_path / "w.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = read_state_dict("hf://owner/repo/sub/w.safetensors", cache_dir="my-cache")
    assert_same_tensors(loaded, expected)
    assert calls == [("owner/repo", "sub/w.safetensors", "my-cache")]


def test_bare_hub_reference_and_hub_index_fetch_every_shard(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    expected = reference_state_dict()
    write_sharded(tmp_path / "snapshot" / "transformer", expected)
    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)
    loaded = read_state_dict("owner/repo/transformer/model.safetensors.index.json")
    assert_same_tensors(loaded, expected)
    assert fetched[0] == "transformer/model.safetensors.index.json"
    assert sorted(fetched[1:]) == [f"transformer/model-{p}.safetensors" for p in ("fc1", "fc2", "rest")]


def test_hub_reference_without_a_file_is_refused():
    with pytest.raises(CheckpointError, match="needs a file inside the repository"):
        read_state_dict("hf://owner/repo")


# ----------------------------------------------------------------------------------------------- load_into


def test_shape_mismatch_names_key_and_both_shapes():
    with pytest.raises(CheckpointError, match=r"fc1\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        load_into(TinyMLP(hidden=16), reference_state_dict())


def test_missing_key_is_an_error_when_strict_and_reported_otherwise():
    state_dict = reference_state_dict()
    del state_dict["fc2.bias"]
    state_dict["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): fc2.bias"):
        load_into(TinyMLP(), state_dict)
    model = TinyMLP()
    report = load_into(model, state_dict, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["fc2.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.fc1.weight, state_dict["fc1.weight"])
    assert "fc2.bias" in report.summary()


def test_strict_error_lists_at_most_ten_names_with_counts():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(24\).*\+14 more"):
        load_into(model, {})


def test_non_strict_load_skips_mismatched_shapes():
    model = TinyMLP(hidden=16)
    before = model.fc2.bias.clone()
    report = load_into(model, reference_state_dict(), strict=False)
    assert {name for name, _, _ in report.mismatched} == {"fc1.weight", "fc1.bias", "fc2.weight"}
    assert torch.equal(model.fc2.bias, reference_state_dict()["fc2.bias"]) and not torch.equal(before, model.fc2.bias)


def test_dtype_conversion_touches_only_floating_tensors():
    model = TinyMLP()
    report = load_into(model, reference_state_dict(), dtype=torch.float16)
    assert report.ok and report.loaded == 5
    assert model.fc1.weight.dtype == torch.float16 and model.steps.dtype == torch.int64


def test_meta_model_with_missing_tensor_reports_it_when_not_strict():
    with torch.device("meta"):
        model = TinyMLP()
    state_dict = reference_state_dict()
    del state_dict["fc1.bias"]
    report = load_into(model, state_dict, strict=False)
    assert report.missing == ["fc1.bias"] and model.fc1.bias.is_meta and not model.fc1.weight.is_meta


def test_meta_model_without_buffer_hook_is_an_error_when_strict():
    class TableWithoutHook(TinyMLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("freqs", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        model = TableWithoutHook()
    with pytest.raises(CheckpointError, match="(?s)freqs.*reset_non_persistent_buffers"):
        load_into(model, reference_state_dict())


# ----------------------------------------------------------------------------------------------- build_and_load


def test_build_and_load_assigns_file_tensors_off_meta(tmp_path):
    expected = reference_state_dict()
    safetensors.torch.save_file(expected, tmp_path / "w.safetensors")
    model, report = build_and_load(MLPWithTable, tmp_path / "w.safetensors")
    assert report.ok
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert_same_tensors(model.state_dict(), expected)
    assert torch.equal(model.freqs, torch.arange(4.0))
    assert model.fc1.weight.requires_grad


def test_build_and_load_converts_dtype_from_half_file(tmp_path):
    expected = {k: v.half() if v.is_floating_point() else v for k, v in reference_state_dict().items()}
    safetensors.torch.save_file(expected, tmp_path / "half.safetensors")
    model, _ = build_and_load(TinyMLP, tmp_path / "half.safetensors", dtype=torch.float32)
    assert model.fc1.weight.dtype == torch.float32 and model.steps.dtype == torch.int64
    assert torch.equal(model.fc1.weight, expected["fc1.weight"].float())


def test_build_and_load_error_names_the_file(tmp_path):
    safetensors.torch.save_file(reference_state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)w\.safetensors.*fc1\.weight"):
        build_and_load(lambda: TinyMLP(hidden=16), tmp_path / "w.safetensors")


def test_build_and_load_non_strict_zero_fills_and_reports_missing(tmp_path):
    state_dict = reference_state_dict()
    del state_dict["fc2.bias"]
    safetensors.torch.save_file(state_dict, tmp_path / "w.safetensors")
    model, report = build_and_load(TinyMLP, tmp_path / "w.safetensors", strict=False)
    assert report.missing == ["fc2.bias"]
    assert torch.equal(model.fc2.bias, torch.zeros(3)) and torch.equal(model.fc1.weight, state_dict["fc1.weight"])


# ----------------------------------------------------------------------------------------------- hashing


def test_file_sha256_streams_files_and_hashes_folder_index(tmp_path):
    import hashlib

    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "blob.safetensors").write_bytes(data)
    assert file_sha256(tmp_path / "blob.safetensors") == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "blob.safetensors", max_bytes=100) == hashlib.sha256(data[:100]).hexdigest()
    write_sharded(tmp_path / "ckpt" / "model", reference_state_dict())
    index = (tmp_path / "ckpt" / "model" / "model.safetensors.index.json").read_bytes()
    assert file_sha256(tmp_path / "ckpt") == hashlib.sha256(index).hexdigest()
    with pytest.raises(CheckpointError, match="does not exist"):
        file_sha256(tmp_path / "nope")
