"""The procedural Shapes world: specs, a fast renderer, captions and a training dataset.

Definitions follow `shared/reference/shapes-world.md`. A `ShapeSpec` is resolution independent: its positions,
object size and speed are in *world units*, where the world is 64 units across (one unit is one pixel of a 64×64
clip). `render_clip` draws the same scene at any frame size by scaling.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from einops import rearrange

WORLD_SIZE = 64  # world units across a clip; one unit is one pixel at 64×64
FPS = 24
SUPERSAMPLE = 4  # sub-pixels per pixel: positions on a 1/4-px grid are drawn exactly
OBJECT_SIZES = (12, 20)  # inclusive range, world units
MOVING_SCORES = (2, 7)  # inclusive range of motion scores for moving clips
STILL_SCORE = 1
UNITS_PER_FRAME_PER_SCORE = 0.25

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (120, 120, 120),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "still")
# Unit step per frame for each direction, in image coordinates (y grows downward).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}


class ShapesError(ValueError):
    """A Shapes-world request that cannot be honoured (bad field, colour on its own background, ...)."""


@dataclass(frozen=True)
class ShapeSpec:
    """One clip of the Shapes world; positions (object centre) and size are in world units."""

    shape: str
    color: str
    background: str
    direction: str
    motion_score: int
    size: int
    x0: float
    y0: float
    loop: bool = False

    @property
    def speed(self) -> float:
        """World units per frame: 0.25·score when moving, 0 when still."""
        if self.direction == "still":
            return 0.0
        return UNITS_PER_FRAME_PER_SCORE * self.motion_score


@dataclass(frozen=True)
class EvalPrompt:
    """A spec for evaluation with the plain caption that asks for it."""

    spec: ShapeSpec
    caption: str


def check_num_frames(num_frames: int) -> None:
    """Raise ShapesError unless num_frames has the form 4k+1."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or num_frames % 4 != 1:
        raise ShapesError(f"num_frames must be of the form 4k+1 (1, 5, ..., 33, 65), got {num_frames!r}")


def check_frame_size(size: int) -> None:
    """Raise ShapesError unless size is a whole number of pixels, at least 16."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ShapesError(f"frame size must be an integer of at least 16 px, got {size!r}")


def check_spec(spec: ShapeSpec) -> None:
    """Raise ShapesError when a spec breaks the world's rules."""
    if spec.shape not in SHAPES:
        raise ShapesError(f"unknown shape {spec.shape!r}; choose from {SHAPES}")
    if spec.color not in COLORS:
        raise ShapesError(f"unknown colour {spec.color!r}; choose from {tuple(COLORS)}")
    if spec.background not in BACKGROUNDS:
        raise ShapesError(f"unknown background {spec.background!r}; choose from {tuple(BACKGROUNDS)}")
    if spec.direction not in DIRECTIONS:
        raise ShapesError(f"unknown direction {spec.direction!r}; choose from {DIRECTIONS}")
    if spec.color == spec.background:
        raise ShapesError(f"a {spec.color} object on a {spec.background} background would be invisible")
    if not isinstance(spec.motion_score, int) or not isinstance(spec.size, int):
        raise ShapesError(f"motion_score and size must be integers, got {spec.motion_score!r} and {spec.size!r}")
    lo, hi = MOVING_SCORES
    if spec.direction == "still" and spec.motion_score != STILL_SCORE:
        raise ShapesError(f"still clips have motion score {STILL_SCORE}, got {spec.motion_score}")
    if spec.direction != "still" and not lo <= spec.motion_score <= hi:
        raise ShapesError(f"moving clips have motion scores {lo}–{hi}, got {spec.motion_score}")
    if not OBJECT_SIZES[0] <= spec.size <= OBJECT_SIZES[1]:
        raise ShapesError(f"object size must be {OBJECT_SIZES[0]}–{OBJECT_SIZES[1]} units, got {spec.size}")
    c_lo, c_hi = spec.size / 2, WORLD_SIZE - spec.size / 2
    if not (c_lo <= spec.x0 <= c_hi and c_lo <= spec.y0 <= c_hi):
        raise ShapesError(
            f"start centre ({spec.x0}, {spec.y0}) puts a {spec.size}-unit object outside the frame; "
            f"keep both within [{c_lo}, {c_hi}]"
        )


