"""What the studio needs to know besides its engines: folders, queue size, refresh rate, the server's LLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.prompt_refine import LLMConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"


@dataclass(frozen=True)
class StudioSettings:
    """Server-wide studio options (per-user state lives in gr.State, never here)."""

    output_dir: Path = Path("outputs")
    assets_dir: Path = ASSETS_DIR
    queue_size: int = 16  # waiting jobs beyond this are refused with "queue is full"
    history_limit: int = 24  # results shown in the history gallery
    memory_refresh_s: float = 2.0
    llm: LLMConfig = field(default_factory=LLMConfig.from_env)  # server default; users may override per session
    gpu_decorator: Callable | None = None  # spaces.GPU on Hugging Face ZeroGPU, else None
    title: str = "Open-Sora Studio"

    @property
    def examples_dir(self) -> Path:
        return self.assets_dir / "examples"

    def served_paths(self) -> list[str]:
        """The only folders Gradio may serve files from: results and assets."""
        return [str(Path(self.output_dir).resolve()), str(Path(self.assets_dir).resolve())]
