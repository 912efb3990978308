"""Resolution and aspect-ratio buckets, following Open-Sora 2.0's ``get_image_size`` (facts §6.1).

A resolution names a pixel budget P: ``"<N>px"`` means N² pixels (``"256px"`` = 65,536), ``"<N>p"`` means a 16:9
frame N pixels tall (N²·16/9). An aspect ratio is a ``"width:height"`` key. For a budget P and a ratio w:h,

    width  = floor(sqrt(P·w/h) / D)·D
    height = floor((P / width) / D)·D

with D the autoencoder's spatial compression (16 for the released model). Sizes are returned as (height, width).
"""

from __future__ import annotations

import math
import re
from types import MappingProxyType

DEFAULT_SPATIAL_COMPRESSION = 16
# Samplers need sides divisible by this (patch 2 on a /8 latent), whatever the bucket rule produced.
SAMPLING_MULTIPLE = 16

# Upstream's base list, written width:height; landscape first, except "9:16" and "5:8", which are portrait.
ASPECT_RATIO_LD_LIST: tuple[str, ...] = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")


def flip_aspect_ratio(name: str) -> str:
    """Return the transposed key, e.g. "2.39:1" -> "1:2.39"."""
    width, height = name.split(":")
    return f"{height}:{width}"


def parse_aspect_ratio(name: str) -> tuple[float, float]:
    """Return (width_part, height_part) of a "w:h" key, or raise ValueError."""
    try:
        width_text, height_text = name.split(":")
        width, height = float(width_text), float(height_text)
    except (AttributeError, ValueError):
        width = height = math.nan
    if not (0 < width < math.inf and 0 < height < math.inf):
        raise ValueError(f"aspect ratio must look like 'width:height' (e.g. '16:9'), got {name!r}")
    return width, height


def _build_aspect_ratios() -> dict[str, float]:
    # Same key order as upstream's dict: the base list, then the flips that are new. A flip that already exists
    # ("9:16" <-> "16:9", "1:1") overwrites the existing entry but keeps its position, exactly like dict.update.
    ratios: dict[str, float] = {}
    flips: dict[str, float] = {}
    for name in ASPECT_RATIO_LD_LIST:
        width, height = parse_aspect_ratio(name)
        ratios[name] = height / width
        flips[flip_aspect_ratio(name)] = width / height
    ratios.update(flips)
    return ratios


# name -> height/width, in upstream's dict order (15 keys).
ASPECT_RATIOS: MappingProxyType[str, float] = MappingProxyType(_build_aspect_ratios())


def round_up(x: int, multiple: int = SAMPLING_MULTIPLE) -> int:
    """Round ``x`` up to the next multiple of ``multiple``."""
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return -(-int(x) // multiple) * multiple


def get_num_pixels(resolution: str) -> int:
    """Return the pixel budget of "<N>px" (N²) or "<N>p" (N²·16/9), or raise ValueError."""
    text = resolution if isinstance(resolution, str) else ""
    match = re.fullmatch(r"([1-9]\d*)(px|p)", text)
    if match is None:
        raise ValueError(
            f"unknown resolution {resolution!r}: use '<N>px' (e.g. '256px', '768px') or '<N>p' (e.g. '360p')"
        )
    side = int(match.group(1))
    if match.group(2) == "px":
        return side * side
    return int(side * side / 9 * 16)  # "<N>p" is a 16:9 frame N pixels tall, computed as upstream does


def _size_for_ratio(num_pixels: int, name: str, training: bool, d: int) -> tuple[int, int]:
    width_part, height_part = parse_aspect_ratio(name)
    width = int(math.sqrt(num_pixels * (width_part / height_part)) // d) * d
    height = int((num_pixels / width) // d) * d if width > 0 else 0
    if training:
        # Try one step of D on each side and keep the strictly closest to the budget (first wins on ties);
        # all four candidates come from the un-nudged size.
        best = abs(height * width - num_pixels)
        for h, w in ((height - d, width), (height + d, width), (height, width - d), (height, width + d)):
            if abs(h * w - num_pixels) < best:
                height, width, best = h, w, abs(h * w - num_pixels)
    return height, width


def get_aspect_ratio_sizes(
    num_pixels: int, training: bool = False, spatial_compression: int = DEFAULT_SPATIAL_COMPRESSION
) -> dict[str, tuple[int, int]]:
    """Return {aspect key: (H, W)} for a pixel budget, in upstream's key order.

    With ``training=True`` sizes are nudged toward the budget and a ratio whose size repeats an earlier one is
    dropped together with its flip (at 256px: "1.85:1", "5:8", "1:1.85", "8:5").
    """
    d = spatial_compression
    sizes: dict[str, tuple[int, int]] = {}
    flipped: dict[str, tuple[int, int]] = {}
    for name in ASPECT_RATIO_LD_LIST:
        height, width = _size_for_ratio(num_pixels, name, training, d)
        if height <= 0 or width <= 0:
            raise ValueError(f"a budget of {num_pixels} pixels is too small for aspect ratio {name} at D={d}")
        if training and (height, width) in sizes.values():
            continue
        sizes[name] = (height, width)
        flipped[flip_aspect_ratio(name)] = (width, height)
    sizes.update(flipped)
    return sizes


def get_image_size(
    resolution: str,
    aspect_ratio: str,
    training: bool = False,
    spatial_compression: int = DEFAULT_SPATIAL_COMPRESSION,
) -> tuple[int, int]:
    """Return (H, W) for a resolution ("256px", "768px", "64px", ...) and an aspect key ("16:9", ...)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}")
    sizes = get_aspect_ratio_sizes(get_num_pixels(resolution), training, spatial_compression)
    if aspect_ratio not in sizes:
        # Only happens in training mode, where upstream merges ratios that land on the same bucket.
        raise ValueError(
            f"aspect ratio {aspect_ratio!r} shares its training bucket with another ratio at {resolution}; "
            f"valid here: {', '.join(sizes)}"
        )
    return sizes[aspect_ratio]


def sanitized_image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """Return the sampling (H, W): ``get_image_size(training=False)`` rounded up to multiples of 16."""
    height, width = get_image_size(resolution, aspect_ratio, training=False)
    return round_up(height), round_up(width)


def closest_aspect_ratio(height: float, width: float, candidates: tuple[str, ...] | None = None) -> str:
    """Return the aspect key whose height/width is nearest to the image's (first in order wins ties)."""
    if not (height > 0 and width > 0):
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    names = tuple(ASPECT_RATIOS) if candidates is None else tuple(candidates)
    if not names:
        raise ValueError("no candidate aspect ratios given")
    for name in names:
        parse_aspect_ratio(name)
    target = height / width
    # Distance in plain H/W space, as upstream's get_closest_ratio measures it.
    return min(names, key=lambda name: abs(target - _height_over_width(name)))


def _height_over_width(name: str) -> float:
    width, height = parse_aspect_ratio(name)
    return height / width
