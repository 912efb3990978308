"""Launch the studio in-process on a free local port with the tiny preset (shared by the studio tests)."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_studio(out: Path, preset=None, **sampling):
    """Yield (url, pool, settings) for a launched studio (the tiny preset unless one is given); closes it after."""
    from pipelines.engine import Engine
    from studio import STUDIO_CSS, EnginePool, StudioSettings, build_demo, studio_theme
    from tests.tiny_preset import tiny_preset

    pool = EnginePool([Engine(preset or tiny_preset(**sampling), output_dir=out).load()])
    settings = StudioSettings(output_dir=out, memory_refresh_s=2.0)
    demo = build_demo(pool, settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=settings.served_paths(), theme=studio_theme(), css=STUDIO_CSS)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", pool=pool, settings=settings, out=out)
    finally:
        demo.close()


@contextmanager
def slow_sampling(pool, seconds_per_step: float = 0.05):
    """Every sampling step of the pool's engines takes at least this long, so a test can stop or cancel a job
    while it runs instead of racing a tiny model that finishes 200 steps in a second."""
    originals = [(engine, engine._progress_callback) for engine in pool]

    def slowed(original):
        def make(emit, latent, start):
            inner = original(emit, latent, start)

            def callback(step):
                time.sleep(seconds_per_step)
                inner(step)
            return callback
        return make

    for engine, original in originals:
        engine._progress_callback = slowed(original)
    try:
        yield
    finally:
        for engine, original in originals:
            engine._progress_callback = original


EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
FAST = dict(negative_prompt="", refined_prompt="", num_steps=2, randomize_seed=False)  # quick API calls


@contextmanager
def studio_with_client(out: Path):
    """A launched tiny-preset studio with a connected `gradio_client.Client` as `.client`."""
    from gradio_client import Client

    with running_studio(out) as server:
        server.client = Client(server.url, verbose=False)
        yield server
