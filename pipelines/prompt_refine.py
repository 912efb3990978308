"""Prompt refinement and motion-score estimation through any OpenAI-compatible chat endpoint.

Unlike upstream, a failure is never silent: every call returns what went wrong, and the caller decides whether to
fall back to the original prompt. The API key goes only into the client (the Authorization header); it is masked in
``repr`` and scrubbed from every error message, since servers sometimes echo it back.
"""

from __future__ import annotations

import base64
import io
import logging
import mimetypes
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import openai
from PIL import Image, UnidentifiedImageError

from pipelines.text import strip_segment_markers

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o"
OPENAI_BASE_URL = "https://api.openai.com/v1"
# Local servers (Ollama, vLLM, llama.cpp) accept any key, but the client refuses to start without one.
_PLACEHOLDER_KEY = "not-needed"
# i2v: the image is the first frame; i2v_tail: the last; i2v_pair: two images, the first and the last frame
REFINE_KINDS = ("t2v", "t2i", "i2v", "i2v_tail", "i2v_pair")
RefineKind = Literal["t2v", "t2i", "i2v", "i2v_tail", "i2v_pair"]
# The studio's motion slider runs 1..7 because the Shapes-world default is trained on scores 1 (still) to 7
# (fastest); upstream's scale goes to 15, so answers up to 15 are still read, then capped at 7.
MOTION_SCORE_MIN, MOTION_SCORE_MAX = 1, 7
_UPSTREAM_MOTION_SCORE_MAX = 15
# A vision model downsamples anyway; this keeps the base64 payload small.
MAX_IMAGE_SIDE = 1024
_SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_MAX_ERROR_CHARS = 300

_STYLE_RULES = (
    "Keep every colour, shape, motion direction, speed and background word the user gave, and do not contradict "
    "them. Write plain English, present tense, one paragraph of at most 60 words. Reply with the caption only: "
    "no preamble, no quotes, no lists, no frame rate or score."
)
_SYSTEM_PROMPTS: dict[str, str] = {
    "t2v": "You turn a short idea into a caption for a text-to-video model. Describe what is seen and how it moves "
    "over the clip, adding only concrete visual detail. " + _STYLE_RULES,
    "t2i": "You turn a short idea into a caption for the first frame of a video: describe the still scene so that "
    "the motion to come is clear (for example 'about to move left'), with no camera cuts. " + _STYLE_RULES,
    "i2v": "You write a caption for an image-to-video model. The attached image is the first frame. Describe that "
    "scene directly (what is where, colours, background) and how it moves next, following the user's text. "
    + _STYLE_RULES,
    "i2v_tail": "You write a caption for an image-to-video model. The attached image is the last frame: the video "
    "ends on it. Describe that scene (what is where, colours, background) and the motion that leads up to it, "
    "following the user's text. " + _STYLE_RULES,
    "i2v_pair": "You write a caption for an image-to-video model. The first attached image is the first frame and "
    "the second is the last frame: the video goes from one to the other. Describe the scene (what is where, "
    "colours, background) and the motion that takes the first frame to the last, following the user's text. "
    + _STYLE_RULES,
}


def refine_kind(cond_type: str, images: int = 1) -> RefineKind:
    """The refinement a condition type asks for: the image as first frame (i2v_head, and a one-image loop, which
    starts on it), as last frame (i2v_tail), two images as first and last frame (a two-image loop), or none (t2v,
    extension)."""
    if cond_type == "i2v_tail":
        return "i2v_tail"
    if cond_type == "i2v_loop" and images == 2:
        return "i2v_pair"
    return "i2v" if cond_type.startswith("i2v") else "t2v"


def refine_images(kind: RefineKind) -> int:
    """How many reference images a refinement kind sends to the vision model."""
    return 2 if kind == "i2v_pair" else (1 if kind.startswith("i2v") else 0)


