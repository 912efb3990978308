"""GPU check: the released 11B MMDiT (random bf16 weights) and Hunyuan VAE, skipping vs three-branch.

    python bench/gpu_check.py                                   # 256x256, 129 frames; ~3 minutes on an H200
    python bench/gpu_check.py --resolution 768px --steps 1 --modes t2v --samplers skipping --no-vae
    python bench/gpu_check.py --smoke    # tiny config on the CPU (the test suite runs this so it cannot rot)

Reports s/step for t2v and i2v with the skipping sampler and with the plain three-branch loop (and, with
--compile, the same cases again with a torch.compile'd MMDiT), the projected 50-step
time, peak memory beside `pipelines.memory_estimate`'s estimate for the same batch (calibrate it here), and the VAE
decode of one 256px 129-frame latent; compare with Open-Sora's published 60 s / 52.5 GB for 256x256 on one H100
(README, with offload and tensor parallelism).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.memory_estimate import estimate_memory  # noqa: E402
from pipelines.models import CausalVAEConfig, build_causal_vae, build_mmdit  # noqa: E402
from pipelines.options import GenerationOptions, resolve_options  # noqa: E402
from pipelines.presets import get_preset  # noqa: E402
from pipelines.sampling import (DenoiseCounter, GuidanceOptions, TextEmbeds, denoise, get_schedule,  # noqa: E402
                                needed_branches, prepare_img_ids, prepare_txt_ids, step_scales)

SMOKE_MMDIT = dict(in_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64, num_heads=2,
                   axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1, cond_embed=True)
SMOKE_VAE = dict(latent_channels=16, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)


def random_init(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Materialise a meta-device model on `device` with small random weights (no checkpoint needed)."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.to(dtype).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def branch_evals_full_run(opts: GuidanceOptions, cond_type: str, t_lat: int, skip_known: bool) -> int:
    """Branch evaluations of a whole run, by the sampler's own rules (oscillating guidance, skipped branches)."""
    if not skip_known:
        return 3 * opts.num_steps
    return sum(len(needed_branches(*step_scales(opts, i, t_lat, cond_type == "i2v"), cond_type == "i2v"))
               for i in range(opts.num_steps))


