"""Open-Sora 2.0 rectified-flow sampling: noise, packing, the shifted schedule, guidance and the Euler loop.

Time convention: t=1 is pure noise, t=0 is data; the model predicts v = noise - data, so x0 = x_t - t * v and an
Euler step is x <- x + (t_next - t) * v.

Guidance combines three branches exactly as Open-Sora 2.0 does:
    v = v_u2 + g_img * (v_u - v_u2) + g_txt * (v_c - v_u)
with c = (prompt, reference condition), u = (negative prompt, reference condition), u2 = (negative prompt, no
condition). Branches whose contribution is known without running them are skipped (see `needed_branches`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor


class GenerationStopped(Exception):
    """Raised inside the loop when the caller asked to stop; the run ends within one step."""


@dataclass(frozen=True)
class GuidanceOptions:
    num_steps: int = 50
    guidance: float = 7.5  # text guidance
    guidance_img: float = 3.0  # image (reference condition) guidance
    text_osci: bool = True  # drop text guidance to 1 on odd steps >= 10
    image_osci: bool = True
    scale_temporal_osci: bool = True  # ramp image guidance from 1 at the first latent frame (i2v only)
    shift: bool = True
    flow_shift: float | None = None  # explicit schedule shift alpha (replaces the resolution rule)
    oscillation_start: int = 10  # upstream's force_num


@dataclass(frozen=True)
class TextEmbeds:
    txt: Tensor  # (N, L_txt, C_txt)
    y_vec: Tensor  # (N, C_vec)


@dataclass(frozen=True)
class StepInfo:
    index: int  # 0-based step just finished
    num_steps: int
    t: float
    x0: Tensor  # (N, L_img, C) predicted clean latent, packed
    branches: int  # branch evaluations this step


# ---- latents ---------------------------------------------------------------------------------------------------

def get_noise(num_samples: int, channels: int, t_lat: int, h_lat: int, w_lat: int, seed: int,
              device="cpu", dtype=torch.float32) -> Tensor:
    """Gaussian latent noise (N, C, T, h, w) from a seeded CPU generator, so a seed means the same video anywhere."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(num_samples, channels, t_lat, h_lat, w_lat, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def pack(x: Tensor, patch_size: int = 2) -> Tensor:
    """(B, C, T, H, W) -> (B, T * H/p * W/p, C * p * p) tokens, t-major."""
    return rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack(x: Tensor, t_lat: int, h_lat: int, w_lat: int, patch_size: int = 2) -> Tensor:
    """Inverse of `pack`, given the latent (T, H, W)."""
    return rearrange(x, "b (t h w) (c ph pw) -> b c t (h ph) (w pw)", t=t_lat, h=h_lat // patch_size,
                     w=w_lat // patch_size, ph=patch_size, pw=patch_size)


def prepare_img_ids(batch: int, t_lat: int, h_lat: int, w_lat: int, patch_size: int = 2, device="cpu") -> Tensor:
    """RoPE positions (B, T * h * w, 3) of the packed tokens: (t, h, w) on the patch grid."""
    t, h, w = t_lat, h_lat // patch_size, w_lat // patch_size
    ids = torch.zeros(t, h, w, 3)
    ids[..., 0] = torch.arange(t)[:, None, None]
    ids[..., 1] = torch.arange(h)[None, :, None]
    ids[..., 2] = torch.arange(w)[None, None, :]
    return repeat(ids, "t h w c -> b (t h w) c", b=batch).to(device)


def prepare_txt_ids(batch: int, length: int, device="cpu") -> Tensor:
    """Text tokens carry no position (all zeros): RoPE leaves them unrotated."""
    return torch.zeros(batch, length, 3, device=device)


# ---- schedule and guidance ---------------------------------------------------------------------------------------

def shift_alpha_for(image_seq_len: int, num_frames: int, base_shift: float = 1.0, max_shift: float = 3.0) -> float:
    """Resolution-dependent shift: linear in tokens per latent frame (256 -> 1, 4096 -> 3), times sqrt(T_lat)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return (slope * image_seq_len + (base_shift - 256 * slope)) * math.sqrt(num_frames)


def time_shift(alpha: float, t: Tensor) -> Tensor:
    return alpha * t / (1 + (alpha - 1) * t)


def get_schedule(num_steps: int, image_seq_len: int, num_frames: int, shift_alpha: float | None = None,
                 base_shift: float = 1.0, max_shift: float = 3.0, shift: bool = True) -> list[float]:
    """num_steps + 1 timesteps from 1 to 0 (float32 arithmetic, as upstream), bent towards 1 when shifting."""
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        alpha = shift_alpha if shift_alpha is not None else shift_alpha_for(image_seq_len, num_frames, base_shift,
                                                                            max_shift)
        t = time_shift(alpha, t)
    return t.tolist()


def oscillation_scale(scale: float, i: int, start: int = 10) -> float:
    """Guidance on steps < start and on even steps after it; 1 (no guidance) on odd steps from `start` on."""
    return scale if i < start or i % 2 == 0 else 1.0


def temporal_image_scale(g_img: float, i: int, num_steps: int, t_lat: int) -> Tensor:
    """Per-latent-frame image guidance (T_lat,): 1 at the first frame rising to a step-dependent upper value that
    decays linearly from g_img at step 0 to 1 at the last step."""
    upper = torch.linspace(g_img, 1.0, num_steps + 1)[i]
    return torch.linspace(1.0, float(upper), t_lat)


def step_scales(opts: GuidanceOptions, i: int, t_lat: int, temporal: bool) -> tuple[float, float | Tensor]:
    """(text scale, image scale) for step i; the image scale is a (T_lat,) tensor when it ramps over time."""
    g_txt = oscillation_scale(opts.guidance, i, opts.oscillation_start) if opts.text_osci else opts.guidance
    g_img = oscillation_scale(opts.guidance_img, i, opts.oscillation_start) if opts.image_osci else opts.guidance_img
    if temporal and opts.scale_temporal_osci and g_img > 1.0:
        return g_txt, temporal_image_scale(g_img, i, opts.num_steps, t_lat)
    return g_txt, g_img


def needed_branches(g_txt: float, g_img, has_condition: bool) -> tuple[str, ...]:
    """Which of c, u, u2 change the guided velocity.

    - both scales 1: v = v_c;
    - no reference condition (t2v): u and u2 see identical inputs, so v = v_u + g_txt (v_c - v_u);
    - scalar image scale 1: v = v_u + g_txt (v_c - v_u).
    """
    scalar_img = not isinstance(g_img, Tensor)
    if g_txt == 1.0 and scalar_img and g_img == 1.0:
        return ("c",)
    if not has_condition or (scalar_img and g_img == 1.0):
        return ("c", "u")
    return ("c", "u", "u2")


def combine(v: dict[str, Tensor], g_txt: float, g_img, t_lat: int) -> Tensor:
    """The three-branch guidance rule with missing branches standing for their known equals."""
    v_c = v["c"]
    v_u = v.get("u", v_c)
    v_u2 = v.get("u2", v_u)
    if isinstance(g_img, Tensor):  # (T_lat,) -> per token of the t-major packed sequence
        g_img = repeat(g_img.to(v_c), "t -> 1 (t n) 1", n=v_c.shape[1] // t_lat)
    return v_u2 + g_img * (v_u - v_u2) + g_txt * (v_c - v_u)


# ---- the loop ----------------------------------------------------------------------------------------------------

@dataclass
class DenoiseCounter:
    forwards: int = 0  # model invocations (each on a batch of branches)
    branch_evals: int = 0  # sample-branch evaluations, the cost unit upstream spends 3 per step on


def denoise(model, img: Tensor, img_ids: Tensor, text: TextEmbeds, negative: TextEmbeds, cond: Tensor | None,
            timesteps: list[float], opts: GuidanceOptions, t_lat: int, *, temporal_image_guidance: bool = False,
            skip_known: bool = True, callback: Callable[[StepInfo], None] | None = None,
            should_stop: Callable[[], bool] | None = None, counter: DenoiseCounter | None = None) -> Tensor:
    """Integrate from noise `img` (N, L, C) to a clean packed latent with guided Euler steps.

    cond (N, L, C + p^2) is the packed (mask, masked latent) condition, or None for none. With skip_known=False every
    step runs all three branches, as upstream does; the result is the same up to float rounding.
    """
    n = img.shape[0]
    has_condition = cond is not None and bool(cond.abs().sum() > 0)
    zero_cond = torch.zeros_like(cond) if cond is not None else None
    branch_inputs = {"c": (text, cond), "u": (negative, cond), "u2": (negative, zero_cond)}
    txt_ids = prepare_txt_ids(n, text.txt.shape[1], img.device).to(img.dtype)
    for i, (t_curr, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"stopped before step {i + 1} of {len(timesteps) - 1}")
        g_txt, g_img = step_scales(opts, i, t_lat, temporal_image_guidance)
        names = needed_branches(g_txt, g_img, has_condition) if skip_known else ("c", "u", "u2")
        k = len(names)
        out = model(
            img=img.repeat(k, 1, 1), img_ids=img_ids[:1].expand(k * n, -1, -1),
            txt=torch.cat([branch_inputs[b][0].txt for b in names]), txt_ids=txt_ids.repeat(k, 1, 1),
            y_vec=torch.cat([branch_inputs[b][0].y_vec for b in names]),
            cond=torch.cat([branch_inputs[b][1] for b in names]) if cond is not None else None,
            timesteps=torch.full((k * n,), t_curr, dtype=img.dtype, device=img.device),
            guidance=torch.full((k * n,), opts.guidance, dtype=img.dtype, device=img.device))
        v = combine(dict(zip(names, out.chunk(k))), g_txt, g_img, t_lat)
        if counter is not None:
            counter.forwards += 1
            counter.branch_evals += k
        if callback is not None:
            callback(StepInfo(i, len(timesteps) - 1, t_curr, img - t_curr * v, k))
        img = img + (t_next - t_curr) * v
    return img
