"""The memory estimate made before a run: exact weights, activations that scale with the request, the verdict."""

import math
from dataclasses import replace

import pytest
import torch

from pipelines.engine import OFFLOAD_PLAN
from pipelines.memory_estimate import MemoryEstimate, count_preset_params, estimate_memory
from pipelines.options import GenerationOptions, resolve_options
from pipelines.presets import get_preset
from tests.golden import read_manifest


def _manifest_params(name):
    return sum(math.prod(shape) for _key, shape in read_manifest(name))


def test_official_weights_are_counted_exactly_from_the_configs():
    params = count_preset_params(get_preset("opensora-v2-768px"))
    assert params["mmdit"] == _manifest_params("opensora_v2_mmdit_keys.tsv")
    assert params["vae"] == _manifest_params("hunyuan_vae_keys.tsv")
    assert params["text_encoder"] > 4e9  # T5-XXL encoder + CLIP-L text model


def test_embedded_weights_match_the_loaded_models():
    from pipelines.engine import Engine

    engine = Engine(get_preset("shapes-default"), output_dir="unused", preview_every=0).load()
    loaded = {stats.name: stats.total for stats in engine.param_stats()}
    assert count_preset_params(engine.preset) == loaded


def _estimate(preset, device_type="cuda", plan=None, **options):
    opts = resolve_options(GenerationOptions(prompt="a cat", **options), preset)
    return estimate_memory(preset, opts, device_type=device_type, dtype=torch.bfloat16, offload_plan=plan)


def test_activations_grow_with_frames_and_pixels_and_weights_do_not():
    preset = get_preset("opensora-v2-256px")
    short, long = (_estimate(preset, num_frames=n, aspect_ratio="1:1") for n in (33, 129))
    assert short.weights == long.weights
    resident = sum(short.weights.values())
    # 33 frames -> 9 latent frames, 129 -> 33: the video tokens grow 33/9-fold (plus the fixed 512 text tokens)
    grow = (long.stages["sample"] - resident) / (short.stages["sample"] - resident)
    tokens = 16 * 16  # 256x256 px / 16 px per token, square
    assert grow == pytest.approx((33 * tokens + 512) / (9 * tokens + 512))
    assert long.stages["decode"] > short.stages["decode"]
    big = _estimate(get_preset("opensora-v2-768px"), num_frames=129)
    assert big.peak > long.peak > short.peak


def test_a_reference_adds_a_third_guidance_branch(tmp_path):
    from PIL import Image

    preset = get_preset("opensora-v2-256px")
    image = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(image)
    t2v = _estimate(preset, num_frames=33)
    i2v = _estimate(preset, num_frames=33, mode="i2v", references=(str(image),))
    resident = sum(t2v.weights.values())
    assert (i2v.stages["sample"] - resident) == pytest.approx(1.5 * (t2v.stages["sample"] - resident))
    assert resident == t2v.stages["encode_references"] < i2v.stages["encode_references"] < i2v.stages["decode"]


def test_offloading_keeps_only_each_stages_models_resident():
    preset = get_preset("opensora-v2-768px")
    full, offloaded = _estimate(preset, num_frames=129), _estimate(preset, plan=OFFLOAD_PLAN, num_frames=129)
    assert offloaded.stages["sample"] == full.stages["sample"] - full.weights["vae"] - full.weights["text_encoder"]
    assert offloaded.stages["encode_text"] == full.weights["text_encoder"]
    assert offloaded.peak < full.peak
    # ... while the host keeps every model's weights in RAM, which the verdict judges too
    assert full.host == 0 and offloaded.host == sum(full.weights.values())
    roomy = offloaded.verdict(2 * offloaded.peak)
    assert roomy[0] and "of RAM for the offloaded weights" in roomy[1]
    fits, line = replace(offloaded, host_available=offloaded.host // 2).verdict(2 * offloaded.peak)
    assert not fits and "of RAM available" in line
    assert replace(offloaded, host_available=offloaded.host).verdict(2 * offloaded.peak)[0]


def test_published_768px_peak_is_reproduced_within_ten_percent():
    # Open-Sora 2.0 README: 768x768, 129 frames, one H100, three guidance branches every step: 60.3 GB peak.
    preset = get_preset("opensora-v2-768px")
    opts = resolve_options(GenerationOptions(prompt="a cat", resolution="768px", aspect_ratio="1:1",
                                             num_frames=129), preset)
    estimate = estimate_memory(preset, opts, device_type="cuda", dtype=torch.bfloat16, branches=3)
    assert estimate.peak_stage == "sample"
    assert estimate.peak == pytest.approx(60.3e9, rel=0.1)


def test_image_first_counts_the_reference_branch_and_guidance_one_skips_branches():
    preset = get_preset("opensora-v2-256px")
    plain, image_first = _estimate(preset, num_frames=33), _estimate(preset, num_frames=33, image_first=True)
    unguided = _estimate(preset, num_frames=33, guidance=1.0, guidance_img=1.0)
    resident = sum(plain.weights.values())
    dit = {name: e.stages["sample"] - resident for name, e in
           (("plain", plain), ("image_first", image_first), ("unguided", unguided))}
    assert dit["image_first"] == pytest.approx(1.5 * dit["plain"]) and dit["unguided"] == pytest.approx(
        0.5 * dit["plain"])


def test_verdict_compares_the_peak_with_what_is_available():
    estimate = MemoryEstimate(weights={"mmdit": 10}, stages={"sample": 2 * 2**30, "decode": 2**30},
                              device_type="cuda")
    assert estimate.peak_stage == "sample" and estimate.peak == 2 * 2**30
    fits, line = estimate.verdict(8 * 2**30)
    assert fits and "available" in line and "GPU" in line and "in sample" in line
    fits, line = estimate.verdict(2**30)
    assert not fits and "run out of memory" in line
    tie = MemoryEstimate(weights={}, stages={"encode_references": 5, "sample": 1, "decode": 5}, device_type="cpu")
    assert tie.peak_stage == "decode"


def test_the_studio_estimate_follows_the_active_tab(tmp_path):
    from pipelines.engine import Engine
    from studio.jobs import EnginePool
    from studio.panels import estimate_markdown, estimate_options

    engine = Engine(get_preset("opensora-v2-256px"), device="cpu", output_dir=tmp_path)  # never loaded
    pool = EnginePool([engine])
    sample = {mode: engine.estimate_memory(estimate_options(mode, "256px", "1:1", 129))[0].stages["sample"]
              for mode in ("t2v", "i2v", "loop", "extend")}
    assert sample["i2v"] > sample["t2v"] and sample["loop"] == sample["i2v"]  # the image guidance's third branch
    lines = {mode: estimate_markdown(pool, "256px", "1:1", 129, mode) for mode in ("t2v", "i2v", "extend")}
    assert "text-to-video" in lines["t2v"] and "image-to-video" in lines["i2v"] and "extension" in lines["extend"]
    # the tab's own rules show up before Generate: an extension needs more frames than its conditioning clip
    assert "at least 37" in estimate_markdown(pool, "256px", "1:1", 33, "extend")
    assert "at least 69" in estimate_markdown(pool, "256px", "1:1", 65, "extend", easy=True)  # 65 given frames
    assert "text-to-video" in estimate_markdown(pool, "256px", "1:1", 129, None)  # before any tab is chosen
