"""The sampler against upstream's schedules, guidance rules and full denoise runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.conditions import ReferenceLatents, prepare_inference_condition, replace_conditioned_frames
from pipelines.models import build_mmdit
from pipelines.sampling import (DenoiseCounter, GenerationStopped, GuidanceOptions, TextEmbeds, denoise, get_noise,
                                get_schedule, needed_branches, oscillation_scale, pack, step_scales,
                                temporal_image_scale, unpack)
from tests.golden import golden_cases, golden_file, load_golden_json


@pytest.mark.parametrize("case", golden_cases("schedules.json", "get_schedule", "cases"),
                         ids=lambda c: str(tuple(c["args"].values())))
def test_schedule_matches_upstream(case):
    args = dict(case["args"])
    assert get_schedule(**args) == pytest.approx(case["timesteps"], abs=1e-7)


def test_api_derived_schedules_match_upstream():
    for case in load_golden_json("schedules.json")["api_fn_derived_schedules"]["cases"]:
        _, _, t_lat, h, w = case["noise_shape"]
        assert (h // 2) * (w // 2) == case["image_seq_len"] and t_lat == case["num_frames_latent"]
        assert get_schedule(50, case["image_seq_len"], t_lat) == pytest.approx(case["timesteps_50"], abs=1e-7)


@pytest.mark.parametrize("scale", ["7.5", "3.0"])
def test_oscillation_matches_upstream(scale):
    for row in load_golden_json("schedules.json")["get_oscillation_gs"][f"guidance_{scale}"]:
        assert oscillation_scale(float(scale), row["i"]) == row["gs"]


def test_temporal_image_guidance_matches_upstream_probe():
    for case in load_golden_json("schedules.json")["temporal_image_guidance"]["cases"]:
        args = case["args"]
        opts = GuidanceOptions(num_steps=args["num_steps"], guidance=7.5, guidance_img=args["guidance_img"],
                               image_osci=args["image_osci"], scale_temporal_osci=args["scale_temporal_osci"])
        for row in case["per_step"]:
            g_txt, g_img = step_scales(opts, row["i"], args["T_lat"], temporal=True)
            per_frame = g_img.tolist() if isinstance(g_img, torch.Tensor) else [g_img] * args["T_lat"]
            assert per_frame == pytest.approx(row["probed_per_frame_from_upstream_denoise"], abs=1e-6)
            if "text_gs_probed" in row:
                assert g_txt == pytest.approx(row["text_gs_probed"])


def test_temporal_ramp_starts_at_one_for_the_given_frame():
    ramp = temporal_image_scale(3.0, 0, 10, 5)
    assert ramp[0] == 1.0 and ramp[-1] == pytest.approx(3.0)


@pytest.fixture(scope="module")
def golden_mmdit():
    weights = load_file(golden_file("mmdit_A.safetensors"))
    config = json.loads(golden_file("mmdit_A.json").read_text())["config"]
    model = build_mmdit(**config).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    return model


def run_golden(model, name, skip_known=True, counter=None):
    data = load_file(golden_file(f"{name}.safetensors"))
    meta = json.loads(golden_file(f"{name}.json").read_text())
    so = meta["sampling_option"]
    opts = GuidanceOptions(num_steps=so["num_steps"], guidance=so["guidance"], guidance_img=so["guidance_img"])
    n = data["input.noise_unpacked"].shape[0]
    txt, y = data["input.txt"], data["input.y_vec"]
    cond = pack(torch.cat([data["input.masks"], data["input.masked_ref"]], dim=1))
    with torch.no_grad():
        out = denoise(model, pack(data["input.noise_unpacked"]), data["input.img_ids"][:n],
                      TextEmbeds(txt[:n], y[:n]), TextEmbeds(txt[n:2 * n], y[n:2 * n]), cond,
                      data["input.timesteps"].tolist(), opts, t_lat=3, temporal_image_guidance=True,
                      skip_known=skip_known, counter=counter)
    return data, out


@pytest.mark.parametrize("name", ["denoise_A", "denoise_A_14"])
def test_denoise_reproduces_upstream(golden_mmdit, name):
    data, out = run_golden(golden_mmdit, name)
    torch.testing.assert_close(out, data["output.denoised_packed"], atol=1e-4, rtol=0)


def test_noise_is_seeded_on_cpu_like_upstream():
    data = load_file(golden_file("denoise_A.safetensors"))
    assert torch.equal(get_noise(2, 4, 3, 8, 8, seed=42), data["input.noise_unpacked"])


def test_condition_and_replacement_apply_to_every_batch_item(golden_mmdit):
    data, out = run_golden(golden_mmdit, "denoise_A")
    refs = data["input.ref_latents"]  # (N, C, 1, h, w)
    z = torch.zeros(2, 4, 3, 8, 8)
    masks, masked = prepare_inference_condition(z, "i2v_head", ReferenceLatents(head=refs))
    torch.testing.assert_close(masks, data["input.masks"])
    torch.testing.assert_close(masked, data["input.masked_ref"])
    final = replace_conditioned_frames(unpack(out, 3, 8, 8), masks, masked)
    expected = data["output.api_fn_latent"]
    torch.testing.assert_close(final[0], expected[0], atol=1e-4, rtol=0)  # upstream fixes item 0 ...
    torch.testing.assert_close(final[1, :, 1:], expected[1, :, 1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(final[1, :, :1], refs[1])  # ... we fix every item


def test_skipping_sampler_equals_three_branch_loop_with_fewer_calls(golden_mmdit):
    skipping, full = DenoiseCounter(), DenoiseCounter()
    _, a = run_golden(golden_mmdit, "denoise_A_14", skip_known=True, counter=skipping)
    _, b = run_golden(golden_mmdit, "denoise_A_14", skip_known=False, counter=full)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert full.branch_evals == 3 * 14 and skipping.branch_evals == 3 * 12 + 2


def count_branches(num_steps, has_condition, temporal):
    opts = GuidanceOptions(num_steps=num_steps)
    return sum(len(needed_branches(*step_scales(opts, i, 9, temporal), has_condition)) for i in range(num_steps))


def test_t2v_needs_at_most_80_of_150_model_calls_at_50_steps():
    assert count_branches(50, has_condition=False, temporal=False) == 80
    assert count_branches(50, has_condition=True, temporal=True) == 110


def test_t2v_skipping_matches_full_loop_numerically(golden_mmdit):
    torch.manual_seed(0)
    n, length = 1, 48
    text, neg = TextEmbeds(torch.randn(n, 7, 40), torch.randn(n, 24)), TextEmbeds(torch.randn(n, 7, 40),
                                                                                  torch.randn(n, 24))
    ids = load_file(golden_file("denoise_A.safetensors"))["input.img_ids"][:1]
    noise = torch.randn(n, length, 16)
    zero_cond = torch.zeros(n, length, 20)
    opts = GuidanceOptions(num_steps=14)
    ts = get_schedule(14, 16, 3)
    counts = DenoiseCounter(), DenoiseCounter()
    with torch.no_grad():
        a = denoise(golden_mmdit, noise, ids, text, neg, zero_cond, ts, opts, 3, counter=counts[0])
        b = denoise(golden_mmdit, noise, ids, text, neg, zero_cond, ts, opts, 3, skip_known=False, counter=counts[1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert counts[0].branch_evals == 12 * 2 + 2 < counts[1].branch_evals == 42


def test_stop_request_ends_the_loop_within_one_step(golden_mmdit):
    seen = []
    with pytest.raises(GenerationStopped), torch.no_grad():
        denoise(golden_mmdit, torch.randn(1, 48, 16), torch.zeros(1, 48, 3),
                TextEmbeds(torch.randn(1, 7, 40), torch.randn(1, 24)),
                TextEmbeds(torch.randn(1, 7, 40), torch.randn(1, 24)), None, get_schedule(10, 16, 3),
                GuidanceOptions(num_steps=10), 3, callback=lambda s: seen.append(s.index),
                should_stop=lambda: len(seen) >= 2)
    assert seen == [0, 1]


def test_preview_is_the_predicted_clean_latent(golden_mmdit):
    """x0 = x_t - t v: at the last step of a 1-step schedule the preview equals the final sample."""
    previews = []
    args = (golden_mmdit, torch.randn(1, 48, 16), torch.zeros(1, 48, 3),
            TextEmbeds(torch.randn(1, 7, 40), torch.randn(1, 24)), TextEmbeds(torch.randn(1, 7, 40),
                                                                              torch.randn(1, 24)), None, [1.0, 0.0],
            GuidanceOptions(num_steps=1), 3)
    with torch.no_grad():
        out = denoise(*args, callback=previews.append)
    torch.testing.assert_close(previews[0].x0, out)
