"""The batch CLI, the presets registry and the benchmark scripts (smoke mode, so they cannot rot)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines.presets as presets
from pipelines import generate
from pipelines.media import probe_video
from tests.tiny_preset import tiny_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_registry(monkeypatch):
    monkeypatch.setattr(presets, "get_preset", lambda name, weights_dir=None: tiny_preset())


def test_cli_single_prompt_prints_where_the_result_went(tiny_registry, tmp_path, capsys):
    assert generate.main(["--prompt", "a red circle", "--out", str(tmp_path), "--seed", "5"]) == 0
    out = capsys.readouterr().out
    video = Path(out.split("] ")[1].split(" (seed")[0])
    assert video.exists() and "seed 5" in out and probe_video(video).frames == 9


def test_cli_csv_rows_with_references(tiny_registry, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "ref.png")
    table = tmp_path / "prompts.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "ref", "cond_type", "name"])
        writer.writeheader()
        writer.writerow({"text": "a red box", "ref": "", "cond_type": "t2v", "name": "first"})
        writer.writerow({"text": "a red box", "ref": str(tmp_path / "ref.png"), "cond_type": "i2v_head",
                         "name": "../../etc/passwd"})
    assert generate.main(["--csv", str(table), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "first" in lines[0]
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 7 and [f for f in files if not f.startswith("out/")] == ["prompts.csv", "ref.png"]
    assert sum(f.endswith(".ref0.png") for f in files) == 1  # the i2v row keeps a copy of its reference
    assert not any(".." in f for f in files) and not (tmp_path.parent.parent / "etc").exists()


def test_cli_segments_and_image_first_apply_to_their_rows_only():
    args = generate.build_parser().parse_args(["--prompt", "x", "--segments", "3"])
    extend = generate.row_options({"text": "x", "ref": "c.mp4", "cond_type": "v2v_tail"}, args)
    assert extend.mode == "extend" and extend.extend_direction == "backward" and extend.segments == 3
    assert generate.row_options({"text": "x", "cond_type": "t2v"}, args).segments == 1
    args = generate.build_parser().parse_args(["--prompt", "x", "--image-first"])
    assert generate.row_options({"text": "x", "cond_type": "t2v"}, args).image_first
    assert not generate.row_options({"text": "x", "ref": "a.png", "cond_type": "i2v_head"}, args).image_first


def test_cli_bad_input_exits_non_zero_with_a_message(tiny_registry, tmp_path, capsys):
    assert generate.main(["--prompt", "x", "--num-frames", "10", "--out", str(tmp_path)]) == 2
    assert "4k+1" in capsys.readouterr().err
    assert generate.main(["--csv", str(tmp_path / "missing.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    assert generate.main(["--prompt", "x", "--device", "gpu", "--out", str(tmp_path)]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert generate.main(["--prompt", "x", "--device", "mps", "--out", str(tmp_path)]) == 2
    assert "not supported" in capsys.readouterr().err


def test_app_lists_each_device_once():
    from pipelines.components import pick_devices

    assert pick_devices("cuda:0, cuda:1,cuda:0") == ["cuda:0", "cuda:1"] and pick_devices("cpu") == ["cpu"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get_preset("sora-9000")


def test_official_presets_point_at_the_released_files(tmp_path):
    preset = presets.get_preset("opensora-v2-768px")
    assert preset.mmdit_weights == "hf://hpcai-tech/Open-Sora-v2/Open_Sora_v2.safetensors"
    assert preset.sampling.resolution == "768px" and preset.official
    local = presets.get_preset("opensora-v2-256px", weights_dir=str(tmp_path))
    assert local.vae_weights == str(tmp_path / "hunyuan_vae.safetensors")


def test_official_weights_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    from pipelines.components import load_components
    from pipelines.loading import CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = presets.get_preset("opensora-v2-256px", weights_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="Open_Sora_v2.safetensors"):
        load_components(preset, device=__import__("torch").device("cpu"))


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--smoke", "--json", str(out)], check=True,
                   timeout=300, capture_output=True)
    info = json.loads(out.read_text())
    rows = {(r["mode"], r["sampler"]): r for r in info["results"]}
    assert rows[("t2v", "skipping")]["branch_evals_50_steps"] == 80
    assert rows[("i2v", "skipping")]["branch_evals_50_steps"] == 110  # from the sampler's rules, as upstream counts
    assert rows[("t2v", "three-branch")]["branch_evals_50_steps"] == 150
    assert info["vae_decode_shape"] == [1, 3, 9, 64, 64]


def test_sampler_bench_smoke_compares_the_two_samplers(tmp_path):
    out = tmp_path / "sampler.json"
    subprocess.run([sys.executable, str(ROOT / "bench/sampler.py"), "--smoke", "--json", str(out)], check=True,
                   timeout=300, capture_output=True)
    info = json.loads(out.read_text())
    assert info["frames"] == 9 and info["t2v_call_ratio"] > 1.5 and info["i2v_call_ratio"] > 1.0
    assert info["size"] == [64, 64]  # the preset's default frame size
    assert {(r["mode"], r["sampler"]) for r in info["rows"]} == {(m, s) for m in ("t2v", "i2v")
                                                                  for s in ("skipping", "three-branch")}


def test_memory_bench_smoke_compares_measured_and_estimated_stages(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "bench/memory.py"), "--smoke", "--json", str(out)], check=True,
                   timeout=300, capture_output=True)
    row = json.loads(out.read_text())["results"][0]
    assert row["frames"] == 9
    for stage in ("sample", "decode"):
        assert row[stage]["estimated_mib"] > 0 and row[stage]["ratio"] is not None
