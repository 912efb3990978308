"""Hold up under load and bad input, through the API a `gradio_client` user has (tiny preset, loopback only)."""

from __future__ import annotations

import gc
import time
import tracemalloc
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

from pipelines.media import write_video
from tests.studio_server import EXAMPLES, FAST, slow_sampling, studio_with_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with studio_with_client(tmp_path_factory.mktemp("outputs")) as server:
        yield server


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image")
    good = d / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    (d / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.new("RGB", (64, 64), (30, 30, 200)).save(d / "good.jpg")
    (d / "truncated.jpg").write_bytes((d / "good.jpg").read_bytes()[:200])
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    Image.new("RGB", (96, 64), (10, 200, 10)).save(d / "wide.png")
    (d / "text.mp4").write_text("not a video")
    clip = np.zeros((41, 64, 64, 3), np.uint8)
    write_video(clip, d / "clip.mp4", fps=24)
    (d / "truncated.mp4").write_bytes((d / "clip.mp4").read_bytes()[:300])
    write_video(clip[:1], d / "one.mp4", fps=24)
    write_video(clip[:10], d / "ten.mp4", fps=24)
    return d


def call(studio, endpoint, **kwargs):
    return studio.client.predict(**{**FAST, "seed": 1, **kwargs}, api_name=endpoint)


# Sliders and dropdowns check their own range before our validator runs: Gradio's refusal then names the bound.
CASES = [
    ("empty prompt", "/t2v", dict(prompt=""), "prompt is empty"),
    ("whitespace prompt", "/t2v", dict(prompt="   \n\t "), "prompt is empty"),
    ("frames not 4k+1", "/t2v", dict(prompt="x", num_frames=10), "4k\\+1"),
    ("zero frames", "/t2v", dict(prompt="x", num_frames=0), "frames|less than minimum|greater than maximum"),
    ("negative frames", "/t2v", dict(prompt="x", num_frames=-3), "frames|less than minimum|greater than maximum"),
    ("too many frames", "/t2v", dict(prompt="x", num_frames=1001), "frames|less than minimum|greater than maximum"),
    ("negative guidance", "/t2v", dict(prompt="x", guidance=-2.0), "guidance|less than minimum|greater than maximum"),
    ("zero steps", "/t2v", dict(prompt="x", num_steps=0), "steps|less than minimum|greater than maximum"),
    ("huge steps", "/t2v", dict(prompt="x", num_steps=100000), "steps|less than minimum|greater than maximum"),
    ("unknown resolution", "/t2v", dict(prompt="x", resolution="8k"), "resolution|not in the list of choices"),
    ("missing image", "/i2v", dict(prompt="x", image=None), "image"),
    ("0-byte image", "/i2v", dict(prompt="x", image="empty.png"), "empty|0 bytes|image"),
    ("not an image", "/i2v", dict(prompt="x", image="text.png"), "image"),
    ("truncated png", "/i2v", dict(prompt="x", image="truncated.png"), "truncated|damaged|image"),
    ("truncated jpeg", "/i2v", dict(prompt="x", image="truncated.jpg"), "truncated|damaged|image"),
    ("1x1 image", "/i2v", dict(prompt="x", image="tiny.png"), "small"),
    ("decompression bomb", "/i2v", dict(prompt="x", image="bomb.png"), "large|pixels|cannot identify image"),
    ("loop sizes differ", "/loop", dict(prompt="x", first_image="good.png", last_image="wide.png"), "size"),
    ("not a video", "/extend", dict(prompt="x", video="text.mp4", num_frames=37), "video"),
    ("truncated mp4", "/extend", dict(prompt="x", video="truncated.mp4", num_frames=37), "video|frames"),
    ("1-frame clip", "/extend", dict(prompt="x", video="one.mp4", num_frames=37), "33"),
    ("10-frame clip", "/extend", dict(prompt="x", video="ten.mp4", num_frames=37), "33"),
]


@pytest.mark.parametrize("endpoint,kwargs,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_api_error_and_the_next_request_works(studio, bad_files, capsys, endpoint, kwargs,
                                                                   message):
    kwargs = {k: handle_file(str(bad_files / v)) if k in ("image", "first_image", "last_image", "video") and v
              else v for k, v in kwargs.items()}
    # Our validator answers with ValidationError/AppError; a slider's own range check answers 400 with its
    # message (gradio_client prints it and raises HTTPStatusError). Either way: refused, with a reason.
    with pytest.raises((ValidationError, AppError, httpx.HTTPStatusError)) as caught:
        call(studio, endpoint, **kwargs)
    said = str(caught.value) + capsys.readouterr().out
    assert re.search(message, said, re.IGNORECASE), said
    assert "Traceback" not in said
    video, recipe, *_ = call(studio, "/t2v", prompt="a red circle")
    assert Path(video).exists() and recipe["mode"] == "t2v"


def test_emoji_and_very_long_prompts_run(studio):
    _, recipe, *_ = call(studio, "/t2v", prompt="🟥➡️ a red square " + "very " * 2500)
    assert recipe["prompt"]["original"].startswith("🟥") and any("tokens" in w for w in recipe["warnings"])


def request_for(i: int) -> tuple[str, dict]:
    endpoint = ("/t2v", "/i2v", "/loop", "/extend")[i % 4]
    extra = {"/t2v": {}, "/i2v": dict(image=handle_file(str(EXAMPLES / "i2v_0.png"))),
             "/loop": dict(first_image=handle_file(str(EXAMPLES / "loop_0.png")), last_image=None),
             "/extend": dict(video=handle_file(str(EXAMPLES / "clip_65.mp4")), num_frames=37)}[endpoint]
    return endpoint, dict(FAST, prompt=f"request {i}", seed=1000 + i, **extra)


def run_burst(studio, clients, first: int) -> set[str]:
    jobs = []
    for i in range(first, first + 16):
        endpoint, kwargs = request_for(i)
        jobs.append((i, endpoint, clients[i % len(clients)].submit(**kwargs, api_name=endpoint)))
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda job: (job[0], job[1], job[2].result(timeout=600)), jobs))
    videos = set()
    for i, endpoint, (video, recipe, seed, _status, _preview) in outcomes:
        assert recipe["seed"] == seed == 1000 + i, "a result came back to the wrong request"
        assert recipe["prompt"]["original"] == f"request {i}"
        assert recipe["mode"] == endpoint.strip("/")
        videos.add(Path(video).name)
    assert len(videos) == 16
    return videos


