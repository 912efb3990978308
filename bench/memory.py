"""The memory estimate against measured peaks: the embedded default run at larger sizes, stage by stage, on this device.

    python bench/memory.py [--resolution 256px] [--frames 33 65 129] [--json out.json]
    python bench/memory.py --smoke          # 64px, 9 frames (the test suite runs this so it cannot rot)

For each length it runs one 2-step t2v request and records, per stage, how far memory rose above the stage's start
(process RSS sampled every 5 ms on CPU; the allocator's peak on CUDA), beside `pipelines.memory_estimate`'s
activations for that stage, its 10% headroom included (ratios near 1: the estimate matches this device). On CUDA each
stage restarts the allocator's peak counter, so the engine's own "peak of the last run" is not meaningful here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.engine import Engine, StageEvent  # noqa: E402
from pipelines.memory import PeakRSSSampler  # noqa: E402
from pipelines.options import GenerationOptions  # noqa: E402
from pipelines.presets import get_preset  # noqa: E402

MEASURED_STAGES = ("sample", "decode")


class StagePeaks:
    """An engine event callback that measures each stage's rise in memory."""

    def __init__(self, device):
        self.device, self.peaks, self._current = device, {}, None

    def __call__(self, event) -> None:
        if isinstance(event, StageEvent):
            self.close()
            self._current = (event.stage, PeakRSSSampler(0.005, device=self.device).__enter__())

    def close(self) -> None:
        if self._current is None:
            return
        stage, sampler = self._current
        sampler.__exit__(None, None, None)
        if sampler.peak_device_bytes is not None:  # CUDA: the allocator's peak above what the stage started with
            self.peaks[stage] = sampler.peak_device_bytes
        else:
            self.peaks[stage] = sampler.peak_increase_bytes
        self._current = None


def measure(engine: Engine, frames: int) -> dict:
    options = GenerationOptions(prompt="a red circle moving to the right on a black background", num_frames=frames,
                                num_steps=2, seed=1)
    estimate, _available = engine.estimate_memory(options)
    resident = sum(estimate.weights.values())
    peaks = StagePeaks(engine.device)
    try:
        engine.run(options, on_event=peaks)
    finally:
        peaks.close()  # stops the sampling thread even when the run fails
    row = {"frames": frames}
    for stage in MEASURED_STAGES:
        estimated = estimate.stages[stage] - resident
        measured = peaks.peaks.get(stage, 0)
        if engine.device.type == "cuda":
            measured -= resident  # the allocator peak includes the weights
        row[stage] = {"measured_mib": measured / 2**20, "estimated_mib": estimated / 2**20,
                      "ratio": measured / estimated if estimated else None}
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", default="256px")
    p.add_argument("--frames", type=int, nargs="+", default=[33, 65, 129])
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="64px, 9 frames")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    resolution, lengths = ("64px", [9]) if args.smoke else (args.resolution, args.frames)
    preset = get_preset("shapes-default")
    # The embedded default only offers 64px; widen its sampling limits to load it with more tokens and pixels.
    sampling = dataclasses.replace(preset.sampling, resolutions=(resolution,), resolution=resolution,
                                   max_pixels=10**8, max_frames=max(lengths))
    preset = dataclasses.replace(preset, sampling=sampling)
    engine = Engine(preset, device=args.device, output_dir=tempfile.mkdtemp(prefix="bench-memory-"),
                    preview_every=0).load()
    info = {"device": str(engine.device), "resolution": resolution, "results": []}
    measure(engine, lengths[0])  # warm-up: first-call allocations are not the run's
    for frames in lengths:
        row = measure(engine, frames)
        info["results"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