_MOTION_SYSTEM_PROMPT = (
    "Rate how much motion a video described by the user should have, on a scale from 1 to 7: 1 means nothing "
    "moves, 2 very slow drift, 4 a steady walk-like pace, 7 very fast motion. Reply with the integer only."
)


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to reach the chat endpoint; ``base_url=None`` means OpenAI itself."""

    base_url: str | None = None
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise ValueError("LLM model name must not be empty")
        if not self.timeout_s > 0:
            raise ValueError(f"LLM timeout must be positive, got {self.timeout_s}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"LLM max_retries must be a non-negative integer, got {self.max_retries!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig:
        """Read OPENSORA_LLM_BASE_URL (or OPENAI_BASE_URL), OPENSORA_LLM_MODEL and OPENAI_API_KEY."""
        env = os.environ if environ is None else environ
        base_url = env.get("OPENSORA_LLM_BASE_URL") or env.get("OPENAI_BASE_URL") or None
        model = env.get("OPENSORA_LLM_MODEL") or DEFAULT_MODEL
        return cls(base_url=base_url, model=model, api_key=env.get("OPENAI_API_KEY") or None)

    @property
    def is_configured(self) -> bool:
        """True when a key or a base URL (a local server needs no key) is present."""
        return bool(self.api_key) or bool(self.base_url)

    def __repr__(self) -> str:
        key = "'***'" if self.api_key else "None"
        return (
            f"LLMConfig(base_url={self.base_url!r}, model={self.model!r}, api_key={key}, "
            f"timeout_s={self.timeout_s!r}, max_retries={self.max_retries!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class RefineResult:
    """Outcome of one refinement: on failure ``refined == original`` and ``error`` says why."""

    original: str
    refined: str
    ok: bool
    error: str | None = None


class LLMCallError(Exception):
    """A chat request failed; the message is safe to show (no key)."""


def image_to_data_url(path: str | os.PathLike, max_side: int = MAX_IMAGE_SIDE) -> str:
    """Return the image as a ``data:<mime>;base64,...`` URL, re-encoded as PNG when large or unusual."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            if image_format in _SENT_AS_IS and max(image.size) <= max_side:
                mime = _SENT_AS_IS[image_format]
            else:
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data, mime = buffer.getvalue(), "image/png"
    except (UnidentifiedImageError, OSError) as exc:
        guessed = mimetypes.guess_type(path.name)[0] or "unknown type"
        raise ValueError(f"not a readable image ({guessed}): {path}") from exc
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def build_refine_messages(prompt: str, kind: RefineKind, image_url: str | Sequence[str] | None = None) -> list[dict]:
    """Return the chat messages for one refinement request (each image in an ``image_url`` part, in order)."""
    user_text = f"User idea: {prompt.strip() or '(none: describe the image)'}"
    if not kind.startswith("i2v"):
        return [{"role": "system", "content": _SYSTEM_PROMPTS[kind]}, {"role": "user", "content": user_text}]
    urls = [image_url] if isinstance(image_url, str) else list(image_url or ())
    parts = [{"type": "text", "text": user_text}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]
    return [{"role": "system", "content": _SYSTEM_PROMPTS[kind]}, {"role": "user", "content": parts}]


