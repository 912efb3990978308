"""The studio's logic without a server: the engine pool, job streaming and stop, options, history, LLM settings."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.options import OptionsError
from pipelines.presets import get_preset
from pipelines.prompt_refine import LLMConfig
from studio.controls import (aspect_choices, aspect_for_image, duration_text, frames_from_seconds, llm_status,
                             parse_motion, seconds_range, session_llm)
from studio.handlers import _field_for, build_options, refine, stop_job
from studio.settings import deployment_is_public
from pipelines.results import list_results
from studio.history import settings_from_recipe
from studio.jobs import EnginePool, SessionJob, run_job
from pipelines.units import format_bytes, format_count, format_seconds
from tests.fake_llm import FakeLLMServer


class GenerationStopped(Exception):
    """Same name as pipelines.sampling's, which the studio recognises without importing torch."""


class FakeEngine:
    """Emits a stage, then progress and previews per step; honours should_stop like the real engine."""

    def __init__(self, steps: int = 5, delay_s: float = 0.0, fail: Exception | None = None,
                 need: int = 2**30, available: int = 2**34):
        self.preset, self.device, self.steps, self.delay_s, self.fail = get_preset("opensora-v2-256px"), "cpu", \
            steps, delay_s, fail
        self.need, self.available = need, available
        self.state = SimpleNamespace(stage="idle", last_peak_bytes=None)
        self.unloaded = 0

    def param_stats(self):
        return []

    def memory_stats(self):
        return SimpleNamespace(device_name="Fake CPU", device_type="cpu", allocated_bytes=None, reserved_bytes=None,
                               peak_allocated_bytes=None, total_bytes=None, process_rss_bytes=2**30,
                               system_used_bytes=2**32, system_total_bytes=2**34)

    def check(self, options):
        return options

    def estimate_memory(self, options):
        from pipelines.memory_estimate import MemoryEstimate

        return MemoryEstimate(weights={"mmdit": 1}, stages={"sample": self.need}, device_type="cpu"), self.available

    def run(self, options, on_event, should_stop, llm=None, finish_segment=lambda: False):
        self.llm, self.options = llm, options
        on_event(SimpleNamespace(kind="stage", stage="sample", message="Sampling"))
        for step in range(1, self.steps + 1):
            if should_stop():
                raise GenerationStopped("stopped")
            if step > 1 and finish_segment():  # (each step stands for a segment here)
                break
            if self.fail is not None:
                raise self.fail
            self.current = step
            on_event(SimpleNamespace(kind="progress", step=step, total=self.steps, elapsed_s=step, eta_s=1.0))
            on_event(SimpleNamespace(kind="preview", image=np.full((2, 2, 3), step, np.uint8), step=step))
            time.sleep(self.delay_s)
        return SimpleNamespace(seed=1, video_path="x.mp4", recipe={"seed": 1}, warnings=[])

    def unload(self):
        self.unloaded += 1


def test_pool_lends_each_engine_once_and_unloads_only_idle_ones():
    engines = [FakeEngine(), FakeEngine()]
    pool = EnginePool(engines)
    first = pool.acquire(timeout=0.1)
    assert pool.is_busy(first) and pool.try_acquire() is not None and pool.acquire(timeout=0.05) is None
    pool.release(engines[1] if first is engines[0] else engines[0])
    assert pool.unload_idle() == (1, 1) and first.unloaded == 0
    with pytest.raises(ValueError):
        EnginePool([])


def test_two_engines_run_two_jobs_at_once():
    pool = EnginePool([FakeEngine(steps=30, delay_s=0.01), FakeEngine(steps=30, delay_s=0.01)])
    busy_peak = []

    def consume():
        for _ in run_job(pool, object(), SessionJob()):
            busy_peak.append(sum(pool.is_busy(engine) for engine in pool))

    threads = [threading.Thread(target=consume) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert max(busy_peak) == 2


def test_demo_wiring_named_endpoints_gpu_concurrency_and_a_private_timer(tmp_path):
    import gradio as gr

    from studio import StudioSettings, build_demo

    pool = EnginePool([FakeEngine(), FakeEngine()])
    settings = StudioSettings(output_dir=tmp_path)
    demo = build_demo(pool, settings)
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"t2v", "i2v", "loop", "extend", "stop", "stop_after_segment"} <= set(fns)
    assert not fns["stop_after_segment"].cancels  # the running job goes on to the end of its segment
    for mode in ("t2v", "i2v", "loop", "extend"):
        assert fns[mode].concurrency_id == "gpu" and fns[mode].concurrency_limit == 2
        assert fns[mode].validator is not None
    assert fns["batch"].concurrency_id == "gpu" and fns["batch"].concurrency_limit == 2
    stop_button = fns["stop"].targets[0][0]  # Gradio wires cancels= as a second function on the same click
    cancelled = {i for fn in demo.fns.values() if fn.targets and fn.targets[0][0] == stop_button for i in fn.cancels}
    assert {fns[name]._id for name in ("t2v", "i2v", "loop", "extend", "batch")} <= cancelled  # queued ones too
    timers = [b for b in demo.blocks.values() if isinstance(b, gr.Timer)]
    ticks = [fn for fn in demo.fns.values() if any(target[0] == timers[0]._id for target in fn.targets)]
    assert ticks and all(not fn.queue and fn.api_visibility == "private" for fn in ticks)
    videos = [b for b in demo.blocks.values() if isinstance(b, gr.Video) and b.elem_id == "result-video"]
    assert videos[0].buttons == ["download"] and videos[0].loop
    assert "Fake CPU" in next(b for b in demo.blocks.values() if b.elem_id == "memory-panel").value
    assert settings.served_paths() == [str(tmp_path.resolve()), str(settings.assets_dir.resolve())]
    assert demo._queue.max_size == settings.queue_size


