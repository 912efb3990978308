"""Batch CLI: `python -m pipelines.generate --prompt "..."` or `--csv prompts.csv`, printing where each result went.

CSV columns (like upstream's inference script): text (required), ref (optional; `a.png;b.png` for a two-image
loop), neg, name, cond_type (t2v, i2v_head, i2v_tail, i2v_loop, v2v_head, v2v_tail, *_easy).
Every row and its reference files are checked before the first one runs (exit 2 with the row's problem); a row
that fails while running is reported and the rest still run (exit 1 at the end).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

from pipelines.options import GenerationOptions, OptionsError
from pipelines.presets import DEFAULT_PRESET, available_presets

COND_TO_MODE = {"t2v": dict(mode="t2v"), "i2v_head": dict(mode="i2v", i2v_position="head"),
                "i2v_tail": dict(mode="i2v", i2v_position="tail"), "i2v_loop": dict(mode="loop"),
                "v2v_head": dict(mode="extend"), "v2v_tail": dict(mode="extend", extend_direction="backward"),
                "v2v_head_easy": dict(mode="extend", extend_easy=True),
                "v2v_tail_easy": dict(mode="extend", extend_direction="backward", extend_easy=True)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--csv", type=Path, help="a CSV with a `text` column (and optional ref, neg, name, cond_type)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(available_presets())}")
    p.add_argument("--weights-dir", help="local folder with the official weights (official presets)")
    p.add_argument("--cond-type", default="t2v", choices=sorted(COND_TO_MODE))
    p.add_argument("--ref", help="reference image/video path (`a.png;b.png` for a two-image loop)")
    p.add_argument("--neg", default="", help="negative prompt")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--seed", type=int, help="noise seed (default: random, printed)")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--resolution")
    p.add_argument("--aspect-ratio")
    p.add_argument("--fps", type=int)
    p.add_argument("--motion-score", help="1-7, or `dynamic` to ask the LLM")
    p.add_argument("--steps", type=int, dest="num_steps")
    p.add_argument("--guidance", type=float)
    p.add_argument("--guidance-img", type=float)
    p.add_argument("--image-first", action="store_true",
                   help="t2v rows: make the first frame, then animate it (image-to-video)")
    p.add_argument("--segments", type=int, default=1,
                   help="extension rows (v2v_*): repeat the extension this many times, each from the video so far")
    p.add_argument("--refine", action="store_true", help="refine prompts with the LLM in OPENAI_* settings")
    p.add_argument("--prompt-as-path", action="store_true", help="put the prompt in the file name")
    p.add_argument("--no-metadata", action="store_true",
                   help="leave the recipe out of each video's comment tag (the JSON beside it is still written)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU between stages (small GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the MMDiT (faster on a GPU after the "
                                                          "first clip of each size)")
    return p


def read_rows(args) -> list[dict]:
    if args.prompt is not None:
        return [{"text": args.prompt, "ref": args.ref or "", "neg": args.neg, "name": "",
                 "cond_type": args.cond_type}]
    if not args.csv.is_file():
        raise OptionsError(f"CSV file not found: {args.csv}")
    with args.csv.open(newline="", encoding="utf-8-sig") as f:  # (-sig: Excel starts its CSVs with a BOM)
        rows = list(csv.DictReader(f))
    if not rows or "text" not in rows[0]:
        raise OptionsError(f"{args.csv} needs a header with a `text` column")
    return rows


def row_options(row: dict, args) -> GenerationOptions:
    cond_type = (row.get("cond_type") or args.cond_type).strip()
    if cond_type not in COND_TO_MODE:
        raise OptionsError(f"unknown cond_type {cond_type!r}; expected one of {', '.join(sorted(COND_TO_MODE))}")
    refs = tuple(r.strip() for r in (row.get("ref") or "").split(";") if r.strip())
    motion = args.motion_score
    if motion is not None and motion != "dynamic":
        motion = int(motion) if motion.isdigit() else motion
    name = (row.get("name") or "").strip() or (row["text"] if args.prompt_as_path else None)
    segments = args.segments if cond_type.startswith("v2v") else 1
    return GenerationOptions(**COND_TO_MODE[cond_type], segments=segments,
                             image_first=args.image_first and cond_type == "t2v", prompt=row["text"],
                             negative_prompt=row.get("neg") or "",
                             references=refs, seed=args.seed, num_frames=args.num_frames,
                             resolution=args.resolution, aspect_ratio=args.aspect_ratio, fps=args.fps,
                             motion_score=motion, num_steps=args.num_steps, guidance=args.guidance,
                             guidance_img=args.guidance_img, refine=args.refine, name=name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from pipelines.engine import Engine
        from pipelines.presets import get_preset
        from pipelines.stages import check_references

        rows = read_rows(args)
        engine = Engine(get_preset(args.preset, args.weights_dir), device=args.device, offload=args.offload,
                        compile=args.compile, output_dir=args.out, embed_recipe=not args.no_metadata)
        requests = [row_options(row, args) for row in rows]
        for i, options in enumerate(requests, 1):  # every row, and its references, before the first one runs
            try:
                resolved = engine.check(options)
                check_references(resolved.cond_type, resolved.references)
            except (ValueError, OSError) as exc:
                raise OptionsError(f"row {i}: {exc}" if len(requests) > 1 else str(exc)) from None
        if not engine.preset.trained:
            print(f"note: preset {engine.preset.name} holds untrained weights", file=sys.stderr)
    except (ValueError, OSError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for i, options in enumerate(requests, 1):
        try:
            result = engine.run(options)
        except (ValueError, OSError, MemoryError) as exc:  # one row failing does not cost the rows after it
            failed += 1
            print(f"[{i}/{len(requests)}] error: {exc}", file=sys.stderr)
            continue
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"[{i}/{len(requests)}] {result.video_path} (seed {result.seed}, recipe {result.recipe_path.name})")
    if failed:
        print(f"error: {failed} of {len(requests)} rows failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
