"""A fixed pool of pre-encoded Shapes clips for DiT training, and a caption -> text-embedding cache.

Encoding every batch through the VAE would cost as much as the DiT step on a CPU, so a pool of clips is rendered
once and encoded once through the VAE's real `encode` (latents *and* every reference a condition type may use).
Batches then draw clips from the pool: ordinary clips for t2v / i2v_head / i2v_tail, loop clips for i2v_loop and
long clips for v2v. Encoded pools can be cached on disk (`data.pool_cache`) for later runs on the same VAE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from pipelines.atomic_io import write_atomically
from pipelines.text import build_prompt
from pipelines.training.conditions import (V2V_EASY_FRAMES, V2V_FRAMES, ClipReferences, draw_condition_types,
                                           encode_references)
from pipelines.training.shapes import ShapesDataset, object_pixels

logger = logging.getLogger(__name__)

_REF_FIELDS = [f.name for f in fields(ClipReferences)]
CACHE_VERSION = 1  # bump when what a cached clip set holds, or how clips are drawn, captioned or encoded, changes


@dataclass
class ClipSet:
    """Encoded clips of one length: latents (N, C, T_lat, h, w), references per field (N, C, k, h, w) and where
    the object is on the latent grid (N, T_lat, h, w) bool."""

    x0: Tensor
    refs: dict[str, Tensor]
    captions: list[str]  # training format: "<caption> 24 FPS, 4 motion score."
    prompts: list[str]  # the studio's inference format of the same: "<caption>. 24 FPS. 4 motion score."
    objects: Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]

    def references(self, index: int) -> ClipReferences:
        return ClipReferences(**{name: self.refs[name][index] if name in self.refs else None for name in _REF_FIELDS})


def latent_object_map(on_object: Tensor, time_ratio: int, space_ratio: int) -> Tensor:
    """Pixel object masks (B, 1, T, H, W) -> (B, T_lat, h, w) bool on the causal VAE's latent grid: a latent is
    on the object when any pixel it encodes is (latent frame 0 encodes frame 0 alone, latent frame k ≥ 1 frames
    time_ratio·(k-1)+1 … time_ratio·k)."""
    b, _, t, h, w = on_object.shape
    if (t - 1) % time_ratio or h % space_ratio or w % space_ratio:
        raise ValueError(f"a {t}×{h}×{w} clip does not fit the latent grid ({time_ratio}× time, "
                         f"{space_ratio}× space)")
    rest = on_object[:, 0, 1:].reshape(b, (t - 1) // time_ratio, time_ratio, h, w).amax(dim=2)
    frames = torch.cat([on_object[:, 0, :1], rest], dim=1)  # (B, T_lat, H, W)
    return torch.nn.functional.max_pool2d(frames, space_ratio) > 0


PROGRESS_EVERY_S = 60.0


@torch.no_grad()
def encode_clip_set(vae, length: int, num_frames: int, size: int, loop_fraction: float, seed: int,
                    encode_batch: int = 8, object_margin: int = 0, twin: bool = False) -> ClipSet:
    """Render `length` clips and encode them and all their references with the VAE; note where each object
    lies on the latent grid (pixels within `object_margin` of it included). With `twin`, the clips are the shape
    twins of the same seed's clips (`ShapesDataset(twin=True)`), encoded without references: they only serve as
    what a swapped caption asks for."""
    dataset = ShapesDataset(length, num_frames=num_frames, size=size, loop_fraction=loop_fraction, seed=seed,
                            twin=twin)
    latents, refs, captions, prompts, objects = [], {}, [], [], []
    ratios = vae.config.time_compression_ratio, vae.config.spatial_compression_ratio
    started, reported = time.monotonic(), time.monotonic()
    for start in range(0, length, encode_batch):
        if start and time.monotonic() - reported > PROGRESS_EVERY_S:  # a pool takes many minutes: say how far it got
            reported = time.monotonic()
            done = start / length
            logger.info("latent pool: encoded %d of %d clips of %d frames (%.0f%%, about %.0f min left)", start,
                        length, num_frames, 100 * done, (reported - started) * (1 - done) / done / 60)
        items = [dataset[i] for i in range(start, min(start + encode_batch, length))]
        x = torch.stack([item["video"] for item in items])  # (b, 3, T, H, W)
        latents.append(vae.encode(x))  # (b, C, T_lat, h, w)
        on_object = object_pixels(x, [item["background"] for item in items], object_margin)
        objects.append(latent_object_map(on_object, *ratios))
        for clip_refs in ([] if twin else encode_references(x, vae)):
            for name in _REF_FIELDS:
                value = getattr(clip_refs, name)
                if value is not None:
                    refs.setdefault(name, []).append(value)
        captions.extend(item["caption"] for item in items)
        prompts.extend(build_prompt(item["raw_caption"], item["fps"], item["motion_score"]) for item in items)
    return ClipSet(torch.cat(latents), {k: torch.stack(v) for k, v in refs.items()}, captions, prompts,
                   torch.cat(objects))


@dataclass
class PoolBatch:
    x0: Tensor  # (B, C, T_lat, h, w): the clips the noisy latents are made from
    refs: list[ClipReferences]
    captions: list[str]
    cond_types: list[str]
    objects: Tensor  # (B, T_lat, h, w) bool: latents on the object (on either clip's object where swapped)
    target_x0: Tensor | None = None  # (B, C, T_lat, h, w): what the captions ask for; x0 where not swapped
    swapped: Tensor | None = None  # (B,) bool: the caption and target are the clip's shape twin's


class LatentPool:
    """Ordinary, loop and long clip sets plus the rule for which set a condition type draws from."""

    def __init__(self, short: ClipSet, loop: ClipSet | None, long: ClipSet | None, condition_config: dict,
                 prompt_fraction: float = 0.5, twins: ClipSet | None = None):
        self.short, self.loop, self.long = short, loop, long
        # twins[i] is short[i] with another shape (and its caption), for i < len(twins): see `swap_shapes`
        self.twins = twins if twins is not None and len(twins) else None
        # Upstream trains on one suffix format and prompts with another; showing both makes the default robust.
        self.prompt_fraction = prompt_fraction
        self.short_config = {k: w for k, w in condition_config.items() if not k.startswith("v2v")}
        if loop is None or len(loop) == 0:
            self.short_config.pop("i2v_loop", None)
        self.long_config = {k: w for k, w in condition_config.items() if k.startswith("v2v") and w > 0}
        if long is None or len(long) == 0:
            self.long_config = {}

    @property
    def has_long(self) -> bool:
        return bool(self.long_config)

    def sample(self, batch: int, long: bool, generator: torch.Generator, swap_share: float = 0.0) -> PoolBatch:
        """Draw condition types, then a clip for each from the set that type trains on; `swap_shapes` with
        `swap_share`."""
        clip_set = self.long if long else self.short
        config = self.long_config if long else self.short_config
        t_lat = clip_set.x0.shape[2]
        types = draw_condition_types(config, t_lat, batch, generator)
        x0, refs, captions, objects, indices, prompted = [], [], [], [], [], []
        for cond_type in types:
            source = self.loop if cond_type == "i2v_loop" else clip_set
            index = int(torch.randint(len(source), (1,), generator=generator))
            x0.append(source.x0[index])
            objects.append(source.objects[index])
            refs.append(source.references(index))
            use_prompt = float(torch.rand((), generator=generator)) < self.prompt_fraction
            captions.append(source.prompts[index] if use_prompt else source.captions[index])
            indices.append(index if source is self.short else -1)
            prompted.append(use_prompt)
        batch = PoolBatch(torch.stack(x0), refs, captions, types, torch.stack(objects))
        return self.swap_shapes(batch, indices, prompted, swap_share, generator) if swap_share else batch

    def sample_images(self, batch: int, generator: torch.Generator, swap_share: float = 0.0) -> PoolBatch:
        """Text-to-image samples: the first latent frame of ordinary clips (the causal VAE encodes a clip's first
        frame on its own, as it encodes an image), with their captions and no reference. A single frame is 16
        tokens against a 33-frame clip's 144, so a step sees many more objects drawn from a prompt."""
        index = torch.randint(len(self.short), (batch,), generator=generator).tolist()
        use_prompt = (torch.rand(batch, generator=generator) < self.prompt_fraction).tolist()
        captions = [self.short.prompts[i] if p else self.short.captions[i] for i, p in zip(index, use_prompt)]
        empty = ClipReferences(**{name: None for name in _REF_FIELDS})
        images = PoolBatch(self.short.x0[index, :, :1], [empty] * batch, captions, ["t2v"] * batch,
                           self.short.objects[index, :1])
        return self.swap_shapes(images, index, use_prompt, swap_share, generator) if swap_share else images

    def swap_shapes(self, batch: PoolBatch, indices: list[int], prompted: list[bool], share: float,
                    generator: torch.Generator) -> PoolBatch:
        """Give a `share` of the batch's text-to-video samples their clip's shape twin's caption and latents as
        the target, keeping the clip itself for the noisy input (`indices`: each sample's place in the short set,
        -1 for other sets; `prompted`: whether its caption is in the prompt's suffix format, not training's). In
        ordinary training the noisy latent shows the shape as soon as it shows the object, so the model can learn to
        read the shape there instead of from the caption; a swapped sample can only be right by following the
        caption. The trainer draws high noise for these (`shape_swap_min_t`)."""
        if self.twins is None:
            raise ValueError("shape swaps need a pool of shape twins (data.twin_pool_size > 0)")
        frames = batch.x0.shape[2]
        draw = (torch.rand(len(indices), generator=generator) < share).tolist()
        swapped = [d and 0 <= i < len(self.twins) and kind == "t2v"
                   for d, i, kind in zip(draw, indices, batch.cond_types)]
        target, objects, captions = batch.x0.clone(), batch.objects.clone(), list(batch.captions)
        for row, (swap, index) in enumerate(zip(swapped, indices)):
            if not swap:
                continue
            target[row] = self.twins.x0[index, :, :frames]
            objects[row] |= self.twins.objects[index, :frames]
            captions[row] = (self.twins.prompts if prompted[row] else self.twins.captions)[index]  # same format
        return dataclasses.replace(batch, captions=captions, objects=objects, target_x0=target,
                                   swapped=torch.tensor(swapped, dtype=torch.bool))

    def all_captions(self) -> list[str]:
        sets = [s for s in (self.short, self.loop, self.long, self.twins) if s is not None]
        return [c for s in sets for c in (*s.captions, *s.prompts)]


