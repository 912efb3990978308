"""The four tabs: each holds its own inputs, its Generate button and its examples."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from pipelines.options import MAX_SEGMENTS

log = logging.getLogger(__name__)

TAB_LABELS = {"t2v": "Text to video", "i2v": "Image to video", "loop": "Loop", "extend": "Extend"}


@dataclass
class Tab:
    """One tab's components: `inputs` in the handler's parameter order (see handlers.TAB_NAMES)."""

    mode: str
    tab: gr.Tab
    inputs: list
    button: gr.Button
    uploads: list = field(default_factory=list)  # image / video inputs that pick the aspect ratio
    finish: gr.Button | None = None  # Extend: stop after the current segment


def load_examples(folder: Path) -> dict:
    """The examples manifest (examples.json) with absolute paths; {} when absent or unreadable."""
    try:
        manifest = json.loads((folder / "examples.json").read_text())
    except (OSError, ValueError) as exc:
        log.info("no studio examples (%s)", exc)
        return {}
    for rows in manifest.values():
        for row in rows:
            for key in ("image", "last_image", "video"):
                if row.get(key):
                    row[key] = str(folder / row[key])
    return manifest


def _examples(rows: list[dict], keys: list[str], inputs: list, label: str) -> None:
    table = [[row.get(key) for key in keys] for row in rows]
    if table:
        gr.Examples(table, inputs=inputs, label=label, cache_examples=False, examples_per_page=4)


def build_t2v(prompt, examples: dict) -> Tab:
    with gr.Tab(TAB_LABELS["t2v"], id="t2v", elem_id="tab-t2v") as tab:
        image_first = gr.Checkbox(label="Image first", value=False,
                                  info="Generate the first frame as an image, then animate it (image to video). "
                                       "Lets you check the scene before the motion.")
        button = gr.Button("Generate", variant="primary", elem_id="generate-t2v")
        _examples(examples.get("t2v", []), ["prompt"], [prompt], "Shapes-world prompts")
    return Tab("t2v", tab, [image_first], button)


def build_i2v(prompt, examples: dict) -> Tab:
    with gr.Tab(TAB_LABELS["i2v"], id="i2v", elem_id="tab-i2v") as tab:
        image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=220,
                         elem_id="i2v-image")
        position = gr.Radio([("first frame", "head"), ("last frame", "tail")], value="head",
                            label="The image is the video's …",
                            info="First frame: the video starts from it. Last frame: the video leads up to it.")
        button = gr.Button("Generate", variant="primary", elem_id="generate-i2v")
        _examples(examples.get("i2v", []), ["prompt", "image"], [prompt, image], "Examples")
    return Tab("i2v", tab, [image, position], button, uploads=[image])


def build_loop(prompt, examples: dict) -> Tab:
    with gr.Tab(TAB_LABELS["loop"], id="loop", elem_id="tab-loop") as tab:
        gr.Markdown("One image: the video starts and ends on it (a seamless loop). Two images: it goes from the "
                    "first to the second.")
        with gr.Row():
            first = gr.Image(label="First (and last) image", type="filepath", sources=["upload", "clipboard"],
                             height=200, elem_id="loop-first")
            last = gr.Image(label="Last image (optional)", type="filepath", sources=["upload", "clipboard"],
                            height=200, elem_id="loop-last")
        button = gr.Button("Generate", variant="primary", elem_id="generate-loop")
        _examples(examples.get("loop", []), ["prompt", "image", "last_image"], [prompt, first, last], "Examples")
    return Tab("loop", tab, [first, last], button, uploads=[first])


def build_extend(prompt, examples: dict) -> Tab:
    with gr.Tab(TAB_LABELS["extend"], id="extend", elem_id="tab-extend") as tab:
        video = gr.Video(label="Clip to extend", sources=["upload"], height=220, elem_id="extend-video")
        with gr.Row():
            direction = gr.Radio([("forward (continue after the clip)", "forward"),
                                  ("backward (lead into the clip)", "backward")], value="forward",
                                 label="Direction", info="Forward conditions on the clip's last frames, backward "
                                                         "on its first frames.")
            easy = gr.Checkbox(label="Easy (65 frames of context)", value=False,
                               info="Condition on 65 frames instead of 33: steadier, needs a longer clip.")
        segments = gr.Slider(1, MAX_SEGMENTS, value=1, step=1, label="Segments", elem_id="extend-segments",
                             info="Repeat the extension, each segment continuing from the video so far. Stop "
                                  "during a later segment keeps the finished ones. Give segments their own "
                                  "prompts with |0|first prompt|2|from the third segment on (counting from 0).")
        gr.Markdown("The clip needs at least 33 frames (65 with *easy*); the new video's frame count must exceed "
                    "that, and each segment adds that many frames less the context. The result is the original "
                    "clip plus the new frames.")
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id="generate-extend", scale=3)
            finish = gr.Button("Stop after this segment", elem_id="finish-segment", scale=1)
        _examples(examples.get("extend", []), ["prompt", "video", "segments"], [prompt, video, segments], "Examples")
    return Tab("extend", tab, [video, direction, easy, segments], button, uploads=[video], finish=finish)