def test_run_job_streams_progress_and_previews_then_the_result():
    updates = list(run_job(EnginePool([FakeEngine(steps=4)]), object(), SessionJob()))
    assert updates[0].stage == "queued" and updates[-1].done and updates[-1].result.seed == 1
    assert max(u.step for u in updates) == 4 and any(u.preview is not None for u in updates)


def test_stop_ends_the_job_within_a_step_and_frees_the_engine():
    engine, job = FakeEngine(steps=500, delay_s=0.01), SessionJob()
    pool, stopper, asked_at = EnginePool([engine]), None, []

    def stop():
        asked_at.append(engine.current)
        job.request_stop()

    for update in run_job(pool, object(), job):
        if update.step >= 1 and stopper is None:
            stopper = threading.Timer(0.0, stop)
            stopper.start()
        last = update
    assert last.stopped and last.error is None and last.step <= asked_at[0] + 1 < 500  # at most the step under way
    assert pool.try_acquire() is not None


def test_the_engine_runs_with_the_sessions_llm_settings():
    engine = FakeEngine(steps=1)
    session = LLMConfig(base_url="http://127.0.0.1:9/v1", model="mine")
    assert list(run_job(EnginePool([engine]), object(), SessionJob(), llm=session))[-1].done
    assert engine.llm is session


def test_stop_after_this_segment_ends_the_run_with_its_result_and_no_cancel():
    from studio.handlers import finish_segment

    pool, job = EnginePool([FakeEngine(steps=500, delay_s=0.01)]), SessionJob()
    assert "Nothing is running" in finish_segment(job)
    run_id = job.start()
    for update in run_job(pool, object(), job, run_id=run_id):
        if update.step >= 2 and not job.should_finish_segment(run_id):
            assert "stops after the segment" in finish_segment(job)
        last = update
    assert last.done and not last.stopped and last.result.seed == 1 and last.step < 500
    assert not job.stop_requested and not job.should_finish_segment(job.start())  # the next run is not affected


def test_stop_then_generate_at_once_still_stops_the_first_run():
    pool = EnginePool([FakeEngine(steps=500, delay_s=0.01), FakeEngine(steps=3)])
    job = SessionJob()
    first_run = job.start()
    first = run_job(pool, object(), job, run_id=first_run)
    for update in first:
        if update.step >= 1:
            break
    job.request_stop()
    second_run = job.start()  # Generate again before the first run has read its flag
    assert second_run != first_run and job.should_stop(first_run) and not job.stop_requested
    outcome = [update for update in first][-1]
    assert outcome.stopped and outcome.step < 500
    job.finish(first_run)  # the first handler's cleanup leaves the newer run marked as running
    assert job.running
    second = list(run_job(pool, object(), job, run_id=second_run))
    assert second[-1].done and not second[-1].stopped and second[-1].result.seed == 1
    job.finish(second_run)
    assert not job.running


def test_closing_the_stream_early_asks_the_job_to_stop():
    engine, job = FakeEngine(steps=500, delay_s=0.01), SessionJob()
    pool = EnginePool([engine])
    stream = run_job(pool, object(), job)
    next(stream)
    stream.close()
    assert job.stop_requested
    deadline = time.monotonic() + 5
    while pool.is_busy(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pool.is_busy(engine)


def test_engine_errors_are_reported_not_raised_in_the_worker():
    updates = list(run_job(EnginePool([FakeEngine(fail=MemoryError("out of GPU memory"))]), object(), SessionJob()))
    assert isinstance(updates[-1].error, MemoryError) and not updates[-1].stopped


def test_stop_job_says_whether_anything_was_running():
    job = SessionJob()
    assert "Nothing is running" in stop_job(job)
    job.start()
    assert "Stopped" in stop_job(job) and job.stop_requested


def test_build_options_uses_the_refined_prompt_only_when_asked():
    values = {"prompt": "a ball", "refined_prompt": "A red ball rolls.", "use_refined": False, "seed": 3,
              "randomize_seed": False, "motion_score": "auto"}
    assert build_options("t2v", values).prompt == "a ball"
    options = build_options("t2v", {**values, "use_refined": True})
    assert options.prompt == "A red ball rolls." and options.seed == 3 and options.motion_score == "dynamic"
    assert build_options("t2v", {**values, "randomize_seed": True}).seed is None


def test_build_options_maps_tab_inputs():
    assert build_options("i2v", {"prompt": "p", "image": "a.png", "image_position": "tail"}).i2v_position == "tail"
    extend = build_options("extend", {"prompt": "p", "video": "c.mp4", "direction": "backward", "easy": True})
    assert extend.references == ("c.mp4",) and extend.extend_direction == "backward" and extend.extend_easy
    assert extend.segments == 1
    assert build_options("extend", {"prompt": "p", "video": "c.mp4", "segments": 3}).segments == 3
    assert build_options("loop", {"prompt": "p", "first_image": "a.png", "last_image": "b.png"}).references == \
        ("a.png", "b.png")
    with pytest.raises(OptionsError, match="first image"):
        build_options("loop", {"prompt": "p", "first_image": None, "last_image": "b.png"})


def test_validation_messages_point_at_the_right_input():
    assert _field_for("segments must be between 1 and 8, got 9", "extend") == "segments"
    assert _field_for("the clip has 9 frames; extending needs at least 33", "extend") == "video"
    assert _field_for("the prompt is empty: describe the video you want", "extend") == "prompt"
    assert _field_for("set the number of frames to at least 37", "extend") == "num_frames"
    assert _field_for("Image to video needs exactly one image: upload one", "i2v") == "image"
    assert _field_for("the prompt is empty", "t2v") == "prompt"
    # per-segment prompt problems mark the prompt (on tabs without a Segments slider too, so nothing is queued)
    assert _field_for("per-segment prompts (|0|...|1|...) are for Extend in segments", "t2v") == "prompt"
    assert _field_for("per-segment markers must increase: |0| comes after |1|", "extend") == "prompt"
    assert _field_for("the prompt sets segment 2 (|2|, counting from 0) but only 1 segment(s) run", "extend") == \
        "segments"
    assert _field_for("segments must be between 1 and 8, got 9", "t2v") == "prompt"


def test_size_and_duration_helpers_show_real_numbers():
    preset = get_preset("opensora-v2-256px")
    labels = dict((value, label) for label, value in aspect_choices(preset, "256px"))
    assert labels["16:9"].endswith("px") and "×" in labels["16:9"]
    assert frames_from_seconds(2.0, 24, 129) == 49 and frames_from_seconds(100, 24, 129) == 129
    # ... and back: typed frames or a new fps move the Duration slider, whose end follows the fps
    assert seconds_range(49, 24, 129) == (2.04, 5.38) and seconds_range(129, 8, 129) == (16.12, 16.12)
    assert seconds_range(None, 24, 129) is None and seconds_range(33, 0, 129) is None
    assert "2.04 s" in duration_text(49, 24) and "4k+1" in duration_text(50, 24)
    assert aspect_for_image(720, 1280, preset) == "16:9" and aspect_for_image(500, 500, preset) == "1:1"
    assert parse_motion("auto") == "auto" and parse_motion("5") == 5 and parse_motion(None) is None


def test_session_llm_overrides_and_never_shows_the_key():
    server = LLMConfig()
    assert not server.is_configured and "off" in llm_status(server)
    config, note = session_llm(server, "http://localhost:9/v1", "", "sk-secret-key-123456789")
    assert note is None and config.is_configured and config.model == server.model
    assert "sk-secret" not in llm_status(config) and "sk-secret" not in repr(config)



def test_the_servers_key_never_goes_to_an_endpoint_a_visitor_typed():
    server = LLMConfig(api_key="sk-operator-key-123456789")  # OpenAI itself
    assert session_llm(server, "", "gpt-x", "")[0].api_key == server.api_key  # the server's endpoint, another model
    elsewhere, _ = session_llm(server, "https://attacker.example/v1", "", "")
    assert elsewhere.base_url == "https://attacker.example/v1" and elsewhere.api_key is None
    assert session_llm(server, "https://attacker.example/v1", "", "sk-own")[0].api_key == "sk-own"
    local = LLMConfig(base_url="http://127.0.0.1:11434/v1/", api_key="sk-operator-key-123456789")
    assert session_llm(local, "http://127.0.0.1:11434/v1", "", "")[0].api_key == local.api_key  # same endpoint


def _resolver(table: dict[str, list[str]]):
    """A getaddrinfo stand-in (no DNS in tests): host -> its addresses; unknown hosts fail as getaddrinfo does."""
    def resolve(host, port, type=0):
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in table[host]]
    return resolve


