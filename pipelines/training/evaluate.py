"""Judge the embedded default on generated clips, per mode, by the rules of the Shapes world.

    python -m pipelines.training.evaluate [--t2v 100 --i2v 40 --loop 30 --extend 30] [--json report.json]

Generation goes through `Engine.generate_frames` (the same stages as the studio) and the judge reads the frames
before H.264 encoding, so the numbers measure the model, not the codec.
- t2v: colour / shape / direction / background accuracy against the prompt's spec; speed vs motion-score correlation
  (`--image-first`: t2v made as the studio's Image first does, a frame and then image-to-video from it).
- i2v: PSNR of the first frame against the given image; direction accuracy.
- loop: PSNR of the first and last frames against the image; the object must move mid-clip.
- extend: PSNR of the kept (conditioned) frames against the given clip before stitching; the continuation's direction
  against the same scene carried on by the world's rules (bounces included).
- vae_ceiling: the same judge on the VAE's reconstructions of real clips for the t2v prompts, i.e. the most any
  MMDiT on this VAE could score (a blurred decoder caps colour and shape before the MMDiT does anything).
- from_noise (`--from-noise 1,0.5,0.15`): the t2v prompts sampled from their real clip's latent noised to each
  level t0 (the schedule's steps below t0): from which noise level on the model loses colour, shape or direction
  (t0 = 1 is plain t2v; a small t0 reads close to the VAE ceiling). With `--swap-shape` the captions name another
  shape than the clip's (`twin_shape`): whether the model draws the caption's shape or the one the noisy latent
  still shows (`follows_caption`, `follows_clip`).
The t2v and ceiling sections list what was mistaken for what (`shape_confusion`, `color_confusion`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.conditions import ReferenceLatents
from pipelines.engine import Engine
from pipelines.media import from_uint8_frames, to_uint8_frames, write_video
from pipelines.options import GenerationOptions
from pipelines.presets import load_embedded_preset
from pipelines.stages import (ReferencePixels, decode_video, encode_references, encode_text, guidance_options,
                              latent_shape, sample)
from pipelines.text import build_prompt
from pipelines.training.judge import (centroid_track, continuation_directions, judge_clip, motion_direction, psnr,
                                     speed_score_correlation)
from pipelines.training.shapes import caption_with_shape, render_clip, sample_eval_prompts, twin_shape
from pipelines.training.train_default import round_trip

TARGETS = {"t2v_color": 0.95, "t2v_direction": 0.90, "t2v_shape": 0.85, "i2v_first_psnr_db": 28.0,
           "loop_last_psnr_db": 25.0, "extend_kept_psnr_db": 28.0, "extend_direction": 0.90}
MOVING_PX = 2.0  # a loop clip "moves in between" when the object leaves its start by at least this much


def _frames(video) -> np.ndarray:
    return to_uint8_frames(video)  # (T, H, W, 3)


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _psnr_capped(a, b) -> float:
    return min(psnr(a, b), 99.0)  # identical frames give inf; cap so means stay finite


def evaluate_t2v(engine: Engine, n: int, seed: int, frames: int, image_first: bool = False) -> dict:
    rows, speeds, scores = [], [], []
    for i, item in enumerate(sample_eval_prompts(n, seed, num_frames=frames)):
        made = engine.generate_frames(GenerationOptions(prompt=item.caption, num_frames=frames,
                                                        motion_score=item.spec.motion_score, seed=seed + i,
                                                        image_first=image_first))
        report = judge_clip(_frames(made.video), item.spec)
        rows.append({**report, "expected": item.spec})
        speeds.append(report["speed"])
        scores.append(item.spec.motion_score)
    return {**_accuracies(rows), "image_first": image_first,
            "speed_vs_motion_score": speed_score_correlation(speeds, scores)}


def _accuracies(rows: list[dict]) -> dict:
    """Accuracy per judged property over `judge_clip` reports (each with its `expected` spec), and the mistakes
    ("asked->read": count, most common first), and the literal readings' accuracies under `literal`."""
    acc = {k: _mean([float(r[f"{k}_correct"]) for r in rows]) for k in ("color", "shape", "direction",
                                                                          "background")}
    confusion = {key: dict(collections.Counter(f"{getattr(r['expected'], key)}->{r[key]}" for r in rows
                                               if not r[f"{key}_correct"]).most_common())
                 for key in ("shape", "color")}
    literal = {f"{k}_accuracy": _mean([float(r[f"{k}_literal_correct"]) for r in rows])
               for k in ("color", "shape", "direction")}
    return {"clips": len(rows), **{f"{k}_accuracy": v for k, v in acc.items()}, "literal": literal,
            "all_correct": _mean([float(r["all_correct"]) for r in rows]),
            "shape_confusion": confusion["shape"], "color_confusion": confusion["color"]}


