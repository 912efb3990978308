"""Rebuild the embedded default (`assets/shapes-default/`) end to end on Shapes clips.

    python -m pipelines.training.train_default [--minutes-vae 47 --minutes-dit 72 --minutes-decoder 25]
    python -m pipelines.training.train_default --init-only     # random weights, labelled untrained

1. trains the causal VAE (`shapes-vae` preset) for the VAE budget;
2. measures its latent statistics and stores scale_factor / shift_factor so latents have ~unit variance;
3. trains the MMDiT (`shapes-dit` preset: t2v, i2v head/tail/loop, v2v head/tail) on the frozen VAE + MiniLM;
4. fine-tunes the VAE's decoder alone (`shapes-decoder`: the latent space, so the MMDiT, stays valid);
5. writes config.json, mmdit.safetensors (EMA weights) and vae.safetensors, fp32 (`--mmdit-dtype float16` halves
   the MMDiT file; loading casts it back to the run's dtype), atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pipelines.models.mmdit import MMDiT, MMDiTConfig
from pipelines.models.vae import CausalVAE, CausalVAEConfig
from pipelines.presets import ASSETS_DIR, DEFAULT_PRESET
from pipelines.training.train_config import SHAPES_MMDIT, SHAPES_VAE, load_train_config

logger = logging.getLogger(__name__)

SAMPLING = dict(resolution="64px", aspect_ratio="1:1", resolutions=["64px"], aspect_ratios=["1:1"], num_frames=33,
                max_frames=65, fps=24, motion_score=4, num_steps=30, guidance=4.0, guidance_img=2.0,
                max_pixels=4096)
DESCRIPTION = ("Tiny Open-Sora-style model trained on the procedural Shapes world (64x64, 24 fps): "
               "one coloured circle, square or triangle moving left/right/up/down or still on a plain background.")


@torch.no_grad()
def round_trip(vae: CausalVAE, clip: np.ndarray) -> np.ndarray:
    """A uint8 clip (T, H, W, 3) through the VAE (encode, decode) and back to uint8 (T, H, W, 3), on the VAE's
    device and dtype."""
    from pipelines.media import from_uint8_frames, to_uint8_frames

    weight = next(vae.parameters())
    x = from_uint8_frames(clip)[None].to(weight.device, weight.dtype)
    recon = vae.decode(vae.encode(x))[0, :, :clip.shape[0]]  # (3, T, H, W)
    return to_uint8_frames(recon)  # raises on NaN/inf: a diverged VAE must not read as black frames


@torch.no_grad()
def measure_vae(vae: CausalVAE, clips: int = 16, num_frames: int = 33, seed: int = 1234) -> dict:
    """Latent mean/std of the *unscaled* posterior mean, and reconstruction PSNR (whole clip, first frame)."""
    from pipelines.media import to_uint8_frames
    from pipelines.training.judge import psnr
    from pipelines.training.shapes import ShapesDataset

    data = ShapesDataset(clips, num_frames=num_frames, loop_fraction=0.1, seed=seed)
    x = torch.stack([data[i]["video"] for i in range(clips)])  # (N, 3, T, H, W)
    cfg = vae.config
    z = torch.cat([vae.encode(chunk) for chunk in x.split(4)])  # (N, C, T_lat, h, w), scaled
    z = z / cfg.scale_factor + cfg.shift_factor  # back to the raw posterior mean
    recon = torch.cat([vae.decode(vae.encode(chunk)) for chunk in x.split(4)])
    first = torch.cat([vae.decode(vae.encode(chunk[:, :, :1])) for chunk in x.split(4)])  # images alone
    real, fake, fake_first = (np.stack([to_uint8_frames(clip) for clip in videos]) for videos in (x, recon, first))
    return {"latent_mean": float(z.mean()), "latent_std": float(z.std()),  # (clips are (N, T, H, W, 3) here)
            "recon_psnr_db": psnr(real, fake), "first_frame_psnr_db": psnr(real[:, :1], fake_first),
            **colour_fidelity(vae, seed=seed)}


@torch.no_grad()
def colour_fidelity(vae: CausalVAE, num_frames: int = 9, seed: int = 1234) -> dict:
    """How well reconstructions keep the object's colour, one moving square per colour/background pair: the
    share the judge names right, and the mean error (0-255 levels) of the object's mean colour.

    PSNR over whole frames hides this: the object is ~5% of a frame, and a VAE that decodes every object as
    the same brown still scores 27 dB."""
    from pipelines.training.judge import judge_clip
    from pipelines.training.shapes import BACKGROUNDS, COLORS, render_clip, sample_spec

    rng, right, errors = random.Random(seed), [], []
    for background in BACKGROUNDS:
        for color in COLORS:
            if color == background:
                continue
            spec = sample_spec(rng, num_frames=num_frames, color=color, background=background, shape="square")
            clip = render_clip(spec, num_frames)  # (T, H, W, 3) uint8
            recon = round_trip(vae, clip)
            right.append(bool(judge_clip(recon, spec)["color_correct"]))
            on_object = np.abs(clip.astype(np.int32) - np.asarray(BACKGROUNDS[background])).sum(-1) > 60
            errors.append(np.abs(recon[on_object].mean(0) - clip[on_object].mean(0)).mean())
    return {"object_colour_right": float(np.mean(right)), "object_colour_error": float(np.mean(errors))}


def write_preset(folder: Path, mmdit: MMDiT, vae: CausalVAE, trained: bool, notes: str, training: dict | None,
                 sampling: dict | None = None, mmdit_dtype: torch.dtype = torch.float32) -> None:
    """Write config.json + both weight files into a temp folder, then swap it in place of `folder`. The MMDiT file
    may be stored in float16 (`mmdit_dtype`) to halve it; the VAE always stays fp32."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {"name": DEFAULT_PRESET, "description": DESCRIPTION, "trained": trained, "text_encoder": "minilm",
              "mmdit": mmdit.config.to_dict(), "vae": vae.config.to_dict(), "sampling": sampling or dict(SAMPLING),
              "notes": notes, "training": training or {}}
    def to_save(model, dtype):
        return {k: v.detach().to(dtype=dtype if v.is_floating_point() else None).contiguous().cpu()
                for k, v in model.state_dict().items()}

    safetensors.torch.save_file(to_save(mmdit, mmdit_dtype), tmp / "mmdit.safetensors")
    safetensors.torch.save_file(to_save(vae, torch.float32), tmp / "vae.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; the preset is shared
    tmp.chmod(0o755)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s (trained=%s)", folder, trained)


def init_only(folder: Path, seed: int) -> None:
    """A loadable preset with randomly initialised weights, marked untrained."""
    torch.manual_seed(seed)
    mmdit = MMDiT(MMDiTConfig.from_dict(SHAPES_MMDIT))
    mmdit.initialize_weights()
    vae = CausalVAE(CausalVAEConfig.from_dict(SHAPES_VAE))
    write_preset(folder, mmdit, vae, trained=False, training={"command": " ".join(sys.argv), "steps": 0},
                 notes="Randomly initialised placeholder: it produces noise until train_default has run.")


def rescaled_vae(vae: CausalVAE, stats: dict) -> CausalVAE:
    """The same weights with scale/shift set so encoded latents have ~zero mean and unit variance."""
    config = {**vae.config.to_dict(), "scale_factor": 1.0 / stats["latent_std"], "shift_factor": stats["latent_mean"]}
    out = CausalVAE(CausalVAEConfig.from_dict(config))
    out.load_state_dict(vae.state_dict())
    return out.requires_grad_(False).eval()


def train_vae(work: Path, minutes: float, overrides: list[str], load: str | None = None) -> tuple[CausalVAE, dict]:
    from pipelines.training.train import train

    cfg = load_train_config("shapes-vae", [f"outputs={work / 'vae'}", f"time_budget_min={minutes}", *overrides])
    result = train(cfg, load=load)
    vae = result.model.requires_grad_(False).eval()
    stats = measure_vae(vae)
    vae = rescaled_vae(vae, stats)
    stats.update(steps=result.steps, final_loss=result.final_loss, wall_time_s=result.wall_time_s)
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, work / "vae.safetensors")
    (work / "vae_config.json").write_text(json.dumps({"vae": vae.config.to_dict(), "stats": stats}, indent=2))
    logger.info("VAE: %s", stats)
    return vae, stats


