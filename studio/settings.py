"""What the studio needs to know besides its engines: folders, queue size, refresh rate, the server's LLM."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from pipelines.prompt_refine import LLMConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def deployment_is_public(host: str | None, share: bool | None, root_path: str | None = None, forced: bool = False,
                         environ: Mapping[str, str] = os.environ) -> bool:
    """Whether others can reach the studio: `forced` (--public), a Hugging Face Space, a share link, a URL prefix
    (served behind a reverse proxy), or a non-loopback address (the flags, else Gradio's own GRADIO_SERVER_NAME /
    GRADIO_SHARE / GRADIO_ROOT_PATH variables). STUDIO_PUBLIC=0 says only trusted people can reach it (e.g. a
    container, which must listen on 0.0.0.0); --public still wins."""
    if not forced and environ.get("STUDIO_PUBLIC", "").strip().lower() in ("0", "false", "no"):
        return False
    host = host or environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    share = share or environ.get("GRADIO_SHARE", "").strip().lower() in ("1", "true", "yes")
    proxied = bool(root_path or environ.get("GRADIO_ROOT_PATH"))
    return forced or bool(environ.get("SPACE_ID")) or bool(share) or proxied or host not in LOOPBACK_HOSTS


BROWSER_SECRET_FILE = ".browser-state-key"  # hidden: never listed as a result


def load_browser_secret(output_dir: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> str:
    """STUDIO_BROWSER_SECRET, else a key kept in the output folder (made on first use, readable by the owner
    only), so that settings a browser saved survive a restart of the studio."""
    if environ.get("STUDIO_BROWSER_SECRET"):
        return environ["STUDIO_BROWSER_SECRET"]
    path = Path(output_dir) / BROWSER_SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(24)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


@dataclass(frozen=True)
class StudioSettings:
    """Server-wide studio options (per-user state lives in gr.State, never here)."""

    output_dir: Path = Path("outputs")
    assets_dir: Path = ASSETS_DIR
    queue_size: int = 16  # waiting jobs beyond this are refused with "queue is full"
    history_limit: int = 24  # results shown in the history gallery
    memory_refresh_s: float = 2.0
    llm: LLMConfig = field(default_factory=LLMConfig.from_env)  # server default; users may override per session
    gpu_decorator: Callable | None = None  # spaces.GPU on Hugging Face ZeroGPU (called with duration=), else None
    public: bool = False  # others can reach it (a Space, a share link, a non-loopback host): see session_llm
    # Key of what the browser keeps (LLM endpoint and model, saved parameter sets); stable across restarts so the
    # browser can still read them (None: a new random key per process, as Gradio does by default).
    browser_secret: str | None = None
    title: str = "Open-Sora Studio"

    @property
    def examples_dir(self) -> Path:
        return self.assets_dir / "examples"

    def served_paths(self) -> list[str]:
        """The only folders Gradio may serve files from: results and assets."""
        return [str(Path(self.output_dir).resolve()), str(Path(self.assets_dir).resolve())]