def evaluate_vae_ceiling(engine: Engine, n: int, seed: int, frames: int) -> dict:
    """The judge on the VAE's reconstructions (encode, decode) of the real clips for the t2v prompts."""
    vae = engine.components.vae
    rows, psnrs = [], []
    for item in sample_eval_prompts(n, seed, num_frames=frames):
        clip = render_clip(item.spec, frames)  # (T, H, W, 3)
        recon = round_trip(vae, clip)  # (where the VAE is, offloaded or not)
        rows.append({**judge_clip(recon, item.spec), "expected": item.spec})
        psnrs.append(_psnr_capped(recon, clip))
    return {**_accuracies(rows), "psnr_db": _mean(psnrs)}


@torch.inference_mode()
def evaluate_from_noise(engine: Engine, n: int, seed: int, frames: int, levels: list[float],
                        swap_shape: bool = False) -> dict:
    """The judge on t2v samples that start from the prompt's real clip (its latent noised to each level); with
    `swap_shape` the caption names another shape than the clip's, and the judge expects the caption's."""
    c = engine.components
    rows = {level: [] for level in levels}
    for i, item in enumerate(sample_eval_prompts(n, seed, num_frames=frames)):
        caption, expected = item.caption, item.spec
        if swap_shape:
            expected = dataclasses.replace(item.spec, shape=twin_shape(item.spec.shape, i))
            caption = caption_with_shape(item.caption, item.spec.shape, expected.shape)
        opts = engine.check(GenerationOptions(prompt=caption, num_frames=frames,
                                              motion_score=item.spec.motion_score, seed=seed + i))
        text, negative = encode_text(c.text_encoder, build_prompt(opts.prompt, opts.fps, opts.motion_score),
                                     opts.negative_prompt)
        clip = from_uint8_frames(render_clip(item.spec, frames))  # (3, T, H, W) in [-1, 1]
        start = encode_references(c.vae, ReferencePixels(head=clip), text.txt.device, c.dtype).head
        latent = latent_shape(c.vae, frames, opts.height, opts.width)
        for level in levels:
            z = sample(c.mmdit, text, negative, ReferenceLatents(), "t2v", latent, opts.seed, guidance_options(opts),
                       start=start, start_t=level)
            rows[level].append({**judge_clip(_frames(decode_video(c.vae, z, frames)), expected),
                                "expected": expected, "clip_shape": item.spec.shape})
    return {f"{level:g}": _accuracies(level_rows) | (_followed(level_rows) if swap_shape else {})
            for level, level_rows in rows.items()}


def _followed(rows: list[dict]) -> dict:
    """Shares of swapped-caption samples drawn in the caption's shape and in the clip's own."""
    return {"follows_caption": _mean([r["shape"] == r["expected"].shape for r in rows]),
            "follows_clip": _mean([r["shape"] == r["clip_shape"] for r in rows])}


def _noise_levels(text: str) -> list[float]:
    levels = [float(part) for part in text.split(",") if part.strip()]
    if not levels or not all(0.0 < level <= 1.0 for level in levels):
        raise argparse.ArgumentTypeError(f"noise levels are numbers in (0, 1], comma-separated: {text!r}")
    return levels


def _reference_image(clip: np.ndarray, index: int, folder: Path, name: str) -> str:
    path = folder / f"{name}.png"
    Image.fromarray(clip[index]).save(path)
    return str(path)


def evaluate_i2v(engine: Engine, n: int, seed: int, frames: int, folder: Path) -> dict:
    first, direction = [], []
    for i, item in enumerate(sample_eval_prompts(n, seed + 1, num_frames=frames)):
        truth = render_clip(item.spec, frames)
        image = _reference_image(truth, 0, folder, f"i2v_{i}")
        made = engine.generate_frames(GenerationOptions(mode="i2v", prompt=item.caption, references=(image,),
                                                        num_frames=frames, motion_score=item.spec.motion_score,
                                                        seed=seed + i))
        clip = _frames(made.video)
        first.append(_psnr_capped(clip[0], truth[0]))
        direction.append(float(motion_direction(clip) == item.spec.direction))
    return {"clips": n, "first_frame_psnr_db": _mean(first), "direction_accuracy": _mean(direction)}


def evaluate_loop(engine: Engine, n: int, seed: int, frames: int, folder: Path) -> dict:
    first, last, moving = [], [], []
    prompts = [p for p in sample_eval_prompts(4 * n, seed + 2, num_frames=frames) if p.spec.direction != "still"]
    for i, item in enumerate(prompts[:n]):
        truth = render_clip(item.spec, frames)
        image = _reference_image(truth, 0, folder, f"loop_{i}")
        made = engine.generate_frames(GenerationOptions(mode="loop", prompt=item.caption, references=(image,),
                                                        num_frames=frames, motion_score=item.spec.motion_score,
                                                        seed=seed + i))
        clip = _frames(made.video)
        first.append(_psnr_capped(clip[0], truth[0]))
        last.append(_psnr_capped(clip[-1], truth[0]))
        track = centroid_track(clip)
        offsets = np.linalg.norm(track - track[0], axis=1)
        moving.append(float(np.nanmax(offsets[1:-1]) >= MOVING_PX) if np.isfinite(offsets).any() else 0.0)
    return {"clips": len(first), "first_frame_psnr_db": _mean(first), "last_frame_psnr_db": _mean(last),
            "moves_mid_clip": _mean(moving)}