def warm_up(model, t_lat, h_lat, w_lat, txt_len, device, dtype) -> None:
    """One forward at each guidance batch a run uses (1, 2 and 3 branches), so nothing timed later is a first call
    at its shape (a compiled model recompiles per shape and stride; kernels pick their algorithms on first use).
    The inputs are laid out as `denoise` lays them out (the position ids expanded, not copied)."""
    cfg = model.config
    n_tok = t_lat * (h_lat // 2) * (w_lat // 2)
    for k in (1, 2, 3):
        with torch.inference_mode():
            model(img=torch.randn(k, n_tok, cfg.in_channels, device=device, dtype=dtype),
                  img_ids=prepare_img_ids(1, t_lat, h_lat, w_lat, device=device).to(dtype).expand(k, -1, -1),
                  txt=torch.randn(k, txt_len, cfg.context_in_dim, device=device, dtype=dtype),
                  txt_ids=prepare_txt_ids(k, txt_len, device).to(dtype),
                  y_vec=torch.randn(k, cfg.vec_in_dim, device=device, dtype=dtype),
                  cond=torch.zeros(k, n_tok, cfg.in_channels + 4, device=device, dtype=dtype),
                  timesteps=torch.full((k,), 0.5, device=device, dtype=dtype),
                  guidance=torch.full((k,), 7.5, device=device, dtype=dtype))
    sync(device)


def time_sampler(model, cond_type, t_lat, h_lat, w_lat, txt_len, steps, skip_known, device, dtype):
    cfg = model.config
    n_tok = t_lat * (h_lat // 2) * (w_lat // 2)
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    text = TextEmbeds(rnd(1, txt_len, cfg.context_in_dim), rnd(1, cfg.vec_in_dim))
    neg = TextEmbeds(rnd(1, txt_len, cfg.context_in_dim), rnd(1, cfg.vec_in_dim))
    cond = torch.zeros(1, n_tok, cfg.in_channels + 4, device=device, dtype=dtype)
    if cond_type == "i2v":
        cond[:, : n_tok // t_lat] = 1.0  # the first latent frame is given
    ids = prepare_img_ids(1, t_lat, h_lat, w_lat, device=device).to(dtype)
    opts = GuidanceOptions(num_steps=50)
    # Time the first `steps` of a 50-step schedule, then project to 50 with the step mix of a full run.
    schedule = get_schedule(50, (h_lat // 2) * (w_lat // 2), t_lat)[: steps + 1]
    counter = DenoiseCounter()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        denoise(model, rnd(1, n_tok, cfg.in_channels), ids, text, neg, cond, schedule, opts, t_lat,
                temporal_image_guidance=cond_type == "i2v", skip_known=skip_known, counter=counter)
    sync(device)
    elapsed = time.perf_counter() - start
    per_branch = elapsed / counter.branch_evals
    full_evals = branch_evals_full_run(opts, cond_type, t_lat, skip_known)
    return {"mode": cond_type, "sampler": "skipping" if skip_known else "three-branch", "steps_timed": steps,
            "s_per_step": elapsed / steps, "branch_evals_timed": counter.branch_evals,
            "projected_50_steps_s": per_branch * full_evals, "branch_evals_50_steps": full_evals}


def estimated_sampling_gb(preset, opts, branches: int) -> float:
    """The estimate for this script's sampling batch: MMDiT and VAE weights + activations (no text encoder here)."""
    estimate = estimate_memory(preset, opts, device_type="cuda", dtype=torch.bfloat16, branches=branches)
    return (estimate.stages["sample"] - estimate.weights["text_encoder"]) / 1e9


def latent_size(preset, opts) -> tuple[int, int, int]:
    """(t_lat, h_lat, w_lat) of a released-model clip of these options."""
    vae = CausalVAEConfig.from_dict(preset.vae)
    s, t = vae.spatial_compression_ratio, vae.time_compression_ratio
    return (opts.num_frames - 1) // t + 1, opts.height // s, opts.width // s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps to time per case (default 12; 2 with --smoke)")
    p.add_argument("--resolution", default="256px", help="256px or 768px (default 256px)")
    p.add_argument("--aspect-ratio", default="1:1", help="default 1:1, the published 256x256 / 768x768 setting")
    p.add_argument("--frames", type=int, default=129, help="clip length (default 129, the released config's)")
    p.add_argument("--modes", default="t2v,i2v", help="comma-separated: t2v, i2v")
    p.add_argument("--samplers", default="skipping,three-branch", help="comma-separated: skipping, three-branch")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode timing")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd MMDiT, after the eager one")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    modes, samplers = args.modes.split(","), args.samplers.split(",")
    if not set(modes) <= {"t2v", "i2v"} or not set(samplers) <= {"skipping", "three-branch"}:
        p.error("--modes takes t2v,i2v and --samplers skipping,three-branch")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    preset = get_preset("opensora-v2-256px")
    mmdit_cfg = SMOKE_MMDIT if args.smoke else preset.mmdit
    vae_cfg = SMOKE_VAE if args.smoke else dict(preset.vae, use_spatial_tiling=True)
    opts = resolve_options(GenerationOptions(prompt="check", resolution=args.resolution,
                                             aspect_ratio=args.aspect_ratio, num_frames=args.frames), preset)
    t_lat, h_lat, w_lat = latent_size(preset, opts)
    txt_len = 512
    if args.smoke:  # the smoke run shrinks everything
        t_lat, h_lat, w_lat, txt_len = 3, 8, 8, 8
    steps = args.steps or (2 if args.smoke else 12)
    with torch.device("meta"):
        model = build_mmdit(**mmdit_cfg)
        vae = build_causal_vae(**vae_cfg)
    model, vae = random_init(model, device, dtype), random_init(vae, device, dtype)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "mmdit_params": sum(p.numel() for p in model.parameters()),
            "size": "smoke" if args.smoke else f"{opts.height}x{opts.width}x{opts.num_frames}",
            "latent": [t_lat, h_lat, w_lat],
            "tokens": t_lat * (h_lat // 2) * (w_lat // 2), "date": time.strftime("%Y-%m-%d"), "results": []}
    variants = [("eager", model)] + ([("compiled", torch.compile(model, dynamic=False))] if args.compile else [])
    for variant, net in variants:
        warm_up(net, t_lat, h_lat, w_lat, txt_len, device, dtype)  # every batch size is seen (and compiled)
        for mode in modes:
            for sampler in samplers:
                skip = sampler == "skipping"
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row = time_sampler(net, mode, t_lat, h_lat, w_lat, txt_len, steps, skip, device, dtype)
                row["variant"] = variant
                if device.type == "cuda":
                    row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                    row["estimated_gb"] = estimated_sampling_gb(preset, opts, 3 if mode == "i2v" or not skip else 2)
                info["results"].append(row)
                print(json.dumps(row), flush=True)
    if not args.no_vae:
        z = torch.randn(1, vae.config.latent_channels, t_lat, h_lat, w_lat, device=device, dtype=dtype)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            frames = vae.decode(z)
        sync(device)
        info["vae_decode_s"] = time.perf_counter() - start
        info["vae_decode_shape"] = list(frames.shape)
    if device.type == "cuda":
        info["peak_gb_overall"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps({k: v for k, v in info.items() if k != "results"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
