"""End to end through the engine with a tiny random preset: every mode makes a playable video and a recipe."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.engine import Engine, PartialVideoEvent, PreviewEvent, ProgressEvent, StageEvent
from pipelines.media import MediaError, probe_video, read_video, write_video
from pipelines.options import GenerationOptions, OptionsError
from pipelines.sampling import GenerationStopped
from tests.tiny_preset import tiny_preset


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    return Engine(tiny_preset(), output_dir=tmp_path_factory.mktemp("outputs")).load()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("refs") / "ref.png"
    pixels = np.zeros((80, 96, 3), np.uint8)
    pixels[20:40, 30:50] = (220, 40, 40)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    frames = np.zeros((41, 64, 64, 3), np.uint8)
    for t in range(41):
        frames[t, 20:36, t:t + 16] = (40, 90, 220)
    write_video(frames, path, fps=8)
    return str(path)


def check_output(result, frames, fps=8, size=64):
    info = probe_video(result.video_path)
    assert (info.frames, info.width, info.height) == (frames, size, size)
    assert info.fps == pytest.approx(fps)
    recipe = json.loads(result.recipe_path.read_text())
    for key in ("preset", "mode", "cond_type", "prompt", "options", "seed", "timings_s", "peak_memory_bytes",
                "versions", "checkpoints", "sampler"):
        assert key in recipe
    assert recipe["prompt"]["final"].endswith(f"{fps} FPS. 4 motion score.")
    return recipe


def test_t2v_makes_a_playable_video_with_recipe_and_events(engine):
    events = []
    result = engine.run(GenerationOptions(prompt="a red circle moving to the right", seed=3), on_event=events.append)
    recipe = check_output(result, frames=9)
    assert recipe["seed"] == 3 and recipe["cond_type"] == "t2v"
    kinds = [type(e) for e in events]
    assert StageEvent in kinds and ProgressEvent in kinds and PreviewEvent in kinds
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert previews[0].image.dtype == np.uint8 and previews[0].image.ndim == 3
    # t2v skips the redundant unconditional branch: 2 branches per step at 3 steps
    assert recipe["sampler"] == {"forwards": 3, "branch_evaluations": 6}


def test_same_seed_gives_identical_frames(engine):
    a = engine.run(GenerationOptions(prompt="a blue square", seed=11))
    b = engine.run(GenerationOptions(prompt="a blue square", seed=11))
    assert a.video_path != b.video_path
    assert torch.equal(read_video(a.video_path)[0], read_video(b.video_path)[0])


def test_random_seed_is_reported(engine):
    result = engine.run(GenerationOptions(prompt="a green ball"))
    assert isinstance(result.seed, int) and json.loads(result.recipe_path.read_text())["seed"] == result.seed


@pytest.mark.parametrize("position", ["head", "tail"])
def test_i2v(engine, image_path, position):
    result = engine.run(GenerationOptions(mode="i2v", prompt="a red square", references=(image_path,),
                                          i2v_position=position, seed=1))
    assert check_output(result, frames=9)["cond_type"] == f"i2v_{position}"


@pytest.mark.parametrize("two_images", [False, True])
def test_loop(engine, image_path, two_images):
    refs = (image_path, image_path) if two_images else (image_path,)
    result = engine.run(GenerationOptions(mode="loop", prompt="a red square", references=refs, seed=1))
    assert check_output(result, frames=9)["cond_type"] == "i2v_loop"


def test_extend_forward_keeps_the_clip_and_adds_frames(engine, clip_path):
    result = engine.run(GenerationOptions(mode="extend", prompt="a blue square moving right",
                                          references=(clip_path,), num_frames=45, seed=1))
    recipe = check_output(result, frames=41 + 45 - 33)
    assert recipe["cond_type"] == "v2v_head"
    original, new = read_video(clip_path)[0], read_video(result.video_path)[0]
    assert (original - new[:, :41]).abs().mean() < 0.05  # the given frames are kept (up to H.264 re-encoding)
    assert not any("fps" in w for w in result.warnings)  # the clip's own rate: nothing to say


def test_frame_rate_warning_only_when_the_rates_differ():
    from pipelines.engine import _frame_rate_warning

    assert _frame_rate_warning(None, 24) == [] and _frame_rate_warning(23.976, 24) == []
    assert "plays slower" in _frame_rate_warning(30.0, 24)[0] and "plays faster" in _frame_rate_warning(8.0, 24)[0]


def test_extend_backward(engine, clip_path):
    result = engine.run(GenerationOptions(mode="extend", prompt="x", references=(clip_path,), num_frames=37,
                                          extend_direction="backward", seed=1, fps=12))
    assert check_output(result, frames=41 + 4, fps=12)["cond_type"] == "v2v_tail"
    assert any("plays at 8 fps" in w and "faster" in w and "set fps to 8" in w for w in result.warnings)


def test_extend_in_segments_continues_from_the_video_so_far(engine, clip_path, monkeypatch):
    monkeypatch.setattr(engine, "partial_videos", True)  # as the studio runs it (the CLI writes none)
    events = []
    result = engine.run(GenerationOptions(mode="extend", prompt="a blue square moving right", segments=3,
                                          references=(clip_path,), num_frames=37, seed=5), on_event=events.append)
    recipe = check_output(result, frames=41 + 3 * (37 - 33))
    assert recipe["output"]["segments"] == 3 and recipe["options"]["segments"] == 3
    done = [e.message for e in events if isinstance(e, StageEvent) and "done" in e.message]
    assert done == ["Segment 1 of 3 done: 45 frames", "Segment 2 of 3 done: 49 frames",
                    "Segment 3 of 3 done: 53 frames"]
    strips = [e.image for i, e in enumerate(events) if isinstance(e, PreviewEvent)
              and isinstance(events[i - 1], StageEvent) and "done" in events[i - 1].message]
    assert len(strips) == 3 and all(s.dtype == np.uint8 and s.shape == (64, 5 * 64, 3) for s in strips)
    partials = [e for e in events if isinstance(e, PartialVideoEvent)]  # playable while the next one samples
    assert [p.segments_done for p in partials] == [1, 2]  # (after the last, the result itself)
    assert [read_video(p.path)[0].shape[1] for p in partials] == [45, 49]
    original, new = read_video(clip_path)[0], read_video(result.video_path)[0]
    assert (original - new[:, :41]).abs().mean() < 0.05  # the user's clip is still kept as it was
    one = engine.run(GenerationOptions(mode="extend", prompt="a blue square moving right", references=(clip_path,),
                                       num_frames=37, seed=5))
    # the first segment is the one-segment extension; later ones continue from it (with their own noise)
    assert (read_video(one.video_path)[0] - new[:, :45]).abs().mean() < 0.02  # (up to H.264 re-encoding)


def test_partial_videos_are_best_effort_and_removed_after_the_run(monkeypatch, caplog):
    import time

    from pipelines import engine as engine_module

    partials = engine_module._PartialVideos()
    frames = torch.zeros(3, 5, 16, 16)
    path = partials.write(frames, 1, 8)
    assert path.is_file() and read_video(path)[0].shape[1] == 5
    monkeypatch.setattr(engine_module, "write_video", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert partials.write(frames, 2, 8) is None and "not written" in caplog.text  # the run goes on
    partials.close(delay_s=0.0)
    for _ in range(50):
        if not path.parent.exists():
            break
        time.sleep(0.05)
    assert not path.parent.exists()


def test_scratch_folders_are_private_and_go_after_their_delay(tmp_path):
    import time

    from pipelines.scratch import remove_later, scratch_folder

    folder = scratch_folder("opensora-test-")
    (folder / "frame.png").write_bytes(b"x")
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"  # mkdtemp: this user's only
    remove_later(folder, delay_s=0.2)
    assert folder.exists()  # not at once: a viewer may still be fetching it
    for _ in range(50):
        if not folder.exists():
            break
        time.sleep(0.05)
    assert not folder.exists()
    remove_later(tmp_path / "never-made", delay_s=0.0)  # a folder already gone is no error


def test_stop_after_this_segment_keeps_the_finished_segments(engine, clip_path):
    done = []

    def on_event(event):
        if isinstance(event, StageEvent) and "done" in event.message:
            done.append(event.message)

    result = engine.run(GenerationOptions(mode="extend", prompt="a blue square moving right", segments=3,
                                          references=(clip_path,), num_frames=37, seed=5), on_event=on_event,
                        finish_segment=lambda: bool(done))
    recipe = check_output(result, frames=41 + (37 - 33))
    assert done == ["Segment 1 of 3 done: 45 frames"] and recipe["output"]["segments"] == 1
    assert recipe["output"]["stopped_early"] and any("stopped after segment 1 of 3" in w for w in result.warnings)


def test_extend_segments_follow_their_own_prompts(engine, clip_path):
    def run(prompt):
        return engine.generate_frames(GenerationOptions(mode="extend", prompt=prompt, segments=2,
                                                        references=(clip_path,), num_frames=37, seed=5)).video

    per_segment = engine.run(GenerationOptions(mode="extend", prompt="|0|a red circle|1|a blue square", segments=2,
                                               references=(clip_path,), num_frames=37, seed=5))
    assert [p["final"] for p in per_segment.recipe["prompt"]["per_segment"]] == [
        "a red circle. 8 FPS. 4 motion score.", "a blue square. 8 FPS. 4 motion score."]
    encodes = []
    engine.generate_frames(GenerationOptions(mode="extend", prompt="|0|a|1|b|2|a", segments=3, num_steps=1,
                                             references=(clip_path,), num_frames=37, seed=5),
                           on_event=lambda e: encodes.append(e) if getattr(e, "stage", "") == "encode_text" else None)
    assert len(encodes) == 2  # each distinct prompt is encoded once
    split, red, blue = run("|0|a red circle|1|a blue square"), run("a red circle"), run("a blue square")
    first, second = slice(0, 45), slice(45, 49)  # the clip and segment 1's frames, then segment 2's
    assert torch.equal(split[:, first], red[:, first]) and not torch.equal(split[:, first], blue[:, first])
    # segment 2 reads the blue prompt (from the same video so far as the all-red run, so only the prompt differs)
    assert not torch.equal(split[:, second], red[:, second])


def test_stop_during_a_later_segment_keeps_the_finished_ones(engine, clip_path):
    progress = []
    result = engine.run(GenerationOptions(mode="extend", prompt="x", segments=4, references=(clip_path,),
                                          num_frames=37, num_steps=4, seed=2),
                        on_event=lambda e: progress.append(e) if isinstance(e, ProgressEvent) else None,
                        should_stop=lambda: len(progress) >= 6)  # stops during the second segment
    check_output(result, frames=41 + 4)
    assert result.recipe["output"]["segments"] == 1
    assert any("stopped during segment 2 of 4" in w for w in result.warnings)
    assert engine.state.stage == "idle"
    with pytest.raises(GenerationStopped):  # a Stop during the first segment leaves nothing to keep
        engine.run(GenerationOptions(mode="extend", prompt="x", segments=2, references=(clip_path,), num_frames=37,
                                     num_steps=4, seed=2), should_stop=lambda: True)


def test_image_first_makes_a_frame_then_animates_it(engine):
    events = []
    options = dict(prompt="a yellow triangle", num_frames=9, seed=4)
    result = engine.run(GenerationOptions(image_first=True, **options), on_event=events.append)
    recipe = check_output(result, frames=9)
    assert recipe["mode"] == "t2v" and recipe["cond_type"] == "i2v_head" and recipe["options"]["image_first"]
    stages = [e.message for e in events if isinstance(e, StageEvent)]
    assert stages.index("Step 1 of 2, the first frame: Sampling 0/3") < stages.index(
        "Step 2 of 2, the video: Sampling 0/3")
    # the same as making the frame (t2v, 1 frame) and then running i2v on it by hand
    frame = engine.generate_frames(GenerationOptions(**{**options, "num_frames": 1})).video
    by_hand = engine.generate_frames(GenerationOptions(mode="i2v", references=(frame_png(frame),), **options)).video
    made = engine.generate_frames(GenerationOptions(image_first=True, **options)).video
    assert (made - by_hand).abs().mean() < 0.01  # up to the PNG's rounding of the frame


def frame_png(video) -> str:
    import tempfile

    from pipelines.media import to_uint8_frames

    path = tempfile.mkdtemp() + "/first.png"
    Image.fromarray(to_uint8_frames(video)[0]).save(path)
    return path


def test_stop_ends_the_run_and_the_engine_stays_usable(engine):
    steps = []
    with pytest.raises(GenerationStopped):
        engine.run(GenerationOptions(prompt="a circle", num_steps=50, seed=1),
                   on_event=lambda e: steps.append(e) if isinstance(e, ProgressEvent) else None,
                   should_stop=lambda: len(steps) >= 1)
    assert len(steps) == 1 and engine.state.stage == "idle"
    check_output(engine.run(GenerationOptions(prompt="a circle", seed=1)), frames=9)


BAD_OPTIONS = [
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x", num_frames=10), "4k\\+1.*try 9 or 13"),
    (dict(prompt="x", num_frames=0), "between 1"),
    (dict(prompt="x", num_frames=-5), "between 1"),
    (dict(prompt="x", num_frames=73), "more than this model's limit"),
    (dict(prompt="x", height=60, width=64), "multiples of 16"),
    (dict(prompt="x", height=128, width=128), "too large"),
    (dict(prompt="x", guidance=float("nan")), "finite"),
    (dict(prompt="x", guidance=float("inf")), "finite"),
    (dict(prompt="x", guidance=-1), "between 0"),
    (dict(prompt="x", num_steps=0), "steps must be between 1"),
    (dict(prompt="x", num_steps=10**6), "steps must be between 1"),
    (dict(prompt="x", mode="dance"), "unknown mode"),
    (dict(prompt="x", mode="i2v"), "exactly one image"),
    (dict(prompt="x", mode="extend"), "one video clip"),
    (dict(prompt="x", mode="loop", references=("a", "b", "c")), "one image .* or two images"),
    (dict(prompt="x", motion_score=9), "motion score"),
    (dict(prompt="x", resolution="768px"), "not offered"),
    (dict(prompt="x", seed=2**40), "seed"),
    (dict(prompt="x", segments=2), "only Extend runs in segments"),
    (dict(prompt="x", mode="extend", references=("c.mp4",), num_frames=37, segments=9),
     "segments must be between 1 and 8"),
    (dict(prompt="|0|a cat|1|a dog"), "per-segment prompts .* are for Extend"),
    (dict(prompt="|0|a cat|2|a dog", mode="extend", references=("c.mp4",), num_frames=37, segments=2),
     r"sets segment 2 .* only 2 segment\(s\) run"),
    (dict(prompt="|1|a cat", mode="extend", references=("c.mp4",), num_frames=37, segments=2), r"start with \|0\|"),
]


@pytest.mark.parametrize("kwargs,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_get_one_clear_message(engine, kwargs, message):
    with pytest.raises(OptionsError, match=message):
        engine.run(GenerationOptions(**kwargs))


def test_bad_references_get_clear_messages(engine, tmp_path, clip_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    short = tmp_path / "short.mp4"
    write_video(np.zeros((10, 64, 64, 3), np.uint8), short, fps=8)
    cases = [(GenerationOptions(mode="i2v", prompt="x", references=(str(empty),)), "empty|0 bytes"),
             (GenerationOptions(mode="i2v", prompt="x", references=(str(not_image),)), "not a readable image"),
             (GenerationOptions(mode="extend", prompt="x", references=(str(short),), num_frames=45), "at least 33"),
             (GenerationOptions(mode="extend", prompt="x", references=(str(not_image),), num_frames=45), "video")]
    for options, message in cases:
        with pytest.raises(MediaError, match=message):
            engine.run(options)


def test_extension_needs_more_frames_than_the_condition(engine, clip_path):
    with pytest.raises(OptionsError, match="at least 37"):
        engine.run(GenerationOptions(mode="extend", prompt="x", references=(clip_path,), num_frames=33))


def test_long_prompt_truncation_is_noted_in_the_recipe(engine):
    result = engine.run(GenerationOptions(prompt="a red circle " * 500, seed=2))
    assert any("tokens" in w for w in json.loads(result.recipe_path.read_text())["warnings"])


def test_param_and_memory_stats(engine):
    stats = {s.name: s for s in engine.param_stats()}
    assert set(stats) == {"mmdit", "vae", "text_encoder"}
    assert stats["mmdit"].total > 0 and stats["mmdit"].trainable == 0
    assert engine.memory_stats().process_rss_bytes > 0


def test_stop_during_image_first_step_two_keeps_the_first_frame(engine):
    stages = []
    result = engine.run(GenerationOptions(image_first=True, prompt="a red circle", num_frames=9, seed=3),
                        on_event=lambda e: stages.append(e.message) if isinstance(e, StageEvent) else None,
                        should_stop=lambda: any(m.startswith("Step 2 of 2") for m in stages))
    info = probe_video(result.video_path)  # (a one-frame file carries no frame rate of its own to probe)
    assert (info.frames, info.width, info.height) == (1, 64, 64)
    assert result.recipe["output"]["frames"] == 1 and result.recipe["output"]["stopped_early"]
    assert any("the first frame was kept" in w for w in result.warnings)
    assert engine.state.stage == "idle"


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_engine_makes_the_same_clip(tmp_path):
    """`compile=True` (app.py / generate.py --compile) compiles the MMDiT in place; the clip matches eager."""
    clips = []
    for compiled in (False, True):
        torch.manual_seed(0)  # the same random tiny weights for both engines
        engine = Engine(tiny_preset(num_steps=2), output_dir=tmp_path / str(compiled), compile=compiled).load()
        result = engine.run(GenerationOptions(prompt="a red circle moving to the right", seed=5, num_frames=5))
        clips.append(read_video(result.video_path)[0].to(torch.int16))
        mmdit = engine.components.mmdit
        assert mmdit.config.patch_size == 2  # still the MMDiT module, config and all
        assert (getattr(mmdit, "_compiled_call_impl", None) is not None) == compiled  # nn.Module.compile's hook
    assert (clips[0] - clips[1]).abs().max() <= 2  # uint8 levels: compiled kernels may round differently


def test_compiling_engine_says_so_once_per_size(tmp_path, monkeypatch):
    """With --compile the first sampling at each size compiles first: the status line says so, then not again."""
    from pipelines.models.mmdit import MMDiT

    monkeypatch.setattr(MMDiT, "compile", lambda self, **kwargs: None)  # the message, not the compiler, is tested
    engine = Engine(tiny_preset(num_steps=1), output_dir=tmp_path, compile=True).load()

    def sample_messages(frames: int) -> list[str]:
        messages = []
        engine.generate_frames(GenerationOptions(prompt="a red circle", seed=1, num_frames=frames),
                               on_event=lambda e: messages.append(e.message)
                               if isinstance(e, StageEvent) and e.stage == "sample" else None)
        return messages

    first, again, longer = sample_messages(5), sample_messages(5), sample_messages(9)
    assert "compiling" in first[0] and "compiling" not in again[0] and "compiling" in longer[0]
    eager = Engine(tiny_preset(num_steps=1), output_dir=tmp_path).load()
    messages = []
    eager.generate_frames(GenerationOptions(prompt="a red circle", seed=1, num_frames=5),
                          on_event=lambda e: messages.append(e.message) if isinstance(e, StageEvent) else None)
    assert not any("compiling" in m for m in messages)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves models between a GPU and the CPU")
def test_offload_with_live_previews_runs_on_a_gpu(tmp_path):
    # The VAE waits on the CPU while the MMDiT samples: the preview projection must be fitted where the VAE is.
    engine = Engine(tiny_preset(), device="cuda", offload=True, output_dir=tmp_path, preview_every=1)
    events = []
    result = engine.run(GenerationOptions(prompt="a red circle", num_steps=3, seed=1), on_event=events.append)
    assert result.video_path.exists() and any(isinstance(e, PreviewEvent) for e in events)


def test_unload_frees_the_models_and_the_next_run_reloads_them_unchanged(tmp_path):
    engine = Engine(tiny_preset(), output_dir=tmp_path, preview_every=0).load()
    options = GenerationOptions(prompt="a red circle", num_steps=3, seed=3)
    before = engine.generate_frames(options).video
    assert engine.param_stats()
    engine.unload()  # the memory panel's Unload button
    assert engine.param_stats() == [] and engine._components is None
    torch.testing.assert_close(engine.generate_frames(options).video, before)  # reloaded on demand, same weights