def evaluate_extend(engine: Engine, n: int, seed: int, frames: int, folder: Path) -> dict:
    """Extend the first 33 frames of a scene to `frames`. The continuation is judged against the same scene carried
    on by the world's rules (a deterministic function of the given clip: constant speed, bounce at the edges), over
    the world's longest leg after the cut: `direction_follows_world`. Two older readings stay beside it:
    `direction_follows_world_first_leg` compares first legs (a bounce a few frames after the cut then decides alone),
    and `direction_same_as_clip_end` the direction of the clip's last 9 frames (marks a correct bounce as wrong)."""
    kept, direction, first_leg, same_as_end = [], [], [], []
    given_frames = 33
    prompts = [p for p in sample_eval_prompts(4 * n, seed + 3, num_frames=given_frames)
               if p.spec.direction != "still"]
    for i, item in enumerate(prompts[:n]):
        world = render_clip(item.spec, frames)  # the scene carried on: what a perfect extension would show
        truth = world[:given_frames]
        path = folder / f"clip_{i}.mp4"
        write_video(truth, path, fps=24, crf=12)
        made = engine.generate_frames(GenerationOptions(mode="extend", prompt=item.caption, references=(str(path),),
                                                        num_frames=frames, motion_score=item.spec.motion_score,
                                                        seed=seed + i))
        raw = _frames(made.raw)  # the sample before the user's clip is stitched back
        kept.append(_mean([_psnr_capped(raw[t], truth[t]) for t in range(given_frames)]))
        made_way, world_way = continuation_directions(raw[given_frames - 1:], world[given_frames - 1:])
        direction.append(float(made_way == world_way))
        went = motion_direction(raw[given_frames - 1:])
        first_leg.append(float(went == motion_direction(world[given_frames - 1:])))
        same_as_end.append(float(went == motion_direction(truth[-9:])))
    return {"clips": len(kept), "kept_frames_psnr_db": _mean(kept), "direction_follows_world": _mean(direction),
            "direction_follows_world_first_leg": _mean(first_leg), "direction_same_as_clip_end": _mean(same_as_end)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shapes-default",
                   help="a preset name, or a folder written by train_default (config.json + weights)")
    p.add_argument("--t2v", type=int, default=100)
    p.add_argument("--i2v", type=int, default=40)
    p.add_argument("--loop", type=int, default=30)
    p.add_argument("--extend", type=int, default=30)
    p.add_argument("--ceiling", type=int, default=48, help="clips for the VAE-reconstruction ceiling (0: skip)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--image-first", action="store_true", help="t2v as the studio's Image first: frame, then i2v")
    p.add_argument("--extend-frames", type=int, default=65)
    p.add_argument("--from-noise", type=_noise_levels, default=None, metavar="T0[,T0...]",
                   help="also sample the t2v prompts (36 when --t2v is 0) from their real clip noised to these "
                        "levels (e.g. 1,0.5,0.15)")
    p.add_argument("--swap-shape", action="store_true",
                   help="with --from-noise: captions name another shape than the clip's (does the model follow "
                        "the caption or the noisy latent?)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    random.seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        preset = load_embedded_preset(Path(args.preset)) if Path(args.preset).is_dir() else args.preset
        engine = Engine(preset, device="cpu", output_dir=folder / "out", preview_every=0).load()
        report = {"preset": engine.preset.name, "trained": engine.preset.trained}
        if args.t2v:
            report["t2v"] = evaluate_t2v(engine, args.t2v, args.seed, args.frames, args.image_first)
        if args.i2v:
            report["i2v"] = evaluate_i2v(engine, args.i2v, args.seed, args.frames, folder)
        if args.loop:
            report["loop"] = evaluate_loop(engine, args.loop, args.seed, args.frames, folder)
        if args.extend:
            report["extend"] = evaluate_extend(engine, args.extend, args.seed, args.extend_frames, folder)
        if args.ceiling:
            report["vae_ceiling"] = evaluate_vae_ceiling(engine, args.ceiling, args.seed, args.frames)
        if args.from_noise:
            report["from_noise"] = evaluate_from_noise(engine, args.t2v or 36, args.seed, args.frames,
                                                       args.from_noise, args.swap_shape)
    report["clips"] = sum(report[m]["clips"] for m in ("t2v", "i2v", "loop", "extend") if m in report)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["targets"] = TARGETS
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.json:
        args.json.write_text(text)
    return report


if __name__ == "__main__":
    main()