def test_a_public_studio_calls_only_public_llm_endpoints_a_visitor_typed():
    server = LLMConfig(base_url="http://10.0.0.5:8000/v1", api_key="sk-operator-key-123456789")
    resolve = _resolver({"api.example.com": ["93.184.216.34"], "sneaky.example": ["93.184.216.34", "10.1.2.3"],
                         "localhost": ["127.0.0.1"], "metadata.internal": ["169.254.169.254"],
                         "v6.example": ["2606:4700::1111"], "mapped.example": ["::ffff:127.0.0.1"]})
    not_public = ["http://localhost:11434/v1", "http://169.254.169.254/latest", "http://metadata.internal/",
                  "https://sneaky.example/v1", "http://[::1]:8000/v1", "http://192.168.1.20/v1",
                  "https://mapped.example/v1", "https://nowhere.example/v1", "http://user@localhost/v1"]
    malformed = {"file:///etc/passwd": "http://", "https://api.example.com:notaport/v1": "not a valid URL",
                 "http://[::1": "not a valid URL", "http:///v1": "no host"}
    for url, why in [(url, "public internet address") for url in not_public] + list(malformed.items()):
        config, note = session_llm(server, url, "", "sk-own", public=True, resolve=resolve)
        assert config is server and why in note and "not used" in note, url  # the server's settings stay, said
        assert note in llm_status(config, note) and "LLM ready" in llm_status(config, note)
        # one reason for every refused host: a visitor cannot map the server's network by trying names
        assert not any(address in note.replace(url, "") for address in ("127.0.0.1", "10.1.2.3", "169.254",
                                                                        "::ffff")), note
    for url in ("https://api.example.com/v1", "http://v6.example:8080/v1"):
        config, note = session_llm(server, url, "", "sk-own", public=True, resolve=resolve)
        assert note is None and config.base_url == url and config.api_key == "sk-own"
    # the server's own endpoint (private, set by the operator) is always allowed; so is anything on a local studio
    assert session_llm(server, "http://10.0.0.5:8000/v1/", "", "", public=True, resolve=resolve)[0].api_key
    local, note = session_llm(server, "http://localhost:11434/v1", "", "", public=False, resolve=resolve)
    assert note is None and local.base_url == "http://localhost:11434/v1"


def test_which_deployments_count_as_public():
    assert not deployment_is_public(None, None, environ={})  # gradio's default: loopback, no share link
    assert not deployment_is_public("localhost", False, environ={})
    assert not deployment_is_public("::1", None, environ={})
    assert deployment_is_public("0.0.0.0", None, environ={}) and deployment_is_public(None, True, environ={})
    assert deployment_is_public(None, None, environ={"SPACE_ID": "user/studio"})
    assert deployment_is_public(None, None, environ={"GRADIO_SERVER_NAME": "0.0.0.0"})
    assert deployment_is_public(None, None, environ={"GRADIO_SHARE": "True"})
    assert deployment_is_public("127.0.0.1", None, "/studio", environ={})  # behind a reverse proxy
    assert deployment_is_public(None, None, environ={"GRADIO_ROOT_PATH": "/studio"})
    assert deployment_is_public("127.0.0.1", False, None, forced=True, environ={})  # --public (a tunnel, say)
    assert not deployment_is_public("0.0.0.0", None, environ={"STUDIO_PUBLIC": "0"})  # a container, trusted users
    assert deployment_is_public("0.0.0.0", None, forced=True, environ={"STUDIO_PUBLIC": "0"})


