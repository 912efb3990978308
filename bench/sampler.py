"""CPU benchmark of the embedded default: skipping sampler vs the plain three-branch loop, side by side.

    python bench/sampler.py [--preset shapes-default] [--frames 33] [--repeats 5] [--cold-start]
    python bench/sampler.py --smoke        # 9 frames, one repeat (the test suite runs this so it cannot rot)

Prints, for t2v and i2v: ms per model call (branch evaluation), model calls per run, sampling and total wall time
per clip (text encode + sample + VAE decode), and the ratio of the plain loop to the skipping one. With --cold-start
it also times `python app.py` from process start to the first page served, and the engine's time to first preview.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.engine import Engine, PreviewEvent  # noqa: E402
from pipelines.options import GenerationOptions  # noqa: E402
from pipelines.sampling import DenoiseCounter, GuidanceOptions  # noqa: E402
from pipelines.stages import (ReferencePixels, decode_video, encode_references, encode_text,  # noqa: E402
                              latent_shape, sample)


def run_once(engine: Engine, mode: str, frames: int, skip_known: bool, image) -> dict:
    """One clip at the reference image's size: text encoding, sampling and decoding, timed by stage."""
    c, s = engine.components, engine.preset.sampling
    t0 = time.perf_counter()
    text, neg = encode_text(c.text_encoder, "a red circle moving to the right on a black background. 24 FPS. "
                            "4 motion score.", "")
    cond_type = "i2v_head" if mode == "i2v" else "t2v"
    refs = encode_references(c.vae, ReferencePixels(head=image if mode == "i2v" else None), engine.device, c.dtype)
    latent = latent_shape(c.vae, frames, *image.shape[-2:])
    counter = DenoiseCounter()
    opts = GuidanceOptions(num_steps=s.num_steps, guidance=s.guidance, guidance_img=s.guidance_img)
    t1 = time.perf_counter()
    with torch.inference_mode():
        z = sample(c.mmdit, text, neg, refs, cond_type, latent, 0, opts, counter=counter, skip_known=skip_known)
    t2 = time.perf_counter()
    decode_video(c.vae, z, frames)
    t3 = time.perf_counter()
    return {"mode": mode, "sampler": "skipping" if skip_known else "three-branch", "steps": s.num_steps,
            "model_calls": counter.branch_evals, "forwards": counter.forwards,
            "ms_per_model_call": 1000 * (t2 - t1) / counter.branch_evals, "sample_s": t2 - t1,
            "total_s": t3 - t0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start_s(timeout: float = 180.0) -> float:
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--host", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("the studio did not serve its page in time")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def first_preview_s(engine: Engine) -> float:
    engine.preview_every = 1
    start, seen = time.perf_counter(), []
    engine.run(GenerationOptions(prompt="a red circle moving to the right on a black background", seed=0),
               on_event=lambda e: seen.append(time.perf_counter() - start) if isinstance(e, PreviewEvent) else None)
    return seen[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shapes-default")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode and sampler (the median is kept)")
    p.add_argument("--cold-start", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true", help="9 frames, one repeat: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.smoke:
        args.frames, args.repeats = 9, 1
    engine = Engine(args.preset, device="cpu", output_dir=Path("/tmp/bench-outputs")).load()
    size = engine.check(GenerationOptions(prompt="bench", num_frames=args.frames))  # the preset's default size
    image = torch.zeros(3, 1, size.height, size.width)  # a red square a quarter of the frame across
    top, left = size.height // 3, size.width // 3
    image[0, :, top:top + size.height // 4, left:left + size.width // 4] = 0.7
    cases = [(mode, skip) for mode in ("t2v", "i2v") for skip in (True, False)]
    for mode, skip in cases:  # warm-up: every mode and sampler once, so none pays first-use costs in the timing
        run_once(engine, mode, args.frames, skip, image)
    runs: dict[tuple[str, bool], list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved: a slow spell on the machine hits both samplers alike
        for mode, skip in cases:
            runs[mode, skip].append(run_once(engine, mode, args.frames, skip, image))
    rows = []
    for case in cases:
        row = {**runs[case][0], **{k: float(np.median([r[k] for r in runs[case]]))
                                   for k in ("ms_per_model_call", "sample_s", "total_s")}}
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = {"threads": torch.get_num_threads(), "frames": args.frames, "size": [size.height, size.width],
               "rows": rows}
    for mode in ("t2v", "i2v"):
        fast, plain = (next(r for r in rows if r["mode"] == mode and r["sampler"] == s)
                       for s in ("skipping", "three-branch"))
        summary[f"{mode}_speedup"] = plain["sample_s"] / fast["sample_s"]
        summary[f"{mode}_call_ratio"] = plain["model_calls"] / fast["model_calls"]
    summary["first_preview_s"] = first_preview_s(engine)
    if args.cold_start:
        summary["cold_start_s"] = cold_start_s()
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items() if k != "rows"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
