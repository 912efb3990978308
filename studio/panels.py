"""Panels beside the outputs: memory (refreshed by a timer outside the GPU queue) with the estimate for the chosen
settings, parameters, and unload."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass

import gradio as gr

from pipelines.options import GenerationOptions
from pipelines.units import format_bytes, format_count
from studio.jobs import EnginePool

log = logging.getLogger(__name__)
PARAM_HEADERS = ["component", "parameters", "trainable", "dtype", "device", "checkpoint"]


def memory_markdown(pool: EnginePool) -> str:
    """One block per engine: device, stage, device or host memory, and the peak of the last run."""
    blocks = []
    for index, engine in enumerate(pool):
        try:
            stats = engine.memory_stats()
        except Exception as exc:  # a panel must never take the page down
            log.warning("memory stats failed: %s", exc)
            blocks.append(f"**Worker {index}**: memory stats unavailable ({html.escape(str(exc))})")
            continue
        state = engine.state
        lines = [f"**{html.escape(stats.device_name)}** ({stats.device_type}) · stage: `{state.stage}`"]
        if stats.device_type == "cuda":
            lines.append(f"GPU allocated {format_bytes(stats.allocated_bytes)} · reserved "
                         f"{format_bytes(stats.reserved_bytes)} · peak {format_bytes(stats.peak_allocated_bytes)} · "
                         f"total {format_bytes(stats.total_bytes)}")
        lines.append(f"Process RSS {format_bytes(stats.process_rss_bytes)} · system RAM "
                     f"{format_bytes(stats.system_used_bytes)} / {format_bytes(stats.system_total_bytes)}")
        peak = state.last_peak_bytes
        lines.append(f"Peak of the last run: {format_bytes(peak) if peak else 'no run yet'}")
        blocks.append("  \n".join(lines))
    return "\n\n".join(blocks)


def memory_line(fits: bool, note: str) -> str:
    """An estimate's line as the studio shows it: marked ⚠, with advice, when the request will not fit."""
    return note if fits else f"⚠ {note} Try fewer frames or a smaller resolution."


# What each tab's estimate assumes: its kind of reference (never read: only the count and kind matter).
_ESTIMATE_REFERENCES = {"t2v": (), "i2v": ("image.png",), "loop": ("first.png",), "extend": ("clip.mp4",)}
_MODE_WORDS = {"t2v": "text-to-video", "i2v": "image-to-video", "loop": "loop", "extend": "extension"}


def estimate_options(mode: str | None, resolution, aspect_ratio, num_frames, easy=False,
                     segments=1) -> GenerationOptions:
    """The request the estimate prices: the active tab's mode with its kind of reference, and for Extend its
    *easy* (65 conditioning frames) and segments."""
    mode = mode if mode in _ESTIMATE_REFERENCES else "t2v"
    extend = {"extend_easy": bool(easy), "segments": segments or 1} if mode == "extend" else {}
    return GenerationOptions(mode=mode, prompt="estimate", resolution=resolution, aspect_ratio=aspect_ratio,
                             num_frames=num_frames, references=_ESTIMATE_REFERENCES[mode], **extend)


def estimate_markdown(pool: EnginePool, resolution, aspect_ratio, num_frames, mode: str | None = "t2v",
                      easy=False, segments=1) -> str:
    """The memory estimate of a run of the active tab's mode at these settings (a reference adds its encoding
    and, for image guidance, a third guidance branch)."""
    try:
        options = estimate_options(mode, resolution, aspect_ratio, num_frames, easy, segments)
        mode = options.mode
        fits, note = pool.memory_verdict(options)  # validated (None: the preset's) by the estimate
    except (TypeError, ValueError) as exc:  # settings the request check will explain
        return f"Memory estimate: unavailable for these settings ({html.escape(str(exc))})."
    except Exception as exc:  # a panel must never take the page down
        log.warning("memory estimate failed: %s", exc)
        return "Memory estimate: unavailable."
    return f"{memory_line(fits, note)} ({_MODE_WORDS[mode]} at these settings)"


def param_rows(pool: EnginePool) -> list[list]:
    """Rows for the parameters table (the first engine's; all engines hold the same preset)."""
    engine = next(iter(pool))
    rows = []
    for stats in engine.param_stats():
        rows.append([stats.name, format_count(stats.total), format_count(stats.trainable), stats.dtype or "-",
                     stats.device or "-", stats.checkpoint or "-"])
    return rows or [["(models not loaded: they load with the next run)", "", "", "", "", ""]]


def unload_models(pool: EnginePool) -> tuple[str, list[list]]:
    """Free the memory of every idle engine; busy ones are left running."""
    unloaded, busy = pool.unload_idle()
    message = f"Unloaded {unloaded} worker(s); the models load again with the next run."
    if busy:
        message += f" {busy} worker(s) are running a job and were left as they are."
    return message, param_rows(pool)


def wire_estimate(pool: EnginePool, shared, panels: Panels, mode_state, extend_easy, extend_segments) -> None:
    """Recompute the estimate when the frame size, the clip length, the tab or Extend's own settings change, and
    with the memory timer (what is available moves as other programs run)."""
    inputs = [shared.resolution, shared.aspect_ratio, shared.num_frames, mode_state, extend_easy, extend_segments]
    for trigger in (*(source.change for source in inputs), panels.timer.tick):
        trigger(lambda *values: estimate_markdown(pool, *values), inputs, panels.estimate, queue=False,
                api_visibility="private", show_progress="hidden")


@dataclass
class Panels:
    memory: gr.Markdown
    estimate: gr.Markdown
    timer: gr.Timer
    params: gr.Dataframe
    unload: gr.Button
    unload_status: gr.Markdown


def build_panels(pool: EnginePool, refresh_s: float, allow_unload: bool = True) -> Panels:
    """Memory panel with its timer and estimate, the parameters table and the unload button (left out with
    `allow_unload=False`: on a public studio one visitor must not unload everyone's models)."""
    with gr.Accordion("Memory", open=True):
        memory = gr.Markdown(memory_markdown(pool), elem_id="memory-panel")
        s = pool.preset.sampling
        estimate = gr.Markdown(estimate_markdown(pool, s.resolution, s.aspect_ratio, s.num_frames),
                               elem_id="memory-estimate")
        timer = gr.Timer(refresh_s)
        with gr.Row(visible=allow_unload):
            unload = gr.Button("Free memory / unload models", size="sm", elem_id="unload")
        unload_status = gr.Markdown("")
    with gr.Accordion("Parameters", open=False):
        params = gr.Dataframe(value=param_rows(pool), headers=PARAM_HEADERS, interactive=False, wrap=True,
                              elem_id="params-panel")
    # Outside the GPU queue: the panel keeps refreshing while a long job holds the device.
    timer.tick(lambda: memory_markdown(pool), None, memory, queue=False, api_visibility="private",
               show_progress="hidden")
    if allow_unload:
        unload.click(lambda: unload_models(pool), None, [unload_status, params], queue=False,
                     api_visibility="private")
    return Panels(memory, estimate, timer, params, unload, unload_status)