def test_refine_fills_the_separate_box_through_an_openai_compatible_server():
    with FakeLLMServer(answer="A red circle glides right.") as server:
        config = LLMConfig(base_url=server.base_url, api_key="sk-test", timeout_s=5)
        assert refine("a red circle", "t2v", None, None, config, LLMConfig()) == ("A red circle glides right.", True)
        # per-segment prompts: each piece is refined on its own and the markers are kept
        assert refine("|0|a red circle|2|a blue one", "extend", None, None, config, LLMConfig()) == (
            "|0|A red circle glides right.|2|A red circle glides right.", True)



def test_refine_tells_the_llm_whether_the_image_is_the_first_or_the_last_frame(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "ref.png")
    image = str(tmp_path / "ref.png")
    with FakeLLMServer(answer="A red square.") as server:
        config = LLMConfig(base_url=server.base_url, api_key="sk-test", timeout_s=5)
        for mode, position in (("i2v", "head"), ("i2v", "tail"), ("loop", "head")):
            refine("a red square", mode, image if mode == "i2v" else None, image if mode == "loop" else None,
                   config, LLMConfig(), position)
        systems = [request.json["messages"][0]["content"] for request in server.requests]
    assert ["first frame" in text for text in systems] == [True, False, True]
    assert "last frame" in systems[1]
    Image.new("RGB", (32, 32), (40, 90, 220)).save(tmp_path / "last.png")
    with FakeLLMServer(answer="A square turns blue.") as server:  # a two-image loop: both, first frame first
        config = LLMConfig(base_url=server.base_url, api_key="sk-test", timeout_s=5)
        refine("it turns blue", "loop", None, image, config, LLMConfig(), last_image=str(tmp_path / "last.png"))
        (request,) = server.requests
    parts = request.json["messages"][1]["content"]
    assert len([p for p in parts if p["type"] == "image_url"]) == 2
    assert "the second is the last frame" in request.json["messages"][0]["content"]


def test_refining_an_extension_shows_the_llm_the_frame_the_new_footage_joins():
    clip = str(Path(__file__).resolve().parents[1] / "assets" / "examples" / "clip_65.mp4")  # the studio's example
    with FakeLLMServer(answer="The circle keeps going.") as server:
        config = LLMConfig(base_url=server.base_url, api_key="sk-test", timeout_s=5)
        assert refine("it goes on", "extend", None, None, config, LLMConfig(), clip=clip) == (
            "The circle keeps going.", True)
        refine("it goes on", "extend", None, None, config, LLMConfig(), clip=clip, direction="backward")
        refine("|0|it goes on|2|then it stops", "extend", None, None, config, LLMConfig(), clip=clip)
        requests = [request.json["messages"] for request in server.requests]
    with_image = [isinstance(messages[-1]["content"], list) for messages in requests]
    assert with_image == [True, True, True, False]  # a later segment continues generated footage: text only
    assert "first frame" in requests[0][0]["content"] and "last frame" in requests[1][0]["content"]


def test_a_results_last_frame_goes_to_image_to_video(monkeypatch):
    import gradio as gr
    from PIL import Image

    from studio import layout

    removals = []
    monkeypatch.setattr(layout, "remove_later", removals.append)  # (a minute later, in a timer)
    clip = Path(__file__).resolve().parents[1] / "assets" / "examples" / "clip_65.mp4"
    image, tabs, mode = layout.last_frame_to_i2v(str(clip), SessionJob())
    with Image.open(image) as frame:
        assert frame.size == (64, 64) and frame.mode == "RGB"
    assert isinstance(tabs, gr.Tabs) and mode == "i2v" and removals == [Path(image).parent]  # a scratch file
    shutil.rmtree(Path(image).parent)
    job = SessionJob()
    job.record("/out/t2v_1.png")  # a single-frame result (the player shows none): the frame itself
    assert layout.last_frame_to_i2v(None, job)[0] == "/out/t2v_1.png"
    job.record("/out/t2v_2.mp4")  # the latest result is a video, not shown (e.g. stopped since): no frame
    warned = []
    monkeypatch.setattr(layout.gr, "Warning", warned.append)
    assert layout.last_frame_to_i2v(None, job) == (gr.skip(),) * 3 and warned  # said, nothing changes
    with pytest.raises(gr.Error, match="cannot take a frame"):
        layout.last_frame_to_i2v(str(Path(__file__)), job)  # not a video
    assert len(removals) == 2 and not any(removals[-1].iterdir())  # nothing half-written is handed on
    shutil.rmtree(removals[-1])