def refine_prompt(
    prompt: str, kind: RefineKind, config: LLMConfig,
    image_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> RefineResult:
    """Ask the LLM for a more descriptive prompt; the i2v kinds also send the image (``i2v_pair``: a sequence of
    the first and the last frame's images) to a vision model."""
    if kind not in REFINE_KINDS:
        raise ValueError(f"unknown refinement kind {kind!r}; valid: {', '.join(REFINE_KINDS)}")
    paths = [] if image_path is None else (
        [image_path] if isinstance(image_path, (str, os.PathLike)) else list(image_path))
    needed = refine_images(kind)
    if needed and len(paths) != needed:
        raise ValueError(f"{kind} refinement needs {'the reference image' if needed == 1 else f'{needed} images'}")
    if not needed and paths:
        raise ValueError(f"an image is only sent for i2v refinement, not {kind}")
    if not needed and not prompt.strip():
        raise ValueError("the prompt is empty: write a few words to refine")
    if not config.is_configured:
        return RefineResult(prompt, prompt, ok=False, error=_not_configured_message())
    messages = build_refine_messages(prompt, kind, [image_to_data_url(path) for path in paths])
    try:
        answer = _chat(config, messages, max_tokens=250)
    except LLMCallError as exc:
        logger.warning("prompt refinement (%s) failed: %s", kind, exc)
        return RefineResult(prompt, prompt, ok=False, error=str(exc))
    refined = strip_segment_markers(answer)  # one prompt in, one prompt out: no |k| segment markers
    if not refined:
        return RefineResult(prompt, prompt, ok=False, error="the LLM answered with segment markers only")
    return RefineResult(prompt, refined, ok=True, error=None)


def ask_motion_score(prompt: str, config: LLMConfig) -> tuple[int | None, str | None]:
    """Ask the LLM for a motion score; return (score in 1..7, None) or (None, reason).

    The studio's motion scale is 1–7 (the default Shapes-world model is trained on scores 1 = still to
    7 = fastest), so an answer of 8..15 (upstream's wider scale) is capped at 7; anything else is an error.
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty: nothing to score")
    if not config.is_configured:
        return None, _not_configured_message()
    messages = [{"role": "system", "content": _MOTION_SYSTEM_PROMPT}, {"role": "user", "content": prompt.strip()}]
    try:
        answer = _chat(config, messages, max_tokens=20)
    except LLMCallError as exc:
        logger.warning("motion score request failed: %s", exc)
        return None, str(exc)
    return parse_motion_score(answer)


def parse_motion_score(answer: str) -> tuple[int | None, str | None]:
    """Read the first number in an LLM answer as a motion score; return (score, None) or (None, reason)."""
    match = re.search(r"[-+]?\d+(?:\.\d+)?", answer)
    if match is None:
        return None, f"the LLM answered without a motion score: {answer[:80]!r}"
    value = float(match.group())
    if not MOTION_SCORE_MIN <= value <= _UPSTREAM_MOTION_SCORE_MAX:
        expected = f"{MOTION_SCORE_MIN}..{MOTION_SCORE_MAX}"
        return None, f"the LLM's motion score {match.group()} is unusable (expected {expected})"
    score = min(int(value + 0.5), MOTION_SCORE_MAX)
    if score != int(value + 0.5):
        logger.info("LLM motion score %s capped at %d", match.group(), MOTION_SCORE_MAX)
    return score, None


def _not_configured_message() -> str:
    return "no LLM configured: set OPENAI_API_KEY, or OPENSORA_LLM_BASE_URL for a local OpenAI-compatible server"


def _chat(config: LLMConfig, messages: list[dict], max_tokens: int) -> str:
    """Send one chat request (the client retries timeouts, 429 and 5xx) and return the cleaned answer text."""
    client = openai.OpenAI(
        api_key=config.api_key or _PLACEHOLDER_KEY,
        base_url=config.base_url or OPENAI_BASE_URL,
        timeout=config.timeout_s,
        max_retries=config.max_retries,
        # Never follow redirects: a chat endpoint has no reason to send one, and a public studio checks only the
        # address it was given (studio.controls.public_endpoint_problem), not where a redirect would lead.
        http_client=openai.DefaultHttpxClient(follow_redirects=False),
    )
    logger.info("LLM request to %s (model %s)", config.base_url or OPENAI_BASE_URL, config.model)
    try:
        with client:
            completion = client.chat.completions.create(
                model=config.model, messages=messages, temperature=0.01, top_p=0.7, max_tokens=max_tokens
            )
    except openai.APITimeoutError:
        raise LLMCallError(_redact(_timeout_message(config), config.api_key)) from None
    except openai.APIConnectionError as exc:
        raise LLMCallError(_redact(f"could not reach the LLM server: {exc}", config.api_key)) from None
    except openai.APIStatusError as exc:
        raise LLMCallError(_redact(_status_detail(exc), config.api_key)) from None
    except (openai.OpenAIError, ValueError) as exc:  # JSON that does not parse surfaces as a ValueError
        raise LLMCallError(_redact(f"malformed answer from the LLM server: {exc}", config.api_key)) from None
    return _answer_text(completion)


def _timeout_message(config: LLMConfig) -> str:
    attempts = config.max_retries + 1
    return f"the LLM did not answer within {config.timeout_s:g} s ({attempts} attempt{'s' * (attempts > 1)})"


def _answer_text(completion: object) -> str:
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise LLMCallError("malformed answer from the LLM server: the reply has no choices")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if content is not None and not isinstance(content, str):
        raise LLMCallError("malformed answer from the LLM server: the message content is not text")
    # One line, no wrapping quotes: the text encoders see a single caption.
    text = " ".join((content or "").split()).strip("\"'“”")
    if not text:
        raise LLMCallError("the LLM returned an empty answer")
    return text


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"the LLM server answered HTTP {exc.status_code}: {message or exc.message}"


def _redact(text: str, api_key: str | None) -> str:
    if api_key:
        text = text.replace(api_key, "***")
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text
