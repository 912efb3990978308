"""This server's results as a gallery, with 'load these settings' to reproduce one.

Results are `<stem>.mp4|.png` + `<stem>.json` pairs written by the engine (pipelines.saving) and found by
pipelines.results (no torch, which the studio never imports).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av

from pipelines.results import ResultFiles
from studio.handlers import MEDIA_INPUTS, TAB_NAMES
from studio.media_info import video_thumbnail

log = logging.getLogger(__name__)


def gallery_value(items: list[ResultFiles]) -> list[tuple]:
    """(thumbnail, caption) pairs for gr.Gallery: PNG results as they are, videos as their first frame."""
    value = []
    for item in items:
        try:
            thumb = str(item.media) if item.media.suffix == ".png" else video_thumbnail(item.media)
        except (OSError, ValueError, StopIteration, av.error.FFmpegError) as exc:
            log.info("no thumbnail for %s: %s", item.media.name, exc)
            continue
        value.append((thumb, item.media.stem))
    return value


def read_recipe(path: str | Path) -> dict:
    """A result's JSON recipe, or {"error": ...} when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read {Path(path).name}: {exc}"}


def settings_from_recipe(recipe: dict, folder: str | Path | None = None) -> dict:
    """The control values that reproduce a recipe (names as in SharedControls and handlers.TAB_NAMES), plus its
    mode; with the result's `folder`, also the tab's media from the reference copies saved beside it."""
    options = recipe.get("options") or {}
    prompt = recipe.get("prompt") or {}
    motion = options.get("motion_score")
    values = {
        "mode": recipe.get("mode") or options.get("mode") or "t2v",
        "prompt": prompt.get("original") or options.get("prompt") or "",
        "negative_prompt": prompt.get("negative") or options.get("negative_prompt") or "",
        "resolution": options.get("resolution"), "aspect_ratio": options.get("aspect_ratio"),
        "num_frames": options.get("num_frames"), "fps": options.get("fps"),
        "motion_score": str(motion) if motion is not None else None,
        "num_steps": options.get("num_steps"), "guidance": options.get("guidance"),
        "guidance_img": options.get("guidance_img"), "seed": recipe.get("seed", options.get("seed")),
        "randomize_seed": False,
        # the prompt above is what ran: a refined prompt left ticked from earlier must not replace it
        "refined_prompt": "", "use_refined": False,
        # the tab's own settings (its media: from the reference copies, below)
        "image_first": options.get("image_first"), "image_position": options.get("i2v_position"),
        "direction": options.get("extend_direction"), "easy": options.get("extend_easy"),
        "segments": options.get("segments"),
    }
    if prompt.get("refined") and not prompt.get("per_segment"):  # (per-segment runs refined each piece apart)
        values["refined_prompt"], values["use_refined"] = prompt["refined"], True
    values = {key: value for key, value in values.items() if value is not None}
    saved = recipe.get("references_saved")
    if folder is not None and isinstance(saved, list):
        # Every media input of the tab is set, a missing copy to None (cleared): a one-image loop must not pick
        # up a last image left in the tab from before.
        copies = [Path(folder) / Path(str(name)).name for name in saved]  # a name only: never outside the folder
        media = [name for name in TAB_NAMES.get(values["mode"], ()) if name in MEDIA_INPUTS]  # in reference order
        for i, name in enumerate(media):
            values[name] = str(copies[i]) if i < len(copies) and copies[i].is_file() else None
    return values