def test_history_lists_complete_results_newest_first_and_reloads_their_settings(tmp_path):
    recipe = {"mode": "i2v", "seed": 7, "prompt": {"original": "a ball", "negative": "blur", "refined": None},
              "options": {"resolution": "256px", "aspect_ratio": "1:1", "num_frames": 33, "fps": 24,
                          "motion_score": 3, "num_steps": 20, "guidance": 5.0, "guidance_img": 2.0}}
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.json").write_text(json.dumps(recipe))
        (tmp_path / f"{stem}.mp4").write_bytes(b"")
        time.sleep(0.01)
    (tmp_path / "orphan.json").write_text("{}")
    (tmp_path / ".c.partial.json").write_text("{}")
    items = list_results(tmp_path)
    assert [item.media.name for item in items] == ["b.mp4", "a.mp4"]
    values = settings_from_recipe(recipe)
    assert values["mode"] == "i2v" and values["seed"] == 7 and values["randomize_seed"] is False
    segmented = {**recipe, "prompt": {"original": "|0|a|1|b", "refined": "A.", "per_segment": [{}, {}]}}
    assert settings_from_recipe(segmented)["prompt"] == "|0|a|1|b" and settings_from_recipe(
        segmented)["refined_prompt"] == ""
    assert values["motion_score"] == "3" and values["negative_prompt"] == "blur" and values["num_frames"] == 33
    assert values["refined_prompt"] == "" and values["use_refined"] is False  # a stale refined prompt is cleared
    extended = {**recipe, "mode": "extend", "options": {**recipe["options"], "extend_direction": "backward",
                                                         "extend_easy": True, "segments": 3, "i2v_position": "tail"}}
    values = settings_from_recipe(extended)
    assert (values["direction"], values["easy"], values["segments"], values["image_position"]) == ("backward", True,
                                                                                                   3, "tail")
    # media come back from the reference copies beside the result: only files there, by name, in tab order
    (tmp_path / "l.ref0.png").write_bytes(b"")
    looped = {**recipe, "mode": "loop", "references_saved": ["../../etc/l.ref0.png", "l.ref1.png"]}
    values = settings_from_recipe(looped, tmp_path)
    assert values["first_image"] == str(tmp_path / "l.ref0.png")
    assert values["last_image"] is None  # missing: cleared, so a stale last image cannot turn it into two images
    assert "first_image" not in settings_from_recipe(looped)  # no folder given: settings only


def test_load_these_settings_fills_every_wired_output_and_the_mode(tmp_path):
    import gradio as gr

    from studio import StudioSettings, build_demo

    demo = build_demo(EnginePool([FakeEngine()]), StudioSettings(output_dir=tmp_path))
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "load-settings")
    fn = next(f for f in demo.fns.values() if any(target[0] == button._id for target in f.targets))
    recipe = {"mode": "extend", "seed": 5, "prompt": {"original": "a ball", "negative": "", "refined": None},
              "options": {"num_frames": 69, "fps": 24, "extend_direction": "backward", "extend_easy": False,
                          "segments": 2}}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    values = fn.fn(str(tmp_path / "r.json"))
    assert len(values) == len(fn.outputs)
    by_id = {block._id: value for block, value in zip(fn.outputs, values)}
    labelled = {getattr(block, "label", None): by_id[block._id] for block in fn.outputs}
    assert labelled["Segments"] == 2 and "extend" in by_id.values()  # the tab's slider, and the session's mode
    assert not isinstance(labelled["Clip to extend"], str)  # no copy of the clip was saved: the input stays
    (tmp_path / "r.ref0.mp4").write_bytes(b"clip")  # a result saved with a copy of its clip gets it back
    (tmp_path / "r.json").write_text(json.dumps({**recipe, "references_saved": ["r.ref0.mp4"]}))
    reloaded = dict(zip((getattr(block, "label", None) for block in fn.outputs), fn.fn(str(tmp_path / "r.json"))))
    assert reloaded["Clip to extend"] == str(tmp_path / "r.ref0.mp4")
    assert any(isinstance(value, gr.Tabs) for value in values)
    assert len(fn.fn(None)) == len(fn.outputs)  # nothing selected: a warning, and nothing changes


def test_a_public_studio_shows_each_visitor_only_their_own_results_and_no_unload(tmp_path):
    from studio import StudioSettings, build_demo

    for stem in ("mine", "theirs", "older"):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"mode": "t2v", "seed": 1}))
        (tmp_path / f"{stem}.png").write_bytes(b"")  # single-frame results: the gallery shows them as they are
    assert [r.media.name for r in list_results(tmp_path, stems={"mine", "gone"})] == ["mine.png"]
    job = SessionJob()
    job.record(str(tmp_path / "mine.png"))
    for public, shown in ((True, ["mine.png"]), (False, ["mine.png", "older.png", "theirs.png"])):
        demo = build_demo(EnginePool([FakeEngine()]), StudioSettings(output_dir=tmp_path, public=public))
        gallery = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "history")
        unload = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "unload")
        refresh = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", None) == "refresh"
                       and gallery._id in [block._id for block in f.outputs])
        _, paths = refresh.fn(job)
        assert sorted(Path(media).name for _, media in paths) == shown
        job_state = refresh.inputs[0]  # every refresh (load, Refresh, after Generate) reads the session's job
        assert all([block._id for block in f.inputs] == [job_state._id] for f in demo.fns.values()
                   if getattr(f.fn, "__name__", None) == "refresh")
        assert any(unload._id == t[0] for f in demo.fns.values() for t in f.targets) is not public
        titles = [b.label for b in demo.blocks.values() if type(b).__name__ == "Accordion"]
        assert ("History: your results in this session" in titles) is public
        # a batch queues many runs on one GPU: a local studio's tool, not offered to a public deployment's visitors
        assert any(f.api_name == "batch" for f in demo.fns.values()) is not public


def test_units_read_well():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(None) == "n/a"
    assert format_count(11_890_000_000) == "11.89B" and format_count(512) == "512"
    assert format_seconds(65) == "1 min 05 s" and format_seconds(None) == "?"


