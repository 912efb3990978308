"""The named stages of one generation, as free functions: encode_text, load/encode references, sample, decode.

Each takes models and tensors and returns tensors; the engine calls them in order and reports progress.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from pipelines.conditions import ReferenceLatents, prepare_inference_condition, reference_spec
from pipelines.media import MediaError, probe_video, read_image, read_video, resize_crop
from pipelines.models.text_encoders import TextEncoder
from pipelines.sampling import (DenoiseCounter, GuidanceOptions, TextEmbeds, denoise, get_noise, get_schedule, pack,
                                prepare_img_ids, unpack)


@dataclass(frozen=True)
class ReferencePixels:
    """Reference media resized to the output size, in [-1, 1]: head / tail are (3, k, H, W); clip is the full clip."""

    head: Tensor | None = None
    tail: Tensor | None = None
    clip: Tensor | None = None  # extension: the whole clip at output size, stitched to the new frames
    source_fps: float | None = None


def encode_text(encoder: TextEncoder, prompt: str, negative: str) -> tuple[TextEmbeds, TextEmbeds]:
    txt, _, y_vec = encoder([prompt, negative])
    return TextEmbeds(txt[:1], y_vec[:1]), TextEmbeds(txt[1:], y_vec[1:])


def load_reference_pixels(cond_type: str, paths: tuple[str, ...], height: int, width: int) -> ReferencePixels:
    """Read and resize the references the condition needs; clear MediaError / ValueError messages otherwise."""
    spec = reference_spec(cond_type)
    if spec.kind == "none":
        return ReferencePixels()
    if spec.kind == "image":
        originals = [read_image(p) for p in paths]  # each (3, H_i, W_i), decoded once
        _check_loop_sizes(cond_type, originals)
        images = [resize_crop(image, height, width)[:, None] for image in originals]  # each (3, 1, H, W)
        return ReferencePixels(head=images[0] if spec.head else None, tail=images[-1] if spec.tail else None)
    _probe_clip(paths[0], spec.video_frames)
    clip, fps = read_video(paths[0], size=(height, width))
    if clip.shape[1] < spec.video_frames:
        raise MediaError(f"only {clip.shape[1]} frames of the clip could be decoded; extending needs "
                         f"{spec.video_frames}")
    return clip_references(cond_type, clip, fps)


def check_references(cond_type: str, paths: tuple[str, ...]) -> None:
    """Open the references a condition needs without encoding them (images decoded, a clip probed), so a batch
    refuses a bad row before the first one runs; raises MediaError / ValueError like `load_reference_pixels`."""
    spec = reference_spec(cond_type)
    if spec.kind == "image":
        _check_loop_sizes(cond_type, [read_image(path) for path in paths])
    elif spec.kind == "video":
        _probe_clip(paths[0], spec.video_frames)


def _check_loop_sizes(cond_type: str, images: list[Tensor]) -> None:
    """A loop from one image to another needs both the same size (each is cropped to the video's frame)."""
    if cond_type == "i2v_loop" and len(images) == 2:
        sizes = {tuple(image.shape[1:]) for image in images}
        if len(sizes) > 1:
            raise MediaError("the two loop images have different sizes "
                             f"({' and '.join('x'.join(map(str, s[::-1])) for s in sizes)}); "
                             "use two images of the same size")


def _probe_clip(path: str, needed: int) -> None:
    info = probe_video(path)
    if info.frames < needed:
        raise MediaError(f"the clip has {info.frames} frames; extending needs at least {needed}")


def clip_references(cond_type: str, clip: Tensor, source_fps: float | None = None) -> ReferencePixels:
    """The references an extension takes from a clip (3, T, H, W) at output size: forward extension continues
    from the clip's end (its last frames become the new video's head), backward leads into its start. A later
    segment of a multi-segment extension passes the video made so far."""
    spec = reference_spec(cond_type)
    head = clip[:, -spec.video_frames:] if spec.head else None
    tail = clip[:, :spec.video_frames] if spec.tail else None
    return ReferencePixels(head=head, tail=tail, clip=clip, source_fps=source_fps)


@torch.inference_mode()
def encode_references(vae, refs: ReferencePixels, device, dtype) -> ReferenceLatents:
    """VAE-encode head / tail references (deterministic posterior mean) to (1, C, k, h, w) latents."""
    def enc(x):
        return None if x is None else vae.encode(x[None].to(device=device, dtype=dtype))
    return ReferenceLatents(head=enc(refs.head), tail=enc(refs.tail))


def latent_shape(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    cfg = vae.config
    s = cfg.spatial_compression_ratio
    return cfg.latent_channels, vae.latent_frames(num_frames), height // s, width // s


def guidance_options(opts) -> GuidanceOptions:
    """The sampler's settings from resolved generation options."""
    return GuidanceOptions(num_steps=opts.num_steps, guidance=opts.guidance, guidance_img=opts.guidance_img,
                           text_osci=opts.text_osci, image_osci=opts.image_osci,
                           scale_temporal_osci=opts.scale_temporal_osci, shift=opts.shift, flow_shift=opts.flow_shift)


def sample(mmdit, text: TextEmbeds, negative: TextEmbeds, refs: ReferenceLatents, cond_type: str,
           latent: tuple[int, int, int, int], seed: int, opts: GuidanceOptions, *, callback=None,
           should_stop=None, counter: DenoiseCounter | None = None, skip_known: bool = True,
           start: Tensor | None = None, start_t: float = 1.0) -> Tensor:
    """Noise -> clean latent (1, C, T, h, w), with the given frames put back exactly.

    With `start` (a clean latent of the same shape) and `start_t` < 1, sampling begins from `start` noised to level
    `start_t` ((1 - t)·start + t·noise) and runs the schedule's steps below it: how much of a real clip the model
    keeps, and from which noise level on it loses what (the evaluation's `--from-noise`)."""
    c, t_lat, h_lat, w_lat = latent
    device, dtype = text.txt.device, text.txt.dtype
    patch = mmdit.config.patch_size
    z = get_noise(1, c, t_lat, h_lat, w_lat, seed, device=device, dtype=dtype)  # (1, C, T, h, w)
    masks, masked = prepare_inference_condition(z, cond_type, refs)
    cond = pack(torch.cat([masks, masked], dim=1), patch) if mmdit.config.cond_embed else None
    timesteps = get_schedule(opts.num_steps, (h_lat // patch) * (w_lat // patch), t_lat,
                             shift_alpha=opts.flow_shift, shift=opts.shift)
    if start is not None and start_t < 1.0:
        if not 0.0 < start_t or tuple(start.shape) != tuple(z.shape):
            raise ValueError(f"start must be a latent of shape {tuple(z.shape)} and 0 < start_t <= 1")
        z = (1 - start_t) * start.to(z) + start_t * z
        timesteps = [start_t] + [t for t in timesteps if t < start_t]
    x = denoise(mmdit, pack(z, patch), prepare_img_ids(1, t_lat, h_lat, w_lat, patch, device).to(dtype), text,
                negative, cond, timesteps, opts, t_lat, temporal_image_guidance=cond_type.startswith("i2v"),
                skip_known=skip_known, callback=callback, should_stop=should_stop, counter=counter)
    z = unpack(x, t_lat, h_lat, w_lat, patch)
    return torch.where(masks.bool(), masked, z)


@torch.inference_mode()
def decode_video(vae, z: Tensor, num_frames: int) -> Tensor:
    """Latent (1, C, T, h, w) -> video (3, T, H, W) in [-1, 1], float32 on CPU."""
    return vae.decode(z)[0, :, :num_frames].float().clamp(-1, 1).cpu()


def stitch_extension(cond_type: str, generated: Tensor, refs: ReferencePixels) -> Tensor:
    """Extension keeps the user's clip as it was and adds only the new frames around it."""
    if refs.clip is None:
        return generated
    k = reference_spec(cond_type).video_frames
    if cond_type.startswith("v2v_head"):
        return torch.cat([refs.clip, generated[:, k:]], dim=1)
    return torch.cat([generated[:, :-k], refs.clip], dim=1)


@torch.inference_mode()
def fit_preview_projection(vae, device, dtype, size: int = 64) -> Tensor:
    """A (C + 1, 3) least-squares map from latent pixels to RGB, fitted on a colour chart through the VAE.

    Decoding through the VAE every few steps would cost as much as sampling on a CPU; this costs one encode at
    first use and a matrix product per preview.
    """
    g = torch.Generator().manual_seed(0)
    s = vae.config.spatial_compression_ratio
    blocks = torch.rand(3, 1, size // (2 * s), size // (2 * s), generator=g) * 2 - 1
    chart = torch.nn.functional.interpolate(blocks[None], scale_factor=(1, 2 * s, 2 * s), mode="nearest")[0]
    z = vae.encode(chart[None].to(device=device, dtype=dtype))[0, :, 0].float().cpu()  # (C, h, w)
    rgb = torch.nn.functional.avg_pool2d(chart[:, 0], s)  # (3, h, w)
    feats = torch.cat([rearrange(z, "c h w -> (h w) c"), torch.ones(z.shape[1] * z.shape[2], 1)], dim=1)
    return torch.linalg.lstsq(feats, rearrange(rgb, "c h w -> (h w) c")).solution  # (C + 1, 3)


def preview_strip(x0: Tensor, projection: Tensor, latent: tuple[int, int, int, int], patch: int,
                  max_frames: int = 5, scale: int = 4) -> np.ndarray:
    """Packed predicted-clean latent -> a uint8 strip (h*scale, n*w*scale, 3) of up to max_frames frames."""
    c, t_lat, h_lat, w_lat = latent
    z = unpack(x0[:1].float().cpu(), t_lat, h_lat, w_lat, patch)[0]  # (C, T, h, w)
    z = z[:, _evenly_spaced(t_lat, max_frames)]
    feats = torch.cat([rearrange(z, "c t h w -> t h w c"), torch.ones(*z.shape[1:], 1)], dim=-1)
    rgb = feats @ projection  # (n, h, w, 3)
    return _uint8_strip(rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2))


def video_strip(video: Tensor, max_frames: int = 5, max_height: int = 256) -> np.ndarray:
    """Decoded frames (3, T, H, W) in [-1, 1] -> a uint8 strip (h, n*w, 3) of up to max_frames evenly spaced frames,
    shrunk to at most max_height rows (a finished extension segment, shown while the next one samples)."""
    frames = video[:, _evenly_spaced(video.shape[1], max_frames)].float().cpu()  # (3, n, H, W)
    if frames.shape[2] > max_height:
        size = (max_height, max(1, round(frames.shape[3] * max_height / frames.shape[2])))
        frames = torch.nn.functional.interpolate(frames.transpose(0, 1), size=size, mode="area").transpose(0, 1)
    return _uint8_strip(rearrange(frames, "c n h w -> n h w c"))


def _evenly_spaced(total: int, most: int) -> Tensor:
    """Indices of up to `most` evenly spaced frames out of `total`, first and last included."""
    return torch.linspace(0, total - 1, min(most, total)).round().long()


def _uint8_strip(frames: Tensor) -> np.ndarray:
    """Frames (n, h, w, 3) in [-1, 1] side by side -> uint8 (h, n*w, 3)."""
    strip = rearrange(frames.clamp(-1, 1), "n h w c -> h (n w) c")
    return ((strip + 1) * 127.5).round().to(torch.uint8).numpy()