class TextCache:
    """Caption -> (txt (L, C), y_vec (D,)) computed once by the frozen text encoder (captions repeat)."""

    def __init__(self, encoder, batch: int = 64):
        self.encoder, self.batch = encoder, batch
        self.cache: dict[str, tuple[Tensor, Tensor]] = {}

    def add(self, captions: list[str]) -> None:
        missing = sorted({c for c in captions if c not in self.cache})
        for start in range(0, len(missing), self.batch):
            chunk = missing[start:start + self.batch]
            txt, _, y_vec = self.encoder(chunk)  # (b, L, C), _, (b, D)
            for caption, t, y in zip(chunk, txt, y_vec):
                self.cache[caption] = (t.clone(), y.clone())

    def lookup(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(txt (B, L, C), y_vec (B, D)) for the captions, encoding any not seen yet."""
        self.add(captions)
        txt = torch.stack([self.cache[c][0] for c in captions])
        y_vec = torch.stack([self.cache[c][1] for c in captions])
        return txt, y_vec


ENCODING_MODULES = ("encoder.", "quant_conv.")  # what `encode` runs; the decoder never touches cached latents


def vae_fingerprint(vae) -> str:
    """SHA-256 of a VAE's config and encoder weights: cached latents are valid for exactly this encoding (a
    decoder-only fine-tune keeps them valid, and keeps the cache)."""
    digest = hashlib.sha256(json.dumps(vae.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(ENCODING_MODULES):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_clip_set(clips: ClipSet, path: Path) -> Path:
    """Write a clip set as one safetensors file (captions in its metadata), atomically."""
    import safetensors.torch

    tensors = {"x0": clips.x0, "objects": clips.objects, **{f"refs.{k}": v for k, v in clips.refs.items()}}
    metadata = {"captions": json.dumps(clips.captions), "prompts": json.dumps(clips.prompts)}
    return write_atomically(path, ".safetensors", lambda tmp: safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def load_clip_set(path: Path) -> ClipSet:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    refs = {k.removeprefix("refs."): v for k, v in tensors.items() if k.startswith("refs.")}
    return ClipSet(tensors["x0"], refs, json.loads(metadata["captions"]), json.loads(metadata["prompts"]),
                   tensors["objects"])


def build_latent_pool(vae, data, condition_config: dict, object_margin: int = 0,
                      cache_dir: str | Path | None = None) -> LatentPool:
    """The three clip sets of a `DataConfig`, encoded with `vae` (sizes 0 leave a set out).

    With `cache_dir`, each set is looked up there first by a key of its parameters (the VAE encoder's
    fingerprint, the set's size, length, seed and loop share, the frame size, the object margin, the v2v reference
    lengths and CACHE_VERSION, which stands for the code that draws and encodes clips) and written there after
    encoding, so later runs on the same encoder skip the encoding (~2 min per 1,000 clips on 2 cores). Nothing is
    ever pruned: sets for other VAEs stay until removed by hand (~1 GB per 8,192 clips of 33 frames with their
    references)."""
    fingerprint = vae_fingerprint(vae) if cache_dir else None

    def encode(length: int, num_frames: int, loop_fraction: float, seed: int, twin: bool = False) -> ClipSet:
        if not cache_dir:
            return encode_clip_set(vae, length, num_frames, data.size, loop_fraction, seed, data.encode_batch,
                                   object_margin, twin)
        spec = dict(version=CACHE_VERSION, vae=fingerprint, length=length, num_frames=num_frames, size=data.size,
                    loop_fraction=loop_fraction, seed=seed, object_margin=object_margin,
                    v2v_frames=[V2V_FRAMES, V2V_EASY_FRAMES])
        if twin:  # (ordinary sets keep the keys they had before twins existed)
            spec["twin"] = True
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"clips-{key}.safetensors"
        if path.is_file():
            logger.info("latent pool: %d clips of %d frames from %s", length, num_frames, path)
            return load_clip_set(path)
        clips = encode_clip_set(vae, length, num_frames, data.size, loop_fraction, seed, data.encode_batch,
                                object_margin, twin)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_clip_set(clips, path)
        return clips

    short = encode(data.pool_size, data.num_frames, 0.0, data.seed)
    loop = long = None
    if data.loop_pool_size and condition_config.get("i2v_loop", 0) > 0:
        loop = encode(data.loop_pool_size, data.num_frames, 1.0, data.seed + 1)
    if data.long_pool_size and any(w > 0 for k, w in condition_config.items() if k.startswith("v2v")):
        long = encode(data.long_pool_size, data.long_frames, 0.0, data.seed + 2)
    # the first twin_pool_size clips of the short set, each with another shape (same seed: same index, same spec)
    twins = encode(min(data.twin_pool_size, data.pool_size), data.num_frames, 0.0, data.seed, twin=True) \
        if data.twin_pool_size else None
    logger.info("latent pool: %d clips, %d loop clips, %d long clips, %d shape twins", len(short),
                len(loop) if loop else 0, len(long) if long else 0, len(twins) if twins else 0)
    return LatentPool(short, loop, long, condition_config, twins=twins)
