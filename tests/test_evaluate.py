"""The evaluation CLI's per-mode judging runs end to end (tiny random preset: the numbers are not the point)."""

import math

import pytest

from pipelines.engine import Engine
from pipelines.training import evaluate
from tests.tiny_preset import tiny_preset


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tiny_preset(num_frames=33), output_dir=tmp_path_factory.mktemp("out"), preview_every=0).load()


def test_t2v_report_has_accuracies_and_speed_correlation(engine):
    report = evaluate.evaluate_t2v(engine, n=3, seed=0, frames=9)
    assert report["clips"] == 3
    for key in ("color_accuracy", "shape_accuracy", "direction_accuracy", "background_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert "spearman" in report["speed_vs_motion_score"]
    mistakes = sum(report["shape_confusion"].values())
    assert mistakes == round(3 * (1 - report["shape_accuracy"]))
    assert all("->" in key for key in (*report["shape_confusion"], *report["color_confusion"]))
    assert report["image_first"] is False


def test_confusions_read_asked_then_judged():
    from pipelines.training.shapes import sample_eval_prompts

    spec = sample_eval_prompts(1, 0)[0].spec
    row = {f"{k}_correct": True for k in ("color", "shape", "direction", "background",
                                          "color_literal", "shape_literal", "direction_literal")}
    rows = [{**row, "expected": spec, "shape": "other", "shape_correct": False, "color": spec.color,
             "all_correct": False}, {**row, "expected": spec, "shape": spec.shape, "color": spec.color,
                                     "all_correct": True}]
    report = evaluate._accuracies(rows)
    assert report["shape_confusion"] == {f"{spec.shape}->other": 1} and report["color_confusion"] == {}
    assert report["shape_accuracy"] == 0.5 and report["all_correct"] == 0.5
    rows[0]["direction_literal_correct"] = False
    assert evaluate._accuracies(rows)["literal"] == {"color_accuracy": 1.0, "shape_accuracy": 1.0,
                                                     "direction_accuracy": 0.5}


class _LosslessVAE:
    """Encodes to the pixels themselves: its reconstructions are the clips, so the ceiling must be perfect."""

    def parameters(self):
        import torch

        yield torch.zeros(1)  # (the evaluation sends clips to the VAE's device)

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class _BlurringVAE(_LosslessVAE):
    def decode(self, z):
        import torch

        blur = torch.nn.functional.avg_pool3d(z, (1, 5, 5), stride=1, padding=(0, 2, 2), count_include_pad=False)
        return blur


def test_vae_ceiling_judges_reconstructions_of_the_real_clips():
    import torch
    from types import SimpleNamespace

    def fake_engine(vae):
        return SimpleNamespace(device=torch.device("cpu"), components=SimpleNamespace(vae=vae, dtype=torch.float32))

    perfect = evaluate.evaluate_vae_ceiling(fake_engine(_LosslessVAE()), n=12, seed=0, frames=9)
    assert perfect["shape_accuracy"] == perfect["color_accuracy"] == 1.0 and perfect["shape_confusion"] == {}
    assert perfect["psnr_db"] == 99.0
    blurred = evaluate.evaluate_vae_ceiling(fake_engine(_BlurringVAE()), n=12, seed=0, frames=9)
    assert blurred["psnr_db"] < 40 and blurred["shape_accuracy"] < 1.0  # a 5-px blur rounds some outline
    assert sum(blurred["shape_confusion"].values()) == round(12 * (1 - blurred["shape_accuracy"]))


def test_image_modes_report_psnr(engine, tmp_path):
    i2v = evaluate.evaluate_i2v(engine, n=1, seed=0, frames=9, folder=tmp_path)
    loop = evaluate.evaluate_loop(engine, n=1, seed=0, frames=9, folder=tmp_path)
    assert math.isfinite(i2v["first_frame_psnr_db"]) and loop["clips"] == 1
    assert math.isfinite(loop["last_frame_psnr_db"]) and 0 <= loop["moves_mid_clip"] <= 1


def test_extension_report_measures_the_kept_frames_before_stitching(engine, tmp_path):
    report = evaluate.evaluate_extend(engine, n=1, seed=0, frames=37, folder=tmp_path)
    # random weights cannot reproduce the given frames: a PSNR this low proves the raw sample is measured,
    # not the stitched copy of the user's clip (which would be ~99 dB)
    assert report["clips"] == 1 and report["kept_frames_psnr_db"] < 40


class _PerfectExtender:
    """Returns the true scene for any extension request: what a flawless model would generate."""

    def __init__(self):
        from pipelines.training.shapes import sample_eval_prompts

        self.prompts = sample_eval_prompts(400, 3, num_frames=33)  # the evaluation's own prompts (seed 0 + 3)

    def generate_frames(self, options):
        import torch
        from types import SimpleNamespace

        from pipelines.media import read_video, to_uint8_frames
        from pipelines.training.shapes import render_clip

        given = to_uint8_frames(read_video(options.references[0])[0])
        for item in self.prompts:
            if item.caption == options.prompt and item.spec.motion_score == options.motion_score:
                world = render_clip(item.spec, options.num_frames)
                if abs(world[:33].astype(int) - given.astype(int)).mean() < 3:
                    video = torch.from_numpy(world).permute(3, 0, 1, 2).float() / 127.5 - 1.0
                    return SimpleNamespace(raw=video, video=video)
        raise AssertionError("no evaluation prompt matches the request")


def test_extension_direction_is_judged_against_the_world_carried_on(tmp_path):
    # A flawless extender scores 1.0 on direction, bounces at the cut included; the older reading (the direction
    # of the clip's last frames) marks some of the very same continuations wrong.
    report = evaluate.evaluate_extend(_PerfectExtender(), n=30, seed=0, frames=65, folder=tmp_path)
    assert report["direction_follows_world"] == report["direction_follows_world_first_leg"] == 1.0
    assert report["direction_same_as_clip_end"] < 1.0
    assert report["kept_frames_psnr_db"] > 40  # only the H.264 round trip of the given clip differs


def test_cli_evaluates_a_preset_folder_written_by_training(tmp_path):
    import json

    import torch

    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.models.vae import CausalVAE, CausalVAEConfig
    from pipelines.training.train_default import SAMPLING, write_preset
    from tests.tiny_preset import TINY_MMDIT, TINY_VAE

    torch.manual_seed(0)
    folder = tmp_path / "run-preset"
    write_preset(folder, MMDiT(MMDiTConfig.from_dict(TINY_MMDIT)), CausalVAE(CausalVAEConfig.from_dict(TINY_VAE)),
                 trained=True, notes="test", training={}, sampling={**SAMPLING, "num_steps": 2})
    report = evaluate.main(["--preset", str(folder), "--t2v", "1", "--i2v", "0", "--loop", "0", "--extend", "0",
                            "--ceiling", "2", "--image-first", "--frames", "9", "--from-noise", "1,0.5",
                            "--json", str(tmp_path / "eval.json")])
    assert report["preset"] == "shapes-default" and report["clips"] == 1
    assert json.loads((tmp_path / "eval.json").read_text())["t2v"]["clips"] == 1
    assert report["vae_ceiling"]["clips"] == 2 and report["clips"] == 1  # the ceiling judges no generated clip
    assert report["t2v"]["image_first"] is True
    assert set(report["from_noise"]) == {"1", "0.5"} and report["from_noise"]["0.5"]["clips"] == 1
    with pytest.raises(SystemExit):
        evaluate.main(["--preset", str(folder), "--from-noise", "0"])  # a level must lie in (0, 1]


def test_sampling_from_a_noised_real_latent_starts_there(engine):
    """start/start_t: from a barely noised latent the sample stays next to it; start_t=1 is plain sampling."""
    import torch

    from pipelines.conditions import ReferenceLatents
    from pipelines.options import GenerationOptions
    from pipelines.stages import encode_text, guidance_options, latent_shape, sample

    c = engine.components
    opts = engine.check(GenerationOptions(prompt="a red circle", num_frames=9, seed=3))
    text, negative = encode_text(c.text_encoder, opts.prompt, "")
    latent = latent_shape(c.vae, 9, opts.height, opts.width)
    start = torch.randn(1, *latent, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return sample(c.mmdit, text, negative, ReferenceLatents(), "t2v", latent, 3, guidance_options(opts), **kw)

    plain = run()
    near = run(start=start, start_t=1e-3)
    assert (near - start).abs().max() < 0.05 < (plain - start).abs().max()
    torch.testing.assert_close(run(start=start, start_t=1.0), plain)
    with pytest.raises(ValueError, match="start must be"):
        run(start=start[:, :, :1], start_t=0.5)


def test_swapped_shape_captions_are_judged_against_the_caption(engine, monkeypatch):
    from pipelines.training import shapes

    prompts, captions = shapes.sample_eval_prompts(3, 0, num_frames=9), []
    real_check = engine.check
    monkeypatch.setattr(engine, "check", lambda opts: captions.append(opts.prompt) or real_check(opts))
    report = evaluate.evaluate_from_noise(engine, n=3, seed=0, frames=9, levels=[0.5], swap_shape=True)["0.5"]
    for i, (item, caption) in enumerate(zip(prompts, captions)):  # the same caption but for the shape
        other = shapes.twin_shape(item.spec.shape, i)
        assert caption == shapes.caption_with_shape(item.caption, item.spec.shape, other)
    assert report["clips"] == 3 and report["follows_caption"] == report["shape_accuracy"]
    assert 0.0 <= report["follows_caption"] + report["follows_clip"] <= 1.0


def test_from_noise_report_judges_each_level(engine):
    report = evaluate.evaluate_from_noise(engine, n=2, seed=0, frames=9, levels=[1.0, 0.05])
    assert set(report) == {"1", "0.05"}
    for level in report.values():
        assert level["clips"] == 2 and 0.0 <= level["shape_accuracy"] <= 1.0
