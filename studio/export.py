"""Results for sharing elsewhere: an animated GIF of a result video (PyAV and PIL only, no torch).

The GIF is written once, atomically, beside the video it was made from (same name, `.gif`), so asking again
returns the same file and no result is ever overwritten.
"""

from __future__ import annotations

from pathlib import Path

import av
from PIL import Image

from pipelines.atomic_io import write_atomically
from pipelines.options import OptionsError

MAX_GIF_FRAMES = 257  # two 129-frame official clips' worth; longer videos are better shared as MP4
MAX_GIF_WIDTH = 480  # wider frames are scaled down: a GIF of 768px frames would run to hundreds of MB


def video_to_gif(path: str | Path) -> Path:
    """Write `<video>.gif` (looping, at the video's frame rate) beside `path` unless it exists; return its path."""
    source = Path(path)
    target = source.with_suffix(".gif")
    if target.is_file():
        return target
    frames, fps = [], 24.0
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise OptionsError(f"{source.name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or fps)
            for frame in container.decode(stream):
                if len(frames) == MAX_GIF_FRAMES:
                    raise OptionsError(f"{source.name} has more than {MAX_GIF_FRAMES} frames: share the MP4 instead")
                frames.append(_fit_width(frame.to_image()))
    except (av.error.FFmpegError, OSError) as exc:
        raise OptionsError(f"cannot read the video {source.name}: {exc}") from None
    if not frames:
        raise OptionsError(f"{source.name} has no frames to export")
    duration_ms = max(20, round(1000 / fps))  # browsers treat shorter GIF delays as 100 ms
    return write_atomically(target, ".partial.gif", lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0))


def _fit_width(image: Image.Image) -> Image.Image:
    if image.width <= MAX_GIF_WIDTH:
        return image
    height = max(1, round(image.height * MAX_GIF_WIDTH / image.width))
    return image.resize((MAX_GIF_WIDTH, height), Image.Resampling.LANCZOS)