def test_memory_verdict_uses_the_tightest_device_and_a_run_that_will_not_fit_warns_but_runs(monkeypatch, tmp_path):
    from studio import handlers
    from studio.handlers import generate, input_names, make_precheck

    roomy, tight = FakeEngine(available=2**34), FakeEngine(available=2**31)
    fits, line = EnginePool([roomy, tight]).memory_verdict(object())
    assert fits and "2.00 GiB available" in line
    values = {"prompt": "a red circle", "resolution": "256px", "aspect_ratio": "1:1", "num_frames": 33}
    args = [values.get(name) for name in input_names("t2v")]
    assert "⚠" not in make_precheck(EnginePool([FakeEngine()]), "t2v")(*args)
    too_big = EnginePool([FakeEngine(need=2**35)])
    assert "run out of memory" in make_precheck(too_big, "t2v")(*args)  # shown while the request waits
    warned = []  # the queued handler raises the toast (a queue=False event cannot show one)
    monkeypatch.setattr(handlers.gr, "Warning", lambda message: warned.append(message))
    monkeypatch.setattr(handlers, "_finish", lambda update, started, first=None: iter([("done",)]))
    outputs = list(generate(too_big, "t2v", values, SessionJob(), LLMConfig()))
    assert warned and "fewer frames" in warned[0]
    statuses = [out[3] for out in outputs[:-1]]
    assert all("run out of memory" in status for status in statuses)
    assert outputs[-1] == ("done",)  # the run went ahead


def test_a_sessions_finished_results_are_what_its_history_can_list():
    import gradio as gr

    from studio.handlers import generate

    values = {"prompt": "a red circle", "resolution": "256px", "aspect_ratio": "1:1", "num_frames": 33}
    job = SessionJob()
    outputs = list(generate(EnginePool([FakeEngine(steps=2)]), "t2v", values, job, LLMConfig()))
    assert outputs[-1][0] == "x.mp4" and job.made == ["x"]
    with pytest.raises(gr.Error, match="boom"):
        list(generate(EnginePool([FakeEngine(fail=RuntimeError("boom"))]), "t2v", values, job, LLMConfig()))
    assert job.made == ["x"]  # a failed run saved nothing
    # The worker records the result itself, so a run whose handler was cancelled (Stop) still counts
    job = SessionJob()
    run_id = job.start()
    updates = list(run_job(EnginePool([FakeEngine(steps=3)]), object(), job, run_id=run_id))
    assert updates[-1].done and job.made == ["x"]
    job.record(None)
    job.record(Path("elsewhere") / "x.mp4")  # ZeroGPU: the shown result is recorded again; once is kept
    assert job.made == ["x"]


def test_a_random_seed_is_drawn_before_the_run_and_shown_even_when_it_is_stopped():
    from studio.handlers import generate

    values = {"prompt": "a red circle", "randomize_seed": True, "seed": 5}
    engine = FakeEngine(steps=50, delay_s=0.02)
    job = SessionJob()
    outputs = generate(EnginePool([engine]), "t2v", values, job, LLMConfig())
    first = next(outputs)  # the first update, before any step: the seed box already holds this run's seed
    assert isinstance(first[2], int) and first[2] != 5
    while getattr(engine, "options", None) is None:  # the run has started
        next(outputs)
    job.request_stop()
    rest = list(outputs)
    assert engine.options.seed == first[2]  # the engine ran with the seed that was shown
    assert "Stopped" in rest[-1][3]


def test_an_extensions_video_so_far_plays_in_the_result_player(monkeypatch):
    from studio import handlers

    class Segmented(FakeEngine):
        def run(self, options, on_event, should_stop, llm=None, finish_segment=lambda: False):
            on_event(SimpleNamespace(kind="partial", path=Path("/tmp/segments-1-to-1.mp4"), segments_done=1))
            return super().run(options, on_event, should_stop, llm, finish_segment)

    values = {"prompt": "a red circle", "resolution": "256px", "aspect_ratio": "1:1", "num_frames": 33}
    outputs = list(handlers.generate(EnginePool([Segmented(steps=2)]), "t2v", values, SessionJob(), LLMConfig()))
    shown = [out[0] for out in outputs if isinstance(out[0], str)]
    assert shown == ["/tmp/segments-1-to-1.mp4", "x.mp4"]  # the video so far, then the result
    # a later segment fails: the unsaved video so far is taken out of the player before the error is shown
    import gradio as gr

    failing = handlers.generate(EnginePool([Segmented(steps=2, fail=RuntimeError("boom"))]), "t2v", values,
                                SessionJob(), LLMConfig())
    seen = []
    with pytest.raises(gr.Error, match="boom"):
        for out in failing:
            seen.append(out[0])
    assert "/tmp/segments-1-to-1.mp4" in seen and seen[-1] is None


def test_parameter_sets_are_saved_by_name_and_loaded_back():
    from studio.controls import PARAMETER_SET_FIELDS, delete_parameter_set, load_parameter_set, save_parameter_set

    values = ["blurry", "256px", "16:9", 65, 12, "5", 40, 6.5, 2.0, 42, False]
    assert len(values) == len(PARAMETER_SET_FIELDS)
    saved, message = save_parameter_set(None, "  slow pans ", values)
    assert list(saved) == ["slow pans"] and "slow pans" in message
    loaded = load_parameter_set(saved, "slow pans")
    assert loaded["num_frames"] == 65 and loaded["motion_score"] == "5" and loaded["randomize_seed"] is False
    assert "prompt" not in loaded  # a set is reused across prompts
    tampered = {"x": {"num_steps": 10, "api_key": "sk-1", "prompt": "y"}}  # localStorage can hold anything
    assert load_parameter_set(tampered, "x") == {"num_steps": 10}
    for bad_name in ("", "   ", "n" * 61):
        with pytest.raises(OptionsError):
            save_parameter_set(saved, bad_name, values)
    full = {f"set {i}": {} for i in range(30)}
    with pytest.raises(OptionsError, match="delete one"):
        save_parameter_set(full, "one more", values)
    assert "set 0" in save_parameter_set(full, "set 0", values)[0]  # overwriting an existing name is fine
    with pytest.raises(OptionsError, match="choose"):
        load_parameter_set(saved, "gone")
    both, _ = save_parameter_set(saved, "fast", values)
    assert list(delete_parameter_set(both, " slow pans ")) == ["fast"] and list(both) == ["slow pans", "fast"]
    assert delete_parameter_set(None, "fast") == {}  # nothing saved in this browser yet
    with pytest.raises(OptionsError, match="choose a saved set to delete"):
        delete_parameter_set(both, "  ")


