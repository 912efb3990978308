"""Per-request options: one frozen, validated object for every way in (studio, CLI, gradio_client).

`GenerationOptions` is what a caller asks for (None means "the preset's default"); `resolve_options` checks it
against a preset and returns `ResolvedOptions`, where every value is concrete. Each problem gets one clear message.
Nothing here imports torch, so the studio can validate before queueing.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, fields, replace

from pipelines.sizes import get_image_size, round_up
from pipelines.text import has_segment_prompts, segment_prompts

MODES = ("t2v", "i2v", "loop", "extend")
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MOTION_SCORES = tuple(range(1, 8))
MAX_PROMPT_CHARS = 20_000
MAX_SEGMENTS = 8  # Extend: each segment continues from the last one's frames


class OptionsError(ValueError):
    """A request that cannot run as given; the message says what to change."""


@dataclass(frozen=True)
class GenerationOptions:
    mode: str = "t2v"  # t2v | i2v | loop | extend
    prompt: str = ""
    negative_prompt: str = ""
    resolution: str | None = None
    aspect_ratio: str | None = None
    height: int | None = None  # explicit size instead of resolution + aspect ratio
    width: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    motion_score: int | str | None = None  # 1..7, or "dynamic" to ask the LLM
    num_steps: int | None = None
    guidance: float | None = None
    guidance_img: float | None = None
    text_osci: bool = True
    image_osci: bool = True
    scale_temporal_osci: bool = True
    shift: bool = True
    flow_shift: float | None = None
    seed: int | None = None  # None: a random seed, reported back
    references: tuple[str, ...] = ()  # image paths (i2v, loop) or one video path (extend)
    i2v_position: str = "head"  # head: the image is the first frame; tail: the last
    extend_direction: str = "forward"  # forward: continue after the clip; backward: lead into it
    extend_easy: bool = False  # condition on 65 frames instead of 33
    segments: int = 1  # extend: repeat the extension, each segment continuing from the video so far
    refine: bool = False  # refine the prompt with the configured LLM
    image_first: bool = False  # t2v: make the first frame (t2i), then animate it (i2v)
    name: str | None = None  # optional file name part (sanitised)

    def to_dict(self) -> dict:
        return {**asdict(self), "references": list(self.references)}

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OptionsError(f"unknown options: {', '.join(sorted(unknown))}")
        data = dict(data)
        if "references" in data:
            data["references"] = tuple(data["references"] or ())
        return cls(**data)


@dataclass(frozen=True)
class ResolvedOptions:
    """Every value concrete and checked; `cond_type` is the upstream condition name."""

    mode: str
    cond_type: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    fps: int
    motion_score: int | str
    num_steps: int
    guidance: float
    guidance_img: float
    text_osci: bool
    image_osci: bool
    scale_temporal_osci: bool
    shift: bool
    flow_shift: float | None
    seed: int | None
    references: tuple[str, ...]
    reference_frames: int  # clip frames the condition uses (extend), else 0
    segments: int  # extension segments (1 outside Extend)
    segment_prompts: tuple[str, ...]  # the prompt of each segment (the same one unless `|k|` markers are used)
    refine: bool
    image_first: bool
    name: str | None
    resolution: str | None
    aspect_ratio: str | None

    @property
    def has_condition(self) -> bool:
        """Whether sampling sees a reference (i2v, loop, extend, and t2v's image-first second step): the image
        guidance's extra branch runs."""
        return self.cond_type != "t2v" or self.image_first

    def to_dict(self) -> dict:
        return {**asdict(self), "references": list(self.references)}


def nearest_valid_frames(n: int, max_frames: int) -> list[int]:
    """The 4k+1 frame counts closest to n, within 1..max_frames."""
    below = max(1, (n - 1) // 4 * 4 + 1)
    candidates = sorted({min(below, max_frames), min(below + 4, max_frames)})
    return [c for c in candidates if (c - 1) % 4 == 0]


def frames_for_seconds(seconds: float, fps: int, max_frames: int) -> int:
    """Duration -> frame count snapped to 4k+1 (rounded to the nearest), clamped to 1..max_frames."""
    k = max(0, round((seconds * fps - 1) / 4))
    return min(4 * k + 1, (max_frames - 1) // 4 * 4 + 1)


def _finite(name: str, value, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise OptionsError(f"{name} must be a finite number, got {value}")
    if not low <= value <= high:
        raise OptionsError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


def _whole(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise OptionsError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise OptionsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _cond_type(opts: GenerationOptions) -> str:
    if opts.mode == "t2v":
        return "t2v"
    if opts.mode == "i2v":
        if opts.i2v_position not in ("head", "tail"):
            raise OptionsError("image position must be 'head' (first frame) or 'tail' (last frame)")
        return f"i2v_{opts.i2v_position}"
    if opts.mode == "loop":
        return "i2v_loop"
    if opts.extend_direction not in ("forward", "backward"):
        raise OptionsError("extension direction must be 'forward' or 'backward'")
    return ("v2v_head" if opts.extend_direction == "forward" else "v2v_tail") + ("_easy" if opts.extend_easy else "")


def _check_references(opts: GenerationOptions, cond_type: str) -> None:
    refs = [r for r in opts.references if r]
    if opts.mode == "i2v" and len(refs) != 1:
        raise OptionsError("Image to video needs exactly one image: upload one")
    if opts.mode == "loop" and len(refs) not in (1, 2):
        raise OptionsError("Loop needs one image (used as first and last frame) or two images (first, last)")
    if opts.mode == "extend" and len(refs) != 1:
        raise OptionsError("Extend needs one video clip: upload one or send a result to Extend")
    if opts.mode == "t2v" and refs:
        raise OptionsError("Text to video takes no reference; use Image to video for an image")


def _size(opts: GenerationOptions, preset) -> tuple[int, int, str | None, str | None]:
    sampling = preset.sampling
    if opts.height is not None or opts.width is not None:
        if opts.height is None or opts.width is None:
            raise OptionsError("give both height and width, or neither")
        h, w = _whole("height", opts.height, 16, 8192), _whole("width", opts.width, 16, 8192)
        if h % 16 or w % 16:
            raise OptionsError(f"height and width must be multiples of 16, got {h}x{w} "
                               f"(try {round_up(h)}x{round_up(w)})")
        resolution = aspect_ratio = None
    else:
        resolution = opts.resolution or sampling.resolution
        aspect_ratio = opts.aspect_ratio or sampling.aspect_ratio
        if resolution not in sampling.resolutions:
            raise OptionsError(f"resolution {resolution!r} is not offered by this model; "
                               f"choose one of {', '.join(sampling.resolutions)}")
        try:
            h, w = get_image_size(resolution, aspect_ratio)
        except ValueError as exc:
            raise OptionsError(str(exc)) from None
        h, w = round_up(h), round_up(w)
    if h * w > sampling.max_pixels:
        raise OptionsError(f"{h}x{w} is too large for this model (at most {sampling.max_pixels} pixels per frame)")
    return h, w, resolution, aspect_ratio


def resolve_options(opts: GenerationOptions, preset) -> ResolvedOptions:
    """Fill preset defaults and validate; raises OptionsError with one clear message."""
    if opts.mode not in MODES:
        raise OptionsError(f"unknown mode {opts.mode!r}; expected one of {', '.join(MODES)}")
    prompt = (opts.prompt or "").strip()
    if not prompt:
        raise OptionsError("the prompt is empty: describe the video you want")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise OptionsError(f"the prompt is {len(prompt)} characters long; keep it under {MAX_PROMPT_CHARS}")
    cond_type = _cond_type(opts)
    _check_references(opts, cond_type)
    sampling = preset.sampling
    h, w, resolution, aspect_ratio = _size(opts, preset)
    num_frames = sampling.num_frames if opts.num_frames is None else _whole("number of frames", opts.num_frames,
                                                                            1, 100_000)
    if num_frames > sampling.max_frames:
        raise OptionsError(f"{num_frames} frames is more than this model's limit of {sampling.max_frames}")
    if (num_frames - 1) % 4:
        near = " or ".join(map(str, nearest_valid_frames(num_frames, sampling.max_frames)))
        raise OptionsError(f"the number of frames must be 4k+1 (1, 5, 9, ..., 33, ...); {num_frames} is not: "
                           f"try {near}")
    reference_frames = 0
    if cond_type.startswith("v2v"):
        reference_frames = 65 if cond_type.endswith("_easy") else 33
        if num_frames <= reference_frames:
            raise OptionsError(f"extending needs more than the {reference_frames} conditioning frames: "
                               f"set the number of frames to at least {reference_frames + 4}")
    segments = _whole("segments", opts.segments, 1, MAX_SEGMENTS)
    if segments > 1 and opts.mode != "extend":
        raise OptionsError("only Extend runs in segments; use one segment for other modes")
    if has_segment_prompts(prompt) and opts.mode != "extend":
        raise OptionsError("per-segment prompts (|0|...|1|...) are for Extend in segments; write one plain prompt")
    try:
        per_segment = tuple(segment_prompts(prompt, segments))
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    motion = opts.motion_score if opts.motion_score is not None else sampling.motion_score
    if motion != "dynamic":
        motion = _whole("motion score", motion, 1, 7)
    seed = None if opts.seed is None or opts.seed == -1 else _whole("seed", opts.seed, 0, MAX_SEED)
    return ResolvedOptions(
        mode=opts.mode, cond_type=cond_type, prompt=prompt, negative_prompt=(opts.negative_prompt or "").strip(),
        height=h, width=w, num_frames=num_frames,
        fps=_whole("fps", opts.fps if opts.fps is not None else sampling.fps, 1, 60), motion_score=motion,
        num_steps=_whole("steps", opts.num_steps if opts.num_steps is not None else sampling.num_steps, 1,
                         MAX_STEPS),
        guidance=_finite("guidance", opts.guidance if opts.guidance is not None else sampling.guidance, 0,
                         MAX_GUIDANCE),
        guidance_img=_finite("image guidance", opts.guidance_img if opts.guidance_img is not None
                             else sampling.guidance_img, 0, MAX_GUIDANCE),
        text_osci=bool(opts.text_osci), image_osci=bool(opts.image_osci),
        scale_temporal_osci=bool(opts.scale_temporal_osci), shift=bool(opts.shift),
        flow_shift=None if opts.flow_shift is None else _finite("flow shift", opts.flow_shift, 0.01, 100),
        seed=seed, references=tuple(r for r in opts.references if r), reference_frames=reference_frames,
        segments=segments, segment_prompts=per_segment, refine=bool(opts.refine),
        image_first=bool(opts.image_first) and opts.mode == "t2v", name=opts.name,
        resolution=resolution, aspect_ratio=aspect_ratio)


def draw_seed() -> int:
    """A fresh random seed in the valid range (0 .. MAX_SEED)."""
    return secrets.randbelow(MAX_SEED + 1)


def with_seed(opts: ResolvedOptions, seed: int) -> ResolvedOptions:
    return replace(opts, seed=seed)
