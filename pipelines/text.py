"""Prompt text helpers: the FPS and motion-score suffixes Open-Sora 2.0 appends to captions.

Two formats exist and must not be mixed up (facts §4.3):

* inference: ``"<prompt>. 24 FPS. 4 motion score."`` (``add_fps_info_to_text`` then ``add_motion_score_to_text``);
* training:  ``"<caption> 24 FPS, 4 motion score."`` (``format_training_caption``, one sentence, comma-joined).

The inference helpers reproduce upstream's quirks on purpose, because the released weights were prompted that way:
the FPS helper strips the text and adds a period, the motion-score helper does neither.
"""

from __future__ import annotations

import math
import re
from numbers import Real

# Upstream's test for "this prompt already carries an FPS suffix": case-sensitive, period required, at the very end.
_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")
# A motion score given as text must look like a plain number, so "dynamic" or "4 " never reach the prompt unnoticed.
_NUMERIC_TEXT = re.compile(r"\d+(?:\.\d+)?")


def ensure_sentence_ends_with_period(sentence: str) -> str:
    """Strip surrounding whitespace and append "." unless the text already ends with one."""
    sentence = sentence.strip()
    if not sentence.endswith("."):
        sentence = sentence + "."
    return sentence


def check_fps_added(sentence: str) -> bool:
    """Return True when the text already ends with an upstream-style ``"<n> FPS."`` suffix."""
    return _FPS_SUFFIX.search(sentence) is not None


def add_fps_info_to_text(texts: list[str], fps: int) -> list[str]:
    """Append ``" <fps> FPS."`` to each text (after stripping and adding a period), unless one is already there."""
    _check_fps(fps)
    out = []
    for text in texts:
        text = ensure_sentence_ends_with_period(text)
        if not check_fps_added(text):
            text = f"{text} {fps} FPS."
        out.append(text)
    return out


def add_motion_score_to_text(texts: list[str], motion_score: int | float | str) -> list[str]:
    """Append ``" <score> motion score."`` to each text verbatim (no strip), as upstream does."""
    _check_motion_score(motion_score)
    return [f"{text} {motion_score} motion score." for text in texts]


def build_prompt(prompt: str, fps: int, motion_score: int | float | str | None) -> str:
    """Return the final inference prompt: FPS suffix first, then the motion score (skipped when None)."""
    (text,) = add_fps_info_to_text([prompt], fps)
    if motion_score is None:
        return text
    (text,) = add_motion_score_to_text([text], motion_score)
    return text


def map_target_fps(fps: float, max_fps: float = 24) -> tuple[float, int]:
    """Map a clip's fps to (fps actually trained on, frame sampling interval) so it stays below ``max_fps``.

    NaN (no fps known) maps to ``(0, 1)``; slower clips keep their fps; faster ones are subsampled by
    ``ceil(fps / max_fps)`` and report the floored resulting rate (30 -> (15, 2), 60 -> (20, 3)).
    """
    if max_fps <= 0:
        raise ValueError(f"max_fps must be positive, got {max_fps}")
    if math.isnan(fps):
        return 0, 1
    if fps < max_fps:
        return fps, 1
    interval = math.ceil(fps / max_fps)
    return math.floor(fps / interval), interval


def format_training_caption(caption: str, fps: float | None, motion_score: float | None, max_fps: float = 24) -> str:
    """Return the training caption ``"<caption> <fps> FPS, <score> motion score."``; missing parts are left out.

    ``fps`` goes through ``map_target_fps`` (a NaN/None/0 fps drops the FPS part); ``motion_score`` is rounded
    half up as upstream does with its VMAF motion score (None/NaN drops it). With neither part, the caption is
    returned unchanged.
    """
    parts = []
    if fps is not None:
        new_fps, _ = map_target_fps(fps, max_fps)
        if new_fps != 0:
            parts.append(f"{new_fps} FPS")
    if motion_score is not None and not math.isnan(motion_score):
        parts.append(f"{int(motion_score + 0.5)} motion score")
    if not parts:
        return caption
    return caption + " " + ", ".join(parts) + "."


def _check_fps(fps: int) -> None:
    if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")


def _check_motion_score(motion_score: int | float | str) -> None:
    if isinstance(motion_score, bool):
        raise ValueError(f"motion score must be a number, got {motion_score!r}")
    if isinstance(motion_score, Real):
        if not math.isfinite(motion_score):
            raise ValueError(f"motion score must be a finite number, got {motion_score!r}")
        return
    if isinstance(motion_score, str) and _NUMERIC_TEXT.fullmatch(motion_score):
        return
    # "dynamic" is a valid upstream setting, but it needs an LLM: the caller resolves it with
    # prompt_refine.ask_motion_score first and passes the number here.
    raise ValueError(
        f"motion score must be a number or a numeric string such as '4', got {motion_score!r} "
        "(resolve 'dynamic' with prompt_refine.ask_motion_score first)"
    )


# Open-Sora's multi-prompt syntax for runs in segments: "|0|a red circle|2|a blue circle".
_SEGMENT_MARKER = re.compile(r"\|(\d+)\|")


def has_segment_prompts(prompt: str) -> bool:
    """True when the prompt uses the `|k|text` per-segment syntax (it starts with a marker)."""
    return _SEGMENT_MARKER.match(prompt.strip()) is not None


def strip_segment_markers(text: str) -> str:
    """`text` with any `|k|` markers taken out (one line): for text that must stay one prompt, such as an LLM's
    refinement of one segment's piece, which would otherwise split into new segments when read back."""
    return " ".join(_SEGMENT_MARKER.sub(" ", text).split())


def split_segment_markers(prompt: str) -> list[tuple[int | None, str]]:
    """The prompt's pieces as written: [(None, prompt)] for a plain prompt, else [(k, text), ...] (unchecked)."""
    text = prompt.strip()
    if not has_segment_prompts(text):
        return [(None, text)]
    parts = _SEGMENT_MARKER.split(text)[1:]  # [k0, text0, k1, text1, ...] (the text before |0| is empty)
    return [(int(k), piece.strip()) for k, piece in zip(parts[0::2], parts[1::2])]


def segment_prompts(prompt: str, segments: int) -> list[str]:
    """The prompt of every segment (a list of `segments` strings).

    A plain prompt serves every segment. With markers, `|k|text` starts `text` at segment k (counting from 0) and
    it lasts until the next marker: `"|0|a red circle|2|a blue circle"` over 4 segments gives red, red, blue, blue.
    Raises ValueError, naming the problem, for markers that do not start at 0, do not increase, name a segment
    past the last, or carry no text.
    """
    pieces = split_segment_markers(prompt)
    if pieces[0][0] is None:
        return [pieces[0][1]] * segments
    starts, texts = [start for start, _ in pieces], [piece for _, piece in pieces]
    if starts[0] != 0:
        raise ValueError(f"per-segment prompts start with |0| (the first segment), not |{starts[0]}|")
    for before, after in zip(starts, starts[1:]):
        if after <= before:
            raise ValueError(f"per-segment markers must increase: |{after}| comes after |{before}|")
    if starts[-1] >= segments:
        raise ValueError(f"the prompt sets segment {starts[-1]} (|{starts[-1]}|, counting from 0) but only "
                         f"{segments} segment(s) run: set {starts[-1] + 1} or more segments")
    for start, piece in zip(starts, texts):
        if not piece:
            raise ValueError(f"the text after |{start}| is empty")
    bounds = starts[1:] + [segments]
    return [piece for start, end, piece in zip(starts, bounds, texts) for _ in range(end - start)]