def load_saved_vae(work: Path) -> tuple[CausalVAE, dict]:
    saved = json.loads((work / "vae_config.json").read_text())
    vae = CausalVAE(CausalVAEConfig.from_dict(saved["vae"]))
    vae.load_state_dict(safetensors.torch.load_file(work / "vae.safetensors"))
    return vae.requires_grad_(False).eval(), saved["stats"]


def train_dit(work: Path, vae: CausalVAE, minutes: float, overrides: list[str],
              load: str | None = None) -> tuple[MMDiT, dict]:
    """Train (or, with `load`, continue) the MMDiT on the frozen VAE; returns its EMA weights and a stats record
    (also in dit_stats.json; a continued run adds the wall time recorded there before)."""
    from pipelines.training.train import train

    cfg = load_train_config("shapes-dit", [f"outputs={work / 'dit'}", f"time_budget_min={minutes}",
                                           f"vae={json.dumps(vae.config.to_dict())}",
                                           f"vae_weights={work / 'vae.safetensors'}",
                                           f"data.pool_cache={work / 'pool-cache'}", *overrides])
    stats_file = work / "dit_stats.json"
    before = json.loads(stats_file.read_text())["wall_time_s"] if load and stats_file.is_file() else 0.0
    result = train(cfg, load=load)
    stats = {"steps": result.steps, "final_loss": result.final_loss, "wall_time_s": before + result.wall_time_s,
             "checkpoint": str(result.checkpoint)}
    (work / "dit_stats.json").write_text(json.dumps(stats, indent=2))
    return result.ema or result.model, stats