# ----------------------------------------------------------------------------------------------------------- sampling

_FIXABLE = {"shape", "color", "background", "direction", "motion_score", "object_size", "x0", "y0"}


def _choose(rng: random.Random, fixed: dict, key: str, options) -> object:
    if key in fixed:
        if fixed[key] not in options:
            raise ShapesError(f"{key}={fixed[key]!r} is not one of {tuple(options)}")
        return fixed[key]
    return rng.choice(list(options))


def _sample_direction_and_score(rng: random.Random, fixed: dict) -> tuple[str, int]:
    score = fixed.get("motion_score")
    if "direction" not in fixed and score is not None:
        moving = [d for d in DIRECTIONS if d != "still"]
        direction = "still" if score == STILL_SCORE else rng.choice(moving)
    else:
        direction = _choose(rng, fixed, "direction", DIRECTIONS)
    if score is None:
        score = STILL_SCORE if direction == "still" else rng.randint(*MOVING_SCORES)
    return direction, score


def _sample_start(rng: random.Random, travel: float, lo: float, hi: float, sign: int, grid: float) -> float:
    """Start coordinate along one axis, leaving `travel` units of room ahead when the frame allows it."""
    room = hi - lo
    if sign == 0:
        start = rng.uniform(lo, hi)
    elif travel <= room:
        start = rng.uniform(lo, hi - travel) if sign > 0 else rng.uniform(lo + travel, hi)
    else:
        # Not enough room: start near the far side so the first bounce comes as late as it can.
        start = rng.uniform(lo, lo + room / 4) if sign > 0 else rng.uniform(hi - room / 4, hi)
    snapped = round(start / grid) * grid
    return min(max(snapped, math.ceil(lo / grid) * grid), math.floor(hi / grid) * grid)