def test_gradio_finds_the_progress_tracker_of_every_generate_handler():
    from gradio.helpers import special_args

    from studio.handlers import input_names, make_generate

    for mode in ("t2v", "i2v", "loop", "extend"):
        handler = make_generate(EnginePool([FakeEngine()]), mode, LLMConfig())
        inputs = [None] * len(input_names(mode))
        assert special_args(handler, inputs=inputs, request=None)[1] == len(input_names(mode))  # the bar moves


def test_browser_remembers_the_llm_endpoint_and_model_but_never_the_key():
    from studio.controls import remember_llm, restore_llm

    saved = remember_llm(" http://localhost:11434/v1 ", "llava")
    assert saved == {"base_url": "http://localhost:11434/v1", "model": "llava"}
    assert "api_key" not in saved and restore_llm(saved) == ("http://localhost:11434/v1", "llava")
    # nothing saved, a cleared field, or a corrupted entry leave the server's settings in place
    assert restore_llm(None) == restore_llm({}) == restore_llm("garbage") == (None, None)
    assert restore_llm({"base_url": "", "model": 3}) == (None, None)


def test_demo_keeps_llm_settings_and_parameter_sets_in_browser_state_under_stable_keys(tmp_path):
    import gradio as gr

    from studio import StudioSettings, build_demo
    from studio.controls import LLM_STORAGE_KEY, SETTINGS_STORAGE_KEY

    from studio.settings import load_browser_secret

    secret = load_browser_secret(tmp_path, environ={})
    assert load_browser_secret(tmp_path, environ={}) == secret  # the same key after a restart ...
    assert (tmp_path / ".browser-state-key").stat().st_mode & 0o777 == 0o600  # ... readable by the owner only
    assert load_browser_secret(tmp_path, environ={"STUDIO_BROWSER_SECRET": "k"}) == "k"
    for _ in range(2):  # two starts of the studio: the browser's stores stay readable
        demo = build_demo(EnginePool([FakeEngine()]), StudioSettings(output_dir=tmp_path, browser_secret=secret))
        stores = [b for b in demo.blocks.values() if isinstance(b, gr.BrowserState)]
        assert sorted(store.storage_key for store in stores) == sorted([LLM_STORAGE_KEY, SETTINGS_STORAGE_KEY])
        assert {store.secret for store in stores} == {secret}


def test_video_to_gif_writes_a_looping_gif_beside_the_video_once(tmp_path):
    from PIL import Image

    from pipelines.media import write_video
    from studio import export

    frames = np.zeros((9, 32, 48, 3), np.uint8)
    for t in range(9):
        frames[t, 8:24, 4 * t:4 * t + 16] = (220, 40, 40)
    video = write_video(frames, tmp_path / "clip.mp4", fps=12)
    gif = export.video_to_gif(video)
    assert gif == tmp_path / "clip.gif" and not list(tmp_path.glob(".*"))
    with Image.open(gif) as image:
        assert image.n_frames == 9 and image.size == (48, 32) and image.info["loop"] == 0
        assert abs(image.info["duration"] - 1000 / 12) <= 10  # GIF delays are in 10 ms units
        image.seek(4)
        red = np.asarray(image.convert("RGB"))[16, 24]
        assert red[0] > 150 and red[1] < 100  # the object is where the video has it
    stamp = gif.stat().st_mtime_ns
    assert export.video_to_gif(video) == gif and gif.stat().st_mtime_ns == stamp  # asked again: the same file


def test_video_to_gif_refuses_what_it_cannot_export_clearly(tmp_path, monkeypatch):
    from pipelines.media import write_video
    from studio import export

    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(OptionsError, match="cannot read the video broken.mp4"):
        export.video_to_gif(tmp_path / "broken.mp4")
    monkeypatch.setattr(export, "MAX_GIF_FRAMES", 4)
    video = write_video(np.zeros((9, 32, 32, 3), np.uint8), tmp_path / "long.mp4", fps=8)
    with pytest.raises(OptionsError, match="more than 4 frames"):
        export.video_to_gif(video)
    assert not (tmp_path / "long.gif").exists()
    monkeypatch.setattr(export, "MAX_GIF_FRAMES", 257)
    monkeypatch.setattr(export, "MAX_GIF_WIDTH", 16)
    wide = write_video(np.zeros((5, 32, 64, 3), np.uint8), tmp_path / "wide.mp4", fps=8)
    from PIL import Image

    with Image.open(export.video_to_gif(wide)) as image:
        assert image.size == (16, 8)


def test_shipped_examples_point_at_real_files_and_valid_segment_prompts():
    from pathlib import Path

    from pipelines.text import segment_prompts
    from studio.tabs import load_examples

    examples = load_examples(Path(__file__).resolve().parents[1] / "assets" / "examples")
    assert set(examples) == {"t2v", "i2v", "loop", "extend"}
    for rows in examples.values():
        for row in rows:
            assert row["prompt"].strip()
            assert all(Path(row[key]).is_file() for key in ("image", "last_image", "video") if row.get(key))
    per_segment = [row for row in examples["extend"] if row["segments"] > 1]
    assert per_segment, "an Extend example shows per-segment prompts"
    for row in per_segment:
        prompts = segment_prompts(row["prompt"], row["segments"])
        assert len(set(prompts)) == row["segments"]  # each segment has its own prompt


class PickyEngine(FakeEngine):
    """Refuses prompts that say "refuse" at check time, and fails the run of one that says "boom"."""

    def check(self, options):
        if "refuse" in options.prompt:
            raise OptionsError("the prompt is refused")
        return options

    def run(self, options, on_event, should_stop, llm=None, finish_segment=lambda: False):
        if "boom" in options.prompt:
            raise ValueError("this one failed")
        super().run(options, on_event, should_stop, llm, finish_segment)
        return SimpleNamespace(seed=options.seed, video_path=f"{options.prompt}.mp4", recipe={"seed": options.seed},
                               warnings=[])