def load_saved_dit(work: Path, checkpoint: Path) -> tuple[MMDiT, dict]:
    """The EMA weights of a DiT checkpoint, and the stats of the run that wrote it."""
    config = json.loads((checkpoint / "config.json").read_text())
    mmdit = MMDiT(MMDiTConfig.from_dict(config["model"]))
    mmdit.load_state_dict(safetensors.torch.load_file(checkpoint / "ema.safetensors"))
    running = json.loads((checkpoint / "running_states.json").read_text())
    stats_file = work / "dit_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"wall_time_s": None, "final_loss": None}
    return mmdit.eval(), {**stats, "steps": running["global_step"], "checkpoint": str(checkpoint)}


def finetune_decoder(work: Path, vae: CausalVAE, minutes: float, overrides: list[str]) -> tuple[CausalVAE, dict]:
    """Fine-tune the VAE decoder on whole frames with the encoder frozen (the latent space, and the DiT, stay)."""
    from pipelines.training.train import train

    cfg = load_train_config("shapes-decoder", [f"outputs={work / 'decoder'}", f"time_budget_min={minutes}",
                                               f"vae={json.dumps(vae.config.to_dict())}",
                                               f"vae_weights={work / 'vae.safetensors'}", *overrides])
    result = train(cfg)
    tuned = CausalVAE(vae.config)
    tuned.load_state_dict(result.model.state_dict())
    tuned.requires_grad_(False).eval()
    stats = measure_vae(tuned)
    stats.update(steps=result.steps, final_loss=result.final_loss, wall_time_s=result.wall_time_s)
    logger.info("decoder fine-tune: %s", stats)
    return tuned, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes-vae", type=float, default=47.0)
    parser.add_argument("--minutes-dit", type=float, default=72.0)
    parser.add_argument("--minutes-decoder", type=float, default=25.0, help="decoder-only VAE fine-tune (last)")
    parser.add_argument("--dit-load", default=None, help="continue the DiT stage from this checkpoint folder")
    parser.add_argument("--reuse-dit", type=Path, default=None, help="skip the DiT stage: EMA of this checkpoint")
    parser.add_argument("--decoder-set", nargs="*", default=[], help="dotted overrides for the decoder stage")
    parser.add_argument("--init-only", action="store_true", help="write random weights marked untrained")
    parser.add_argument("--reuse-vae", action="store_true", help="skip the VAE stage, reuse WORK/vae.safetensors")
    parser.add_argument("--vae-load", default=None, help="resume the VAE stage from this checkpoint folder")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR / DEFAULT_PRESET)
    parser.add_argument("--work", type=Path, default=Path("runs/shapes-default"))
    parser.add_argument("--vae-set", nargs="*", default=[], help="dotted overrides for the VAE stage")
    parser.add_argument("--dit-set", nargs="*", default=[], help="dotted overrides for the DiT stage")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mmdit-dtype", choices=["float32", "float16"], default="float32",
                        help="storage dtype of mmdit.safetensors (float16 halves it; loading casts back)")
    args = parser.parse_args(argv)
    # A zero budget would mean "no time limit" to the trainer (the preset's full step count): refuse it here.
    if not args.init_only and not args.reuse_vae and args.minutes_vae <= 0:
        parser.error("--minutes-vae must be positive (use --reuse-vae to skip the VAE stage)")
    if not args.init_only and not args.reuse_dit and args.minutes_dit <= 0:
        parser.error("--minutes-dit must be positive (use --reuse-dit CHECKPOINT to skip the MMDiT stage)")
    from pipelines.training.train import setup_logging

    args.work.mkdir(parents=True, exist_ok=True)
    setup_logging(args.work / "log.txt")
    if args.init_only:
        init_only(args.out, args.seed)
        return
    started = time.time()
    vae, vae_stats = load_saved_vae(args.work) if args.reuse_vae else train_vae(args.work, args.minutes_vae,
                                                                                 args.vae_set, args.vae_load)
    mmdit, dit_stats = (load_saved_dit(args.work, args.reuse_dit) if args.reuse_dit
                        else train_dit(args.work, vae, args.minutes_dit, args.dit_set, args.dit_load))
    stages = {"vae": vae_stats, "dit": dit_stats}
    if args.minutes_decoder > 0:
        vae, stages["decoder"] = finetune_decoder(args.work, vae, args.minutes_decoder, args.decoder_set)
    measured = stages.get("decoder", vae_stats)
    training = {"command": "python -m pipelines.training." + " ".join(["train_default", *(argv or sys.argv[1:])]),
                # (a stage reused from a VAE saved by hand may lack its own record: counted as unknown)
                "wall_time_s": round(sum(s.get("wall_time_s") or 0 for s in stages.values()), 1),
                "this_process_wall_time_s": round(time.time() - started, 1),
                "steps": {k: s.get("steps") for k, s in stages.items()},
                "final_loss": {k: s.get("final_loss") for k, s in stages.items()},
                "vae_recon_psnr_db": round(measured["recon_psnr_db"], 2),
                "vae_first_frame_psnr_db": round(measured["first_frame_psnr_db"], 2),
                # stats a reused VAE saved before colour fidelity was measured lack it
                "vae_object_colour_right": (round(measured["object_colour_right"], 3)
                                            if "object_colour_right" in measured else None),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    steps = ", ".join(f"{k} {s.get('steps')} steps" for k, s in stages.items())
    notes = f"Trained on CPU (2 cores) in {training['wall_time_s'] / 60:.0f} min: {steps}; MMDiT EMA weights."
    write_preset(args.out, mmdit, vae, trained=True, notes=notes, training=training,
                 mmdit_dtype=getattr(torch, args.mmdit_dtype))
    logger.info("training record: %s", training)


if __name__ == "__main__":
    main()
