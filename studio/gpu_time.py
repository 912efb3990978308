"""How long to ask Hugging Face ZeroGPU for a request: `spaces.GPU(duration=callable)` calls the callable with the
handler's own arguments. A shorter request waits less in ZeroGPU's queue, and one longer than a visitor's remaining
daily quota is refused before it starts, so each request asks for what it needs, not a fixed worst case.

The figures are the project's own H200 measurements of the 11B MMDiT (README, Speed; bench/results, 2026-11-28;
bf16, the skipping sampler): 0.78 s a step for t2v at 8,448 video tokens (256px, 129 frames) and 18.8 s at 76,032
(768px). a·N + b·N² fits both (attention's share grows with N²); i2v took 1.14 s a step at 256px, for the image
guidance's extra branch. ZeroGPU lends H200 slices.
"""

from __future__ import annotations

import inspect
import logging
import math

log = logging.getLogger(__name__)

STEP_S_PER_TOKEN = 7.30e-5
STEP_S_PER_TOKEN_SQUARED = 2.29e-9
REFERENCE_FACTOR = 1.14 / 0.78  # a step with a reference condition (i2v, loop, extend) against t2v
BASE_S = 30.0  # text encoders, moving weights, the first CUDA kernels
DECODE_S_PER_PIXEL = 2e-7  # the VAE decode: 1.6 s for 256×256×129
MARGIN = 1.3
EMBEDDED_S = 60  # the embedded default samples a clip in well under a second on a GPU; this covers set-up
FALLBACK_S = 300  # when a request cannot be read (it is refused before it runs anyway)
LIMITS_S = (30, 1800)


def gpu_seconds(preset, options) -> int:
    """Seconds of GPU to ask for `options` (ResolvedOptions) on `preset`: the measured step time for its video
    tokens, times steps and extension segments, plus set-up and decode, with a margin."""
    if not preset.official:
        return EMBEDDED_S
    tokens = preset.video_tokens(options.num_frames, options.height, options.width)
    step_s = STEP_S_PER_TOKEN * tokens + STEP_S_PER_TOKEN_SQUARED * tokens**2
    if options.has_condition:
        step_s *= REFERENCE_FACTOR
    runs = max(1, options.segments)
    decode_s = DECODE_S_PER_PIXEL * options.height * options.width * options.num_frames
    seconds = MARGIN * (BASE_S + runs * (options.num_steps * step_s + decode_s))
    return int(min(max(math.ceil(seconds), LIMITS_S[0]), LIMITS_S[1]))


def duration_for(pool, mode: str, handler, build_options):
    """The callable for `spaces.GPU(duration=...)`: reads the handler's arguments by its signature, checks them
    like the handler will, and prices them (`FALLBACK_S` when they cannot be read)."""
    names = list(inspect.signature(handler).parameters)

    def duration(*args, **kwargs) -> int:
        values = {**dict(zip(names, args)), **kwargs}
        try:
            return gpu_seconds(pool.preset, pool.check(build_options(mode, values)))
        except Exception as exc:  # noqa: BLE001 - a bad request is refused by the handler; ask for the default
            log.info("GPU time not estimated (%s); asking %d s", exc, FALLBACK_S)
            return FALLBACK_S

    return duration
