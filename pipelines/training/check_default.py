"""Quick sanity check of a trained Shapes preset: generate with `denoise` and read the clips with the judge.

    python -m pipelines.training.check_default [--folder assets/shapes-default] [--n 8] [--guidance 4 6]

Reports t2v colour / shape / direction accuracy per text-guidance scale, and i2v first-frame PSNR. A rough check
for the trainer, not the project's evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pipelines.conditions import ReferenceLatents, prepare_inference_condition, replace_conditioned_frames
from pipelines.models.mmdit import MMDiT, MMDiTConfig
from pipelines.models.vae import CausalVAE, CausalVAEConfig
from pipelines.presets import ASSETS_DIR, DEFAULT_PRESET
from pipelines.sampling import (GuidanceOptions, TextEmbeds, denoise, get_noise, get_schedule, pack,
                                prepare_img_ids, unpack)
from pipelines.text import build_prompt
from pipelines.training.judge import judge_clip, psnr
from pipelines.training.shapes import render_clip, sample_eval_prompts
from pipelines.training.train import load_text_encoder
from pipelines.training.train_default import to_uint8

logger = logging.getLogger(__name__)


def load_preset_models(folder: Path) -> tuple[MMDiT, CausalVAE, dict]:
    config = json.loads((folder / "config.json").read_text())
    mmdit = MMDiT(MMDiTConfig.from_dict(config["mmdit"]))
    mmdit.load_state_dict(safetensors.torch.load_file(folder / "mmdit.safetensors"))
    vae = CausalVAE(CausalVAEConfig.from_dict(config["vae"]))
    vae.load_state_dict(safetensors.torch.load_file(folder / "vae.safetensors"))
    return mmdit.eval(), vae.eval(), config


@torch.inference_mode()
def generate(mmdit, vae, encoder, prompts: list[str], opts: GuidanceOptions, num_frames: int = 33, seed: int = 0,
             cond_type: str = "t2v", refs: ReferenceLatents | None = None) -> np.ndarray:
    """Clips (N, T, H, W, 3) uint8 for already formatted prompts."""
    n, channels = len(prompts), vae.config.latent_channels
    t_lat, hw = vae.latent_frames(num_frames), 64 // vae.config.spatial_compression_ratio
    z = get_noise(n, channels, t_lat, hw, hw, seed)  # (N, C, T, h, w)
    txt, _, y_vec = encoder(prompts)
    null_txt, _, null_y = encoder([""] * n)
    masks, masked = prepare_inference_condition(z, cond_type, refs)
    cond = pack(torch.cat([masks, masked], dim=1)) if mmdit.config.cond_embed else None
    steps = get_schedule(opts.num_steps, (hw // 2) ** 2, t_lat)
    out = denoise(mmdit, pack(z), prepare_img_ids(n, t_lat, hw, hw), TextEmbeds(txt, y_vec),
                  TextEmbeds(null_txt, null_y), cond, steps, opts, t_lat,
                  temporal_image_guidance="i2v" in cond_type)
    latents = replace_conditioned_frames(unpack(out, t_lat, hw, hw), masks, masked)
    video = vae.decode(latents)[:, :, :num_frames]  # (N, 3, T, H, W)
    return to_uint8(video).permute(0, 2, 3, 4, 1).numpy()


def check_t2v(mmdit, vae, encoder, n: int, guidance: float, seed: int = 0) -> dict:
    prompts = sample_eval_prompts(n, seed)
    texts = [build_prompt(p.caption, 24, p.spec.motion_score) for p in prompts]
    clips = generate(mmdit, vae, encoder, texts, GuidanceOptions(num_steps=30, guidance=guidance), seed=seed)
    reports = [judge_clip(clip, p.spec) for clip, p in zip(clips, prompts)]
    rate = lambda key: float(np.mean([r[key] for r in reports]))  # noqa: E731
    return {"guidance": guidance, "color": rate("color_correct"), "shape": rate("shape_correct"),
            "direction": rate("direction_correct"), "background": rate("background_correct"), "n": n}


def check_i2v(mmdit, vae, encoder, n: int, guidance: float, guidance_img: float, seed: int = 0) -> dict:
    prompts = sample_eval_prompts(n, seed + 1)
    first = np.stack([render_clip(p.spec, 1) for p in prompts])  # (N, 1, H, W, 3)
    x = torch.from_numpy(first).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (N, 3, 1, H, W)
    with torch.inference_mode():
        head = vae.encode(x)
    texts = [build_prompt(p.caption, 24, p.spec.motion_score) for p in prompts]
    opts = GuidanceOptions(num_steps=30, guidance=guidance, guidance_img=guidance_img)
    clips = generate(mmdit, vae, encoder, texts, opts, seed=seed, cond_type="i2v_head",
                     refs=ReferenceLatents(head=head))
    psnrs = [psnr(clip[0], f[0]) for clip, f in zip(clips, first)]
    reports = [judge_clip(clip, p.spec) for clip, p in zip(clips, prompts)]
    return {"first_frame_psnr_db": float(np.mean(psnrs)),
            "direction": float(np.mean([r["direction_correct"] for r in reports]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=ASSETS_DIR / DEFAULT_PRESET)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="*", default=[4.0])
    parser.add_argument("--guidance-img", type=float, default=2.0)
    parser.add_argument("--i2v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(__import__("os").environ.get("CHECK_THREADS", "2")))
    mmdit, vae, _ = load_preset_models(args.folder)
    encoder = load_text_encoder(32)
    for g in args.guidance:
        logger.info("t2v %s", check_t2v(mmdit, vae, encoder, args.n, g))
    if args.i2v:
        logger.info("i2v %s", check_i2v(mmdit, vae, encoder, args.n, args.guidance[0], args.guidance_img))


if __name__ == "__main__":
    main()