def sample_spec(rng: random.Random, *, size: int = 64, num_frames: int, loop: bool = False, **fixed) -> ShapeSpec:
    """Draw a random valid spec; any field can be fixed by keyword (`object_size` fixes `ShapeSpec.size`).

    `size` is the frame size the clip will be rendered at: start positions are snapped to its sub-pixel grid so
    motion at 0.25·score px/frame lands exactly on it.
    """
    unknown = set(fixed) - _FIXABLE
    if unknown:
        raise ShapesError(f"cannot fix {sorted(unknown)}; fixable fields are {sorted(_FIXABLE)}")
    check_num_frames(num_frames)
    check_frame_size(size)
    shape = _choose(rng, fixed, "shape", SHAPES)
    if "color" in fixed and "background" not in fixed:
        color = _choose(rng, fixed, "color", COLORS)
        background = rng.choice([b for b in BACKGROUNDS if b != color])
    else:
        background = _choose(rng, fixed, "background", BACKGROUNDS)
        allowed = COLORS if "color" in fixed else [c for c in COLORS if c != background]
        color = _choose(rng, fixed, "color", allowed)  # a fixed clash is reported by check_spec below
    direction, score = _sample_direction_and_score(rng, fixed)
    object_size = fixed.get("object_size", rng.randint(*OBJECT_SIZES))
    speed = 0.0 if direction == "still" else UNITS_PER_FRAME_PER_SCORE * score
    travel = speed * ((num_frames - 1) // 2 if loop else num_frames - 1)
    lo, hi = object_size / 2, WORLD_SIZE - object_size / 2
    grid = WORLD_SIZE / (size * SUPERSAMPLE)
    dx, dy = DIRECTION_VECTORS.get(direction, (0, 0))
    x0 = fixed.get("x0", _sample_start(rng, travel, lo, hi, dx, grid))
    y0 = fixed.get("y0", _sample_start(rng, travel, lo, hi, dy, grid))
    spec = ShapeSpec(shape, color, background, direction, score, object_size, float(x0), float(y0), loop)
    check_spec(spec)
    return spec


# ---------------------------------------------------------------------------------------------------------- rendering

def _inside(shape: str, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """Point-in-shape test for a shape whose bounding box is [0, s]², apex of the triangle at the top."""
    if shape == "circle":
        return (u - s / 2) ** 2 + (v - s / 2) ** 2 <= (s / 2) ** 2
    if shape == "square":
        return (u >= 0) & (u <= s) & (v >= 0) & (v <= s)
    # Upright isosceles triangle, base = height = s: the half-width grows linearly from apex to base.
    return (v >= 0) & (v <= s) & (np.abs(u - s / 2) <= v / 2)


@functools.lru_cache(maxsize=64)
def _coverage_masks(shape: str, size_px: float) -> np.ndarray:
    """Coverage of the sprite for every sub-pixel offset: (SS, SS, B, B) float32 in [0, 1], indexed [fy, fx]."""
    box = math.ceil(size_px) + 2
    centres = (np.arange(box * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel sample centres, in px
    masks = np.empty((SUPERSAMPLE, SUPERSAMPLE, box, box), np.float32)
    for fy, fx in itertools.product(range(SUPERSAMPLE), repeat=2):
        u = centres[None, :] - fx / SUPERSAMPLE
        v = centres[:, None] - fy / SUPERSAMPLE
        hit = _inside(shape, u, v, size_px).astype(np.float32)  # (B·SS, B·SS)
        masks[fy, fx] = hit.reshape(box, SUPERSAMPLE, box, SUPERSAMPLE).mean(axis=(1, 3))
    masks.setflags(write=False)
    return masks


def _reflect(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold an unbounded path into [lo, hi] as a bouncing object would travel it."""
    span = hi - lo
    if span <= 0:
        return np.full_like(u, lo)
    w = np.mod(u - lo, 2 * span)
    return lo + np.where(w <= span, w, 2 * span - w)


def centre_path(spec: ShapeSpec, num_frames: int) -> np.ndarray:
    """Object centre per frame in world units, bounces and loop return included: (T, 2) as (x, y)."""
    t = np.arange(num_frames, dtype=np.float64)
    if spec.loop:
        t = np.minimum(t, num_frames - 1 - t)  # out for half the clip, then back along the same path
    dx, dy = DIRECTION_VECTORS[spec.direction]
    lo, hi = spec.size / 2, WORLD_SIZE - spec.size / 2
    x = _reflect(spec.x0 + dx * spec.speed * t, lo, hi)
    y = _reflect(spec.y0 + dy * spec.speed * t, lo, hi)
    return np.stack([x, y], axis=1)


def render_clip(spec: ShapeSpec, num_frames: int, size: int = 64) -> np.ndarray:
    """Draw a spec as uint8 frames (T, H, W, 3); positions snap to the 1/4-px supersampling grid."""
    check_spec(spec)
    check_num_frames(num_frames)
    check_frame_size(size)
    scale = size / WORLD_SIZE
    size_px = spec.size * scale
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    # One blended sprite box per sub-pixel offset; the background is flat, so pasting whole boxes is exact.
    alpha = _coverage_masks(spec.shape, size_px)[..., None]  # (SS, SS, B, B, 1)
    sprites = np.rint(bg + alpha * (fg - bg)).astype(np.uint8)  # (SS, SS, B, B, 3)
    box = sprites.shape[2]
    left_top = (centre_path(spec, num_frames) - spec.size / 2) * scale  # (T, 2) top-left corner, px
    sub = np.rint(left_top * SUPERSAMPLE).astype(np.int64)  # (T, 2) in sub-pixels
    whole, frac = np.divmod(sub, SUPERSAMPLE)
    frames = np.empty((num_frames, size, size, 3), np.uint8)  # (T, H, W, 3)
    frames[:] = BACKGROUNDS[spec.background]
    for t, ((px, py), (fx, fy)) in enumerate(zip(whole.tolist(), frac.tolist())):
        # The box holds a 1-px empty margin, so it may overhang the far edges; trim it there.
        h, w = min(box, size - py), min(box, size - px)
        frames[t, py:py + h, px:px + w] = sprites[fy, fx, :h, :w]
    return frames


# ----------------------------------------------------------------------------------------------------------- captions

_SHAPE_WORDS = {"circle": ("circle", "ball", "disc"), "square": ("square", "box", "block"),
                "triangle": ("triangle", "wedge")}
_DIRECTION_WORDS = {
    "left": ("left", "to the left", "leftward"), "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward"), "down": ("down", "downward"),
}
_VERBS_ING = ("moving", "sliding", "drifting", "gliding", "traveling")
_VERBS_3RD = ("moves", "slides", "drifts", "glides", "travels")
_MOVING_TEMPLATES = (
    "{a} {color} {shape} {ing} {dir} on a {bg} background",
    "{A} {color} {shape} {third} {dir} across a {bg} background.",
    "{a} {color} {shape} {ing} {dir} over {bg}",
    "{color} {shape} {ing} {dir}, {bg} background",
    "On a {bg} background, {a} {color} {shape} {third} {dir}.",
)
_STILL_TEMPLATES = (
    "a still {color} {shape} on a {bg} background",
    "{A} {color} {shape} sitting still on a {bg} background.",
    "{a} {color} {shape} resting still over {bg}",
    "{color} {shape}, perfectly still, {bg} background",
    "On a {bg} background, {a} {color} {shape} stays still.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(spec: ShapeSpec, rng: random.Random) -> str:
    """A plain English caption with varied wording; it always names colour, shape, direction and background."""
    check_spec(spec)
    templates = _STILL_TEMPLATES if spec.direction == "still" else _MOVING_TEMPLATES
    template = rng.choice(templates)
    words = {
        "color": spec.color, "shape": rng.choice(_SHAPE_WORDS[spec.shape]), "bg": spec.background,
        "a": _article(spec.color), "A": _article(spec.color).capitalize(),
    }
    if spec.direction != "still":
        words |= {"dir": rng.choice(_DIRECTION_WORDS[spec.direction]),
                  "ing": rng.choice(_VERBS_ING), "third": rng.choice(_VERBS_3RD)}
    return template.format(**words)


def caption_with_shape(caption: str, shape: str, new_shape: str) -> str:
    """The caption with its word for `shape` (any synonym) replaced by `new_shape`'s plain name."""
    pattern = r"\b(%s)\b" % "|".join(_SHAPE_WORDS[shape])
    swapped, count = re.subn(pattern, new_shape, caption, count=1, flags=re.IGNORECASE)
    if not count:
        raise ShapesError(f"the caption {caption!r} names no {shape}")
    return swapped


def format_caption_for_training(caption: str, motion_score: int, suffix_fn: Callable | None = None) -> str:
    """Append Open-Sora's training suffix ("… 24 FPS, 4 motion score.") via `pipelines.text` unless given one."""
    if suffix_fn is None:
        from pipelines.text import format_training_caption as suffix_fn  # lazy: text.py is a sibling helper
    return suffix_fn(caption, FPS, motion_score)


# ------------------------------------------------------------------------------------------------------------ dataset

_EVAL_FIELDS = ("shape", "color", "background", "direction")


def _combo_cost(combo: tuple, counts: dict, used: dict) -> int:
    """How over-represented a combination's values already are; repeating a whole combination costs most."""
    return sum(counts[field] for field in zip(_EVAL_FIELDS, combo)) + 1000 * used.get(combo, 0)


def sample_eval_prompts(n: int, seed: int, *, num_frames: int = 33, size: int = 64,
                        loop: bool = False) -> list[EvalPrompt]:
    """n evaluation prompts, greedily balanced over shapes, colours, backgrounds and directions."""
    if n < 0:
        raise ShapesError(f"n must be non-negative, got {n}")
    rng = random.Random(f"shapes-eval:{seed}")
    combos = [c for c in itertools.product(SHAPES, COLORS, BACKGROUNDS, DIRECTIONS) if c[1] != c[2]]
    rng.shuffle(combos)  # ties below go to the earliest, so shuffling randomises them
    values = dict(zip(_EVAL_FIELDS, (SHAPES, COLORS, BACKGROUNDS, DIRECTIONS)))
    counts = {(field, value): 0 for field in _EVAL_FIELDS for value in values[field]}
    used: dict = {}
    prompts = []
    for _ in range(n):
        combo = min(combos, key=lambda c: _combo_cost(c, counts, used))
        used[combo] = used.get(combo, 0) + 1
        for field in zip(_EVAL_FIELDS, combo):
            counts[field] += 1
        shape, color, background, direction = combo
        spec = sample_spec(rng, size=size, num_frames=num_frames, loop=loop, shape=shape, color=color,
                           background=background, direction=direction)
        prompts.append(EvalPrompt(spec, caption_for(spec, rng)))
    return prompts


def object_pixels(video: torch.Tensor, backgrounds: list[str], margin: int = 0) -> torch.Tensor:
    """Where the object is: (B, 1, T, H, W) float, 1 on pixels of `video` ((B, 3, T, H, W) in [-1, 1]) that
    differ from their clip's background colour, 0 elsewhere. With `margin` m the mask also covers background
    within m pixels of the object (a square window, frame by frame)."""
    bg = torch.tensor([BACKGROUNDS[name] for name in backgrounds], dtype=video.dtype, device=video.device)
    bg = bg / 127.5 - 1.0  # (B, 3)
    on_object = ((video - bg[:, :, None, None, None]).abs().amax(dim=1, keepdim=True) > 0.05).to(video.dtype)
    if margin:
        on_object = torch.nn.functional.max_pool3d(on_object, kernel_size=(1, 2 * margin + 1, 2 * margin + 1),
                                                   stride=1, padding=(0, margin, margin))
    return on_object


def twin_shape(shape: str, index: int) -> str:
    """The other shape a clip's twin has: the next one in SHAPES for even indices, the one after for odd, so a pool
    of twins pairs every shape with both others."""
    return SHAPES[(SHAPES.index(shape) + 1 + index % 2) % len(SHAPES)]


class ShapesDataset(torch.utils.data.Dataset):
    """A virtual epoch of Shapes clips, each fully determined by (seed, index). With `twin`, item i is item i of
    the same seed with another shape (`twin_shape`): same colours, size, start and motion, and a caption naming the
    new shape."""

    def __init__(self, length: int, *, num_frames: int = 33, size: int = 64, loop_fraction: float = 0.0,
                 seed: int = 0, suffix_fn: Callable | None = None, twin: bool = False):
        check_num_frames(num_frames)
        check_frame_size(size)
        if length < 1:
            raise ShapesError(f"dataset length must be positive, got {length}")
        if not 0.0 <= loop_fraction <= 1.0:
            raise ShapesError(f"loop_fraction must be within [0, 1], got {loop_fraction}")
        self.length, self.num_frames, self.size = length, num_frames, size
        self.loop_fraction, self.seed, self.suffix_fn = loop_fraction, seed, suffix_fn
        self.twin = twin

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside a dataset of {self.length} clips")
        # A string seed is hashed with SHA-512 by `random`, so items are stable across processes and runs.
        rng = random.Random(f"shapes:{self.seed}:{index}")
        loop = rng.random() < self.loop_fraction
        spec = sample_spec(rng, size=self.size, num_frames=self.num_frames, loop=loop)
        if self.twin:
            spec = dataclasses.replace(spec, shape=twin_shape(spec.shape, index))
        raw_caption = caption_for(spec, rng)
        clip = rearrange(render_clip(spec, self.num_frames, self.size), "t h w c -> c t h w")  # uint8
        # Single-threaded numpy keeps this cheap inside DataLoader workers and on busy machines alike.
        video = np.ascontiguousarray(clip).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return {
            **dataclasses.asdict(spec),
            "video": torch.from_numpy(video),  # (3, T, H, W) in [-1, 1]
            "caption": format_caption_for_training(raw_caption, spec.motion_score, self.suffix_fn),
            "raw_caption": raw_caption,
            "fps": FPS,
        }
