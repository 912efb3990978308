"""Reading and writing images and videos: tensors in [-1, 1] on one side, files a browser can show on the other.

Frames travel as float tensors `(3, T, H, W)` (or `(3, H, W)` for one image) in [-1, 1], the range the VAE expects.
Everything read from disk is checked before it is decoded, so a bad upload fails with a short `MediaError`
instead of a stack trace or an out-of-memory kill. Files are written atomically: a hidden `.*.partial.*` file in
the target folder, fsync, then `os.replace`, so a gallery never shows half a video.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, PngImagePlugin

from pipelines.atomic_io import write_atomically

logger = logging.getLogger(__name__)

# 64 megapixels: far above any size the model samples, far below what would exhaust RAM once decoded.
MAX_PIXELS = 64_000_000
MIN_SIDE = 2


class MediaError(ValueError):
    """A media file or array that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns about a video without decoding all of it."""

    frames: int
    fps: float
    width: int
    height: int


# ----------------------------------------------------------------------------------------------------------------
# Images


def read_image(source: str | os.PathLike | Image.Image | np.ndarray) -> torch.Tensor:
    """Read an image (path, PIL image or uint8 array) as a (3, H, W) float tensor in [-1, 1]; alpha goes on black."""
    if isinstance(source, np.ndarray):
        image = _image_from_array(source)
    elif isinstance(source, Image.Image):
        _check_pixel_count(*source.size, what="image")
        try:
            source.load()  # a lazily opened image may still be truncated
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise MediaError("the image is truncated or corrupt and cannot be decoded.") from exc
        image = source
    else:
        image = _open_image_file(Path(source))
    rgb = np.asarray(_to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    _check_min_size(rgb.shape[1], rgb.shape[0], what="image")
    return _uint8_to_unit(rearrange(torch.from_numpy(rgb.copy()), "h w c -> c h w"))


def _open_image_file(path: Path) -> Image.Image:
    """Open, size-check and fully decode an image file, turning every failure into a MediaError."""
    _check_file(path, "image")
    try:
        # Image.open reads only the header, so the pixel count is checked before anything is decoded.
        with Image.open(path) as image:
            _check_pixel_count(*image.size, what="image", name=path.name)
            _check_min_size(*image.size, what="image", name=path.name)
            image.load()  # decode every byte now: a truncated file must fail here, not later
            # Phones store portrait shots sideways plus an EXIF flag; use the picture the way the user sees it.
            return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(
            f"{path.name}: the image is too large to open safely (over {MAX_PIXELS // 1_000_000} MP); resize it first."
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise MediaError(f"{path.name}: not a readable image (expected PNG, JPEG, WebP, ...).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"{path.name}: the image is truncated or corrupt and cannot be decoded.") from exc


def _image_from_array(array: np.ndarray) -> Image.Image:
    """Wrap a uint8 H×W, H×W×3 or H×W×4 array as a PIL image."""
    if array.dtype != np.uint8:
        raise MediaError(f"image array must be uint8, got {array.dtype}.")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        _check_pixel_count(array.shape[1], array.shape[0], what="image")
        _check_min_size(array.shape[1], array.shape[0], what="image")
        return Image.fromarray(np.ascontiguousarray(array))
    raise MediaError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit RGB; transparent pixels are composited onto black, as a video has no alpha."""
    if image.mode.startswith("I;16"):
        # 16-bit greyscale PNGs: Pillow's convert() would clip at 255, so scale down explicitly.
        grey = (np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("I", "F"):
        raise MediaError(f"unsupported pixel format {image.mode!r}: save the image as an 8-bit PNG or JPEG.")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def write_png(frame: torch.Tensor | np.ndarray, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write one frame ((3, H, W) / (3, 1, H, W) in [-1, 1], or uint8 (H, W, 3)) as a PNG."""
    if isinstance(frame, torch.Tensor) and frame.ndim == 3:
        frame = frame.unsqueeze(1)  # (3, 1, H, W)
    pixels = _as_uint8_frames(frame)  # (T, H, W, 3)
    if pixels.shape[0] != 1:
        raise ValueError(f"write_png takes a single frame, got {pixels.shape[0]} frames.")
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))

    def encode(tmp_path: Path) -> None:
        Image.fromarray(pixels[0]).save(tmp_path, format="PNG", pnginfo=info)

    return write_atomically(Path(path), ".partial.png", encode)


# ----------------------------------------------------------------------------------------------------------------
# Videos


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, last: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, float]:
    """Decode a video as ((3, T, H, W) in [-1, 1], fps); `last=True` keeps the final `max_frames` frames.

    With `size` (height, width) every frame is resized and centre-cropped to it (`resize_crop`) as it is decoded,
    so a long full-HD phone clip never sits in memory at full size."""
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}.")
    path = Path(path)
    _check_file(path, "video")
    # A deque with maxlen keeps memory bounded when only the tail is wanted (video extension).
    kept: collections.deque[np.ndarray] = collections.deque(maxlen=max_frames if last else None)
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        _check_pixel_count(stream.codec_context.width, stream.codec_context.height, what="video", name=path.name)
        fps = _frame_rate(stream, path)
        stream.thread_type = "AUTO"
        for array in _decode_rgb(container, stream, path):
            if size is not None:
                array = to_uint8_frames(resize_crop(from_uint8_frames(array[None]), *size))[0]  # (h, w, 3)
            kept.append(array)
            if not last and max_frames is not None and len(kept) >= max_frames:
                break
    if not kept:
        raise MediaError(f"{path.name}: no frame could be decoded; the video is empty, truncated or corrupt.")
    if len({a.shape for a in kept}) > 1:
        raise MediaError(f"{path.name}: the frame size changes inside the video, which is not supported.")
    return from_uint8_frames(np.stack(kept)), fps


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and display size of a video; counts packets when the container does not say."""
    path = Path(path)
    _check_file(path, "video")
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        _check_pixel_count(stream.codec_context.width, stream.codec_context.height, what="video", name=path.name)
        fps = _frame_rate(stream, path)
        decoder = _decode_rgb(container, stream, path)
        first = next(decoder, None)  # decoded for its rotation, so the size is the one a player shows
        decoder.close()
        if first is None:
            raise MediaError(f"{path.name}: no frame could be decoded; the video is empty, truncated or corrupt.")
        frames = stream.frames
        if frames <= 0:
            # Matroska/WebM often carry no count; one packet holds one frame for the codecs met in practice.
            container.seek(0)
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    height, width = first.shape[:2]
    return VideoInfo(frames=int(frames), fps=fps, width=int(width), height=int(height))


def _open_container(path: Path) -> av.container.InputContainer:
    """Open a media container for reading, or explain why it is not a video."""
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{path.name}: not a readable video (the file is corrupt, truncated or not a video).") from exc


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    """The first video stream of a container."""
    if not container.streams.video:
        raise MediaError(f"{path.name}: the file has no video stream.")
    return container.streams.video[0]


def _frame_rate(stream: av.video.stream.VideoStream, path: Path) -> float:
    """The average frame rate; variable-rate videos get their mean rate (logged) rather than an error."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise MediaError(f"{path.name}: the video does not state a frame rate.")
    if stream.base_rate and abs(float(stream.base_rate) - float(rate)) > 0.01 * float(rate):
        logger.info("%s: variable frame rate, using the average %.3f fps", path.name, float(rate))
    return float(rate)


def _decode_rgb(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path
) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 frames, upright; a decode error after some frames ends the video with a warning."""
    produced = 0
    try:
        for frame in container.decode(stream):
            array = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            quarter_turns = round((frame.rotation or 0) / 90) % 4
            if quarter_turns:
                # The display matrix rotates counter-clockwise; players apply it, so must we.
                array = np.ascontiguousarray(np.rot90(array, quarter_turns))
            produced += 1
            yield array
    except av.FFmpegError as exc:
        if produced == 0:
            raise MediaError(f"{path.name}: the video is truncated or corrupt; no frame could be decoded.") from exc
        logger.warning("%s: decoding stopped after %d frames (%s); the file looks truncated", path.name, produced, exc)


def write_video(
    frames: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    fps: float,
    crf: int = 18,
    metadata: dict | None = None,
) -> Path:
    """Atomically write (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3) as a browser-playable H.264 mp4."""
    if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}.")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer between 0 and 51, got {crf!r}.")
    pixels = _as_uint8_frames(frames)  # (T, H, W, 3)
    _, height, width, _ = pixels.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs an even width and height, got {width}x{height}.")

    def encode(tmp_path: Path) -> None:
        # faststart puts the index first, so a browser can start playing before the whole file has arrived.
        with av.open(str(tmp_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            for key, value in (metadata or {}).items():
                container.metadata[str(key)] = str(value)
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for array in pixels:
                container.mux(stream.encode(_frame_from_array(array)))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames

    return write_atomically(Path(path), ".partial.mp4", encode)


def _frame_from_array(array: np.ndarray) -> av.VideoFrame:
    """One (H, W, 3) uint8 array as an encoder frame (a seam tests use to fail mid-encode)."""
    return av.VideoFrame.from_ndarray(array, format="rgb24")


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to fill height×width keeping the aspect ratio, then centre-crop; (C, T, H, W) or (C, H, W)."""
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"target size must be positive integers, got {height}x{width}.")
    if not frames.is_floating_point():
        raise ValueError(f"resize_crop expects float frames in [-1, 1], got {frames.dtype}.")
    if frames.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (C, T, H, W) frames, got shape {tuple(frames.shape)}.")
    video = frames if frames.ndim == 4 else frames.unsqueeze(1)  # (C, T, H, W)
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    fill_h, fill_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (fill_h, fill_w) != (src_h, src_w):
        batch = rearrange(video, "c t h w -> t c h w").float()
        # Antialiasing matters when shrinking a photo several-fold; bicubic matches the upstream PIL transform.
        batch = F.interpolate(batch, size=(fill_h, fill_w), mode="bicubic", align_corners=False, antialias=True)
        batch = batch.clamp(-1.0, 1.0)  # bicubic overshoots at sharp edges
        video = rearrange(batch, "t c h w -> c t h w").to(frames.dtype)
    top, left = round((fill_h - height) / 2), round((fill_w - width) / 2)
    video = video[:, :, top : top + height, left : left + width]  # (C, T, height, width)
    return video if frames.ndim == 4 else video[:, 0]


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] → numpy (T, H, W, 3) uint8."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"expected (3, T, H, W) frames, got shape {tuple(frames.shape)}.")
    if not torch.isfinite(frames).all():
        raise ValueError("frames contain NaN or infinite values; the generation diverged.")
    pixels = ((frames.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "c t h w -> t h w c").cpu().numpy()


def _as_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Accept float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3); return contiguous uint8 (T, H, W, 3)."""
    if isinstance(frames, torch.Tensor) and frames.is_floating_point():
        pixels = to_uint8_frames(frames)
    else:
        pixels = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"expected float (3, T, H, W) or uint8 (T, H, W, 3) frames, got {pixels.dtype} {tuple(pixels.shape)}."
            )
    if pixels.shape[0] < 1:
        raise ValueError("there are no frames to write.")
    return np.ascontiguousarray(pixels)


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """numpy (T, H, W, 3) uint8 → (3, T, H, W) float32 in [-1, 1]: the inverse of `to_uint8_frames`."""
    return _uint8_to_unit(rearrange(torch.from_numpy(np.ascontiguousarray(frames)), "t h w c -> c t h w"))


def _uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Checks and atomic files


def _check_file(path: Path, what: str) -> None:
    """Refuse a missing, non-regular or empty file before any decoder sees it."""
    if not path.exists():
        raise MediaError(f"{what} file not found: {path}")
    if not path.is_file():
        raise MediaError(f"{path} is not a file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path.name}: the file is empty (0 bytes).")


def _check_pixel_count(width: int, height: int, what: str, name: str | None = None) -> None:
    """Refuse sizes whose decoded pixels could exhaust memory (decompression bombs)."""
    if width * height > MAX_PIXELS:
        label = f"{name}: the {what}" if name else f"the {what}"
        raise MediaError(
            f"{label} is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} MP limit; resize it first."
        )


def _check_min_size(width: int, height: int, what: str, name: str | None = None) -> None:
    """Refuse images too small to resize meaningfully."""
    if width < MIN_SIDE or height < MIN_SIDE:
        label = f"{name}: the {what}" if name else f"the {what}"
        raise MediaError(f"{label} is too small ({width}x{height}); it must be at least {MIN_SIDE}x{MIN_SIDE} pixels.")
