"""The studio launched in-process with the tiny preset, driven through gradio_client like an API user would."""

from __future__ import annotations

import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from gradio_client import handle_file
from gradio_client.exceptions import AppError, ValidationError

from tests.studio_server import EXAMPLES, FAST, slow_sampling, studio_with_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with studio_with_client(tmp_path_factory.mktemp("outputs")) as server:
        yield server


def decode(path) -> tuple[int, float, tuple[int, int]]:
    """(frames, fps, (height, width)) of an mp4, by decoding every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return len(frames), float(stream.average_rate), frames[0].shape[:2]


def test_t2v_endpoint_returns_a_decodable_mp4_and_its_recipe(studio):
    video, recipe, seed, status, _ = studio.client.predict(prompt="a red circle moving right", seed=5, **FAST,
                                                           api_name="/t2v")
    assert decode(video) == (9, 8.0, (64, 64))
    assert seed == 5 and recipe["seed"] == 5 and recipe["mode"] == "t2v"
    assert recipe["options"]["num_steps"] == 2 and recipe["output"]["frames"] == 9
    assert "Done" in status


def test_motion_score_may_be_sent_as_a_number_and_a_bad_one_is_refused_clearly(studio):
    _, recipe, *_ = studio.client.predict(prompt="a red circle", motion_score=6, seed=2, **FAST, api_name="/t2v")
    assert recipe["options"]["motion_score"] == 6 and recipe["prompt"]["final"].endswith("6 motion score.")
    with pytest.raises((ValidationError, AppError), match="motion score"):
        studio.client.predict(prompt="a red circle", motion_score=12, seed=2, **FAST, api_name="/t2v")


def test_random_seed_is_written_back(studio):
    _, recipe, seed, _, _ = studio.client.predict(prompt="a blue square", **{**FAST, "randomize_seed": True},
                                                  api_name="/t2v")
    assert isinstance(seed, int) and seed == recipe["seed"]


def test_i2v_endpoint_uses_the_image_as_last_frame(studio):
    video, recipe, _, _, _ = studio.client.predict(
        image=handle_file(str(EXAMPLES / "i2v_0.png")), image_position="tail", prompt="a green ball", seed=1,
        **FAST, api_name="/i2v")
    assert decode(video)[0] == 9
    assert recipe["cond_type"] == "i2v_tail"


def test_loop_endpoint_with_two_images(studio):
    video, recipe, _, _, _ = studio.client.predict(
        first_image=handle_file(str(EXAMPLES / "loop_first.png")),
        last_image=handle_file(str(EXAMPLES / "loop_last.png")), prompt="a red block", seed=2, **FAST,
        api_name="/loop")
    assert decode(video)[:2] == (9, 8.0)
    assert recipe["cond_type"] == "i2v_loop" and len(recipe["options"]["references"]) == 2


def test_extend_endpoint_keeps_the_clip_and_adds_frames(studio):
    video, recipe, _, _, _ = studio.client.predict(
        video=handle_file(str(EXAMPLES / "clip_65.mp4")), direction="forward", easy=False, prompt="a blue disc",
        num_frames=37, seed=3, **FAST, api_name="/extend")
    frames, fps, size = decode(video)
    assert frames == 65 + (37 - 33) and size == (64, 64)
    assert recipe["cond_type"] == "v2v_head"
    video, recipe, _, _, _ = studio.client.predict(
        video=handle_file(str(EXAMPLES / "clip_65.mp4")), direction="backward", easy=False, segments=2,
        prompt="a blue disc", num_frames=37, seed=3, **FAST, api_name="/extend")
    assert decode(video)[0] == 65 + 2 * (37 - 33) and recipe["output"]["segments"] == 2


def test_t2v_image_first_makes_a_frame_then_animates_it(studio):
    video, recipe, _, _, _ = studio.client.predict(image_first=True, prompt="a yellow triangle", seed=4, **FAST,
                                                   api_name="/t2v")
    assert decode(video)[0] == 9
    assert recipe["cond_type"] == "i2v_head" and recipe["mode"] == "t2v" and recipe["options"]["image_first"]


def test_stop_ends_a_running_job_early_and_the_next_job_succeeds(studio):
    client = studio.client
    with slow_sampling(studio.pool):  # 200 steps take at least 10 s: the stop cannot lose the race
        job = client.submit(prompt="a long job", **{**FAST, "num_steps": 200}, api_name="/t2v")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("step " in str(out[3]) for out in job.outputs()):
            time.sleep(0.1)
        assert any("step " in str(out[3]) for out in job.outputs()), "the job never reported a sampling step"
        started = time.monotonic()
        client.predict(api_name="/stop")
        *_, status, _ = job.result(timeout=60)
    assert "Stopped" in status
    assert time.monotonic() - started < 30
    video, recipe, _, _, _ = client.predict(prompt="after the stop", seed=9, **FAST, api_name="/t2v")
    assert decode(video)[0] == 9 and recipe["seed"] == 9


# /batch takes every tab's inputs, and its lines are the prompts (no prompt or refined prompt of its own)
BATCH = dict(image=None, first_image=None, last_image=None, video=None, negative_prompt="", num_steps=2,
             randomize_seed=False)


def test_batch_endpoint_runs_each_line_with_the_next_seed_and_refuses_a_bad_line_first(studio):
    table, video, recipe, seed, status, _ = studio.client.predict(
        mode="t2v", batch="a red circle\n\na blue square", seed=11, **BATCH, api_name="/batch")
    rows = table["data"]
    assert [row[1:4] for row in rows] == [["a red circle", "done", 11], ["a blue square", "done", 12]]
    assert all((studio.out / row[4]).with_suffix(".json").is_file() for row in rows)  # saved with their recipes
    assert recipe["seed"] == 12 == seed and decode(video)[0] == 9 and "2 done" in status
    with pytest.raises((ValidationError, AppError), match="batch line 1: .*4k\\+1"):
        studio.client.predict(mode="t2v", batch="fine\nalso fine", num_frames=10, **BATCH, api_name="/batch")


def _error_text(excinfo) -> str:
    return str(excinfo.value)


def test_too_short_clip_on_extend_is_refused_before_queueing(studio, tmp_path):
    short = tmp_path / "short.mp4"
    with av.open(str(short), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(9):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    before = set(studio.out.iterdir())
    with pytest.raises((ValidationError, AppError)) as excinfo:
        studio.client.predict(video=handle_file(str(short)), direction="forward", easy=False, prompt="more",
                              num_frames=37, **FAST, api_name="/extend")
    assert "9 frames" in _error_text(excinfo) and "33" in _error_text(excinfo)
    assert set(studio.out.iterdir()) == before


def test_missing_image_on_i2v_is_a_clear_error(studio):
    with pytest.raises((ValidationError, AppError)) as excinfo:
        studio.client.predict(image=None, image_position="head", prompt="no image", **FAST, api_name="/i2v")
    assert "needs exactly one image" in _error_text(excinfo)
    assert "Traceback" not in _error_text(excinfo)


def test_an_engine_error_comes_back_as_its_message_and_the_studio_stays_usable(studio, tmp_path):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (128, 64)).save(wide)
    with pytest.raises(AppError) as excinfo:
        studio.client.predict(first_image=handle_file(str(wide)),
                              last_image=handle_file(str(EXAMPLES / "loop_last.png")), prompt="two sizes", **FAST,
                              api_name="/loop")
    assert "different sizes" in _error_text(excinfo) and "Traceback" not in _error_text(excinfo)
    video, *_ = studio.client.predict(prompt="still fine", seed=11, **FAST, api_name="/t2v")
    assert decode(video)[0] == 9


def test_bad_frame_count_is_refused_with_a_suggestion(studio):
    with pytest.raises((ValidationError, AppError)) as excinfo:
        studio.client.predict(prompt="ten frames", num_frames=10, **FAST, api_name="/t2v")
    assert "4k+1" in _error_text(excinfo) and "9 or 13" in _error_text(excinfo)


def test_file_route_serves_only_outputs_and_assets(studio):
    served = studio.out / "probe.png"
    served.write_bytes((EXAMPLES / "i2v_0.png").read_bytes())
    repo = Path(__file__).resolve().parents[1]
    for path, allowed in ((served, True), (EXAMPLES / "i2v_0.png", True), (Path("/etc/passwd"), False),
                          (repo / "app.py", False), (repo / "pipelines" / "engine.py", False)):
        response = httpx.get(f"{studio.url}gradio_api/file={path}", timeout=30)
        assert (response.status_code == 200) == allowed, (path, response.status_code)


def test_memory_panel_and_parameters_show_numbers(studio):
    from studio.panels import memory_markdown, param_rows

    text = memory_markdown(studio.pool)
    assert "Process RSS" in text and any(ch.isdigit() for ch in text)
    names = [row[0] for row in param_rows(studio.pool)]
    assert names == ["mmdit", "vae", "text_encoder"]
