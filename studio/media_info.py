"""Cheap facts about uploaded media for validation before queueing (PyAV and PIL only, no torch)."""

from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipelines.options import OptionsError


def count_video_frames(path: str | Path) -> int:
    """Frames in a clip (the container's count, or a decode when the container does not say)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise OptionsError(f"{Path(path).name} has no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except (av.error.FFmpegError, OSError) as exc:
        raise OptionsError(f"cannot read the clip {Path(path).name}: {exc}") from None


# EXIF orientations that turn the picture a quarter (phones store portrait shots sideways plus this flag)
_QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as it is shown (EXIF orientation applied, as the engine does)."""
    with Image.open(path) as image:
        turned = image.getexif().get(0x0112) in _QUARTER_TURN_ORIENTATIONS
        return (image.width, image.height) if turned else (image.height, image.width)


def video_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a clip's first video stream as players show it (its rotation applied, as the engine
    does)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        first = next(container.decode(stream), None)
        turned = first is not None and round((first.rotation or 0) / 90) % 2 == 1
        return (width, height) if turned else (height, width)


def video_fps(path: str | Path) -> float:
    """A clip's average frame rate (0 when the container does not say)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else 0.0


def save_clip_frame(path: str | Path, last: bool, out: str | Path) -> Path:
    """Write a clip's first or last frame to the PNG `out` (what the LLM sees when refining an extension: the
    frame the new footage continues from); raises OptionsError when the clip cannot be read."""
    try:
        with av.open(str(path)) as container:
            frames = container.decode(video=0)
            frame = next(frames, None)
            if last:
                for frame in frames:  # keep only the latest: a long clip never sits in memory
                    pass
    except (av.error.FFmpegError, OSError, IndexError) as exc:  # (IndexError: no video stream)
        raise OptionsError(f"cannot read the clip {Path(path).name}: {exc or 'no video stream'}") from None
    if frame is None:
        raise OptionsError(f"{Path(path).name} has no frames")
    frame.to_image().convert("RGB").save(out, format="PNG")
    return Path(out)


def video_thumbnail(path: str | Path, max_side: int = 192) -> np.ndarray:
    """The first frame of a clip as uint8 (H, W, 3), at most max_side pixels (browsers paint no <video> poster)."""
    path = Path(path)
    return _cached_thumbnail(str(path), path.stat().st_mtime_ns, max_side)


@functools.lru_cache(maxsize=256)
def _cached_thumbnail(path: str, mtime_ns: int, max_side: int) -> np.ndarray:
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_image()
    frame.thumbnail((max_side, max_side))
    return np.asarray(frame.convert("RGB"))