def test_batch_prompts_are_the_non_blank_lines_up_to_a_limit():
    from studio.handlers import MAX_BATCH, batch_prompts

    assert batch_prompts("  a red circle \n\n\ta blue square\n") == ["a red circle", "a blue square"]
    with pytest.raises(OptionsError, match="empty"):
        batch_prompts(" \n  ")
    with pytest.raises(OptionsError, match=f"at most {MAX_BATCH}"):
        batch_prompts("\n".join(["x"] * (MAX_BATCH + 1)))


def test_batch_requests_check_every_line_first_and_number_the_seeds():
    from studio.handlers import batch_requests

    pool = EnginePool([PickyEngine()])
    fixed = batch_requests(pool, "t2v", {"seed": 7, "refined_prompt": "ignored", "use_refined": True}, "a\nb\nc")
    assert [(o.prompt, o.seed) for o in fixed] == [("a", 7), ("b", 8), ("c", 9)]  # the refined box is not used
    drawn = batch_requests(pool, "t2v", {"seed": 7, "randomize_seed": True}, "a\nb")
    assert all(isinstance(o.seed, int) and 0 <= o.seed for o in drawn) and drawn[0].seed != drawn[1].seed
    with pytest.raises(OptionsError, match="batch line 2: the prompt is refused"):
        batch_requests(pool, "t2v", {"seed": 1}, "fine\nrefuse me\nfine")


def test_a_batch_runs_line_after_line_marks_a_failure_and_goes_on():
    from studio.handlers import generate_batch

    engine, job = PickyEngine(steps=2), SessionJob()
    outputs = list(generate_batch(EnginePool([engine]), "t2v", {"seed": 3}, "one\nboom\nthree", job, LLMConfig()))
    table, video, recipe, seed, status, _ = outputs[-1]
    assert [row[2] for row in table] == ["done", "failed: this one failed", "done"]
    assert [row[3] for row in table] == [3, 4, 5] and [row[4] for row in table] == ["one.mp4", "", "three.mp4"]
    assert video == "three.mp4" and recipe == {"seed": 5} and seed == 5  # the last finished line's, for API callers
    assert "Batch finished" in status and "2 done, 1 failed" in status and not job.running


def test_stop_ends_the_running_line_of_a_batch_and_cancels_the_rest():
    from studio.handlers import generate_batch

    engine, job = PickyEngine(steps=50, delay_s=0.02), SessionJob()
    outputs = generate_batch(EnginePool([engine]), "t2v", {"seed": 3}, "one\ntwo\nthree", job, LLMConfig())
    while getattr(engine, "options", None) is None:  # the first line has started
        next(outputs)
    job.request_stop()
    table, *_, status, _ = list(outputs)[-1]
    assert [row[2] for row in table] == ["stopped", "cancelled", "cancelled"]
    assert engine.options.prompt == "one" and "1 stopped, 2 cancelled" in status


def test_zerogpu_asks_for_the_time_a_request_needs():
    from dataclasses import replace

    from pipelines.options import GenerationOptions, resolve_options
    from pipelines.presets import get_preset
    from studio.gpu_time import EMBEDDED_S, FALLBACK_S, duration_for, gpu_seconds
    from studio.handlers import build_options, make_generate

    official = get_preset("opensora-v2-256px")
    resolved = resolve_options(GenerationOptions(prompt="x", num_frames=129, num_steps=50, aspect_ratio="1:1"),
                               official)
    assert (resolved.height, resolved.width, resolved.segments) == (256, 256, 1)

    def priced(**changes) -> int:
        return gpu_seconds(official, replace(resolved, **changes))

    t2v, i2v = priced(), priced(cond_type="i2v_head")
    assert 85 <= t2v <= 100  # 50 steps at the measured 0.78 s, set-up and decode, a 30% margin
    assert 110 <= i2v <= 125 and priced(image_first=True) == i2v  # the reference's extra branch
    assert priced(cond_type="v2v_head", segments=3) > 2.5 * i2v - 100  # each segment samples again
    assert 1200 <= priced(height=768, width=768) <= 1350  # ~21 minutes: attention's quadratic share
    assert gpu_seconds(get_preset("shapes-default"), resolved) == EMBEDDED_S

    class Pool:  # checks like the engine: a bad request cannot be priced and gets the default
        preset = official

        def check(self, options: GenerationOptions):
            if options.num_frames == 10:
                raise OptionsError("frames must be 4k+1")
            return replace(resolved, num_frames=options.num_frames or 129, num_steps=options.num_steps or 50)

    handler = make_generate(Pool(), "t2v", LLMConfig())
    duration = duration_for(Pool(), "t2v", handler, build_options)
    assert duration(False, "a red circle", num_frames=129, num_steps=50) == t2v  # the handler's own arguments
    assert duration(False, "a red circle", num_frames=129, num_steps=10) < t2v
    assert duration(False, "a red circle", num_frames=10) == FALLBACK_S


def test_on_zerogpu_each_tab_handler_is_wrapped_with_its_own_duration(tmp_path):
    from studio import StudioSettings, build_demo

    wrapped = []

    def fake_gpu(duration):  # spaces.GPU(duration=callable)(handler)
        def wrap(handler):
            wrapped.append((handler.__name__, duration))
            return handler
        return wrap

    build_demo(EnginePool([FakeEngine()]), StudioSettings(output_dir=tmp_path, gpu_decorator=fake_gpu, public=True))
    assert [name for name, _ in wrapped] == ["t2v", "i2v", "loop", "extend"]
    assert all(isinstance(duration(), int) for _, duration in wrapped)  # (no arguments: the fallback)
