"""Render the studio's example inputs from the Shapes world: a few 64×64 images, one 65-frame clip, and prompts.

Run from the repository root: `python assets/examples/make_examples.py`. The outputs are tiny and committed, so the
studio never renders them at start-up. A fixed seed keeps the files identical between runs.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image

# A plain script run from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.media import write_video
from pipelines.training.shapes import FPS, caption_for, render_clip, sample_spec

HERE = Path(__file__).resolve().parent
SIZE = 64
CLIP_FRAMES = 65
SEED = 2026


def save_frame(frame, name: str) -> str:
    """Write one (H, W, 3) uint8 frame as a PNG next to this script and return its file name."""
    Image.fromarray(frame).save(HERE / name, format="PNG", optimize=True)
    return name


def make_examples() -> dict:
    """Render every example file and return the manifest the studio reads (examples.json)."""
    rng = random.Random(SEED)
    t2v = [caption_for(sample_spec(rng, num_frames=33, **fixed), rng) for fixed in
           ({"shape": "circle", "color": "red", "background": "black", "direction": "right"},
            {"shape": "square", "color": "blue", "background": "white", "direction": "down"},
            {"shape": "triangle", "color": "yellow", "background": "gray", "direction": "still", "motion_score": 1})]
    i2v = []
    for index, fixed in enumerate(({"shape": "circle", "color": "green", "background": "black", "direction": "left"},
                                   {"shape": "square", "color": "orange", "background": "gray", "direction": "up"})):
        spec = sample_spec(rng, num_frames=33, **fixed)
        first = render_clip(spec, 33, SIZE)[0]
        i2v.append({"prompt": caption_for(spec, rng), "image": save_frame(first, f"i2v_{index}.png")})
    spec = sample_spec(rng, num_frames=33, loop=True, shape="circle", color="purple", background="white",
                       direction="right")
    loop = [{"prompt": caption_for(spec, rng), "image": save_frame(render_clip(spec, 33, SIZE)[0], "loop_0.png")}]
    spec = sample_spec(rng, num_frames=33, shape="square", color="red", background="gray", direction="right")
    clip = render_clip(spec, 33, SIZE)
    loop.append({"prompt": caption_for(spec, rng), "image": save_frame(clip[0], "loop_first.png"),
                 "last_image": save_frame(clip[-1], "loop_last.png")})
    spec = sample_spec(rng, num_frames=CLIP_FRAMES, shape="circle", color="blue", background="black",
                       direction="right", motion_score=2)
    write_video(render_clip(spec, CLIP_FRAMES, SIZE), HERE / "clip_65.mp4", FPS)
    caption = caption_for(spec, rng)
    # The same clip extended twice, the second segment with its own prompt (|k| starts segment k, from 0).
    still = caption_for(sample_spec(rng, num_frames=CLIP_FRAMES, shape="circle", color="blue", background="black",
                                    direction="still", motion_score=1), rng)
    extend = [{"prompt": caption, "video": "clip_65.mp4", "segments": 1},
              {"prompt": f"|0|{caption}|1|{still}", "video": "clip_65.mp4", "segments": 2}]
    manifest = {"t2v": [{"prompt": p} for p in t2v], "i2v": i2v, "loop": loop, "extend": extend}
    (HERE / "examples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    make_examples()