def test_sixteen_concurrent_clients_all_finish_unmixed_and_memory_settles(studio):
    """Bursts of 16 jobs from 4 clients: every result matches its request, and memory does not keep growing.

    The first burst grows RSS once (allocator arenas for the worker threads); later bursts must not add to it,
    and the Python heap must stay flat (a leak of job state, previews or results would show there first).
    """
    process = psutil.Process()
    for i in range(4):  # warm every endpoint once: first calls allocate kernels, caches and thread pools
        endpoint, kwargs = request_for(i)
        studio.client.predict(**kwargs, api_name=endpoint)
    gc.collect()
    baseline = process.memory_info().rss
    clients = [Client(studio.url, verbose=False) for _ in range(4)]
    seen = run_burst(studio, clients, 0)
    gc.collect()
    after_first = process.memory_info().rss
    tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0]
    for burst in (100, 200):
        videos = run_burst(studio, clients, burst)
        assert not seen & videos
        seen |= videos
    gc.collect()
    heap_growth = (tracemalloc.get_traced_memory()[0] - heap_before) / 2**20
    tracemalloc.stop()
    after_third = process.memory_info().rss
    saved = [p.name for p in studio.out.glob("*.mp4")]
    assert len(set(saved)) == len(saved) >= 48 + 4
    first, later = (after_first - baseline) / 2**20, (after_third - after_first) / 2**20
    print(f"RSS +{first:.0f} MiB after the first burst, {later:+.0f} MiB over two more; heap {heap_growth:+.1f} MiB")
    # The Python heap is the leak detector (+1.8 MiB in every run so far). Native RSS over the two later bursts
    # varies from +3 to +253 MiB between runs of the same code on the 2-core CI machine with the heap flat
    # (allocator arenas of the worker threads; a commit that changed only training code gave +201 and +88), so its
    # bound catches runaway growth, not arena noise.
    assert first < 400 and later < 400 and heap_growth < 20


def test_a_queued_job_can_be_cancelled_and_the_running_one_stopped(studio):
    busy, waiting = Client(studio.url, verbose=False), Client(studio.url, verbose=False)
    with slow_sampling(studio.pool):  # 200 steps take at least 10 s: cancel and stop cannot lose the race
        running = busy.submit(**dict(FAST, prompt="a long job", num_steps=200, seed=1), api_name="/t2v")
        for _ in range(400):  # wait until the long job holds the only engine
            if any(studio.pool.is_busy(engine) for engine in studio.pool):
                break
            time.sleep(0.05)
        assert any(studio.pool.is_busy(engine) for engine in studio.pool), "the long job never started"
        queued = waiting.submit(**dict(FAST, prompt="never runs", seed=2), api_name="/t2v")
        time.sleep(0.5)
        assert queued.cancel(), "a job still waiting in the queue must be cancellable"
        busy.predict(api_name="/stop")
        *_, status, _ = running.result(timeout=120)
    assert "Stopped" in status
    assert not any("never runs" in p.read_text() for p in studio.out.glob("*.json"))
    video, recipe, *_ = call(studio, "/t2v", prompt="after the cancel")
    assert Path(video).exists() and recipe["prompt"]["original"] == "after the cancel"
