"""The engine: loads a preset once, keeps its models resident, and runs requests stage by stage.

refine -> encode text -> encode references -> sample -> decode -> save, reporting typed events on the way. The UI,
the batch CLI and the API all go through `Engine.run`, so they behave the same.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from pipelines.components import Components, load_components, pick_device, pick_dtype
from pipelines.memory import (MemoryStats, ParamStats, PeakRSSSampler, available_bytes, count_params, free_memory,
                              read_memory_stats, reset_peak)
from pipelines.media import write_video
from pipelines.memory_estimate import MemoryEstimate, estimate_memory
from pipelines.options import (MAX_SEED, GenerationOptions, ResolvedOptions, draw_seed, resolve_options,
                               with_seed)
from pipelines.presets import DEFAULT_PRESET, ModelPreset, get_preset
from pipelines.prompt_refine import LLMConfig, ask_motion_score, refine_images, refine_kind, refine_prompt
from pipelines.sampling import DenoiseCounter, GenerationStopped, StepInfo
from pipelines.saving import SavedResult, save_result
from pipelines.scratch import LINGER_S, remove_later, scratch_folder
from pipelines.stages import (ReferencePixels, clip_references, decode_video, encode_references, encode_text,
                              fit_preview_projection, guidance_options, latent_shape, load_reference_pixels,
                              preview_strip, sample, stitch_extension, video_strip)
from pipelines.text import build_prompt

log = logging.getLogger(__name__)
STAGES = ("refine", "encode_text", "encode_references", "sample", "decode", "save")
# Which models each stage needs on the GPU when offloading: policy as data, not scattered .to() calls.
OFFLOAD_PLAN = {"encode_text": ("text_encoder",), "encode_references": ("vae",), "sample": ("mmdit",),
                "decode": ("vae",)}


@dataclass(frozen=True)
class StageEvent:
    stage: str
    message: str
    kind: str = "stage"


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # steps done
    total: int
    elapsed_s: float
    eta_s: float
    kind: str = "progress"


@dataclass(frozen=True)
class PreviewEvent:
    image: object  # numpy uint8 (H, W, 3): a strip of predicted clean frames
    step: int
    kind: str = "preview"


@dataclass(frozen=True)
class PartialVideoEvent:
    path: Path  # a playable MP4 of the extension so far (a temporary file, removed a minute after the run)
    segments_done: int
    kind: str = "partial"


class _PartialVideos:
    """An extension's video so far, written after each segment to a temporary folder that is removed a minute
    after the run (a viewer may still be fetching the last one). Best effort: a partial that cannot be written
    is logged and skipped, never a reason to fail the run."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def write(self, video: torch.Tensor, done: int, fps: int) -> Path | None:
        try:
            self.folder = self.folder or scratch_folder("opensora-partial-")
            return write_video(video, self.folder / f"segments-1-to-{done}.mp4", fps)
        except (OSError, ValueError) as exc:
            log.warning("the video so far was not written: %s", exc)
            return None

    def close(self, delay_s: float = LINGER_S) -> None:
        if self.folder is not None:
            remove_later(self.folder, delay_s)


@dataclass(frozen=True)
class GenerationResult:
    video_path: Path
    recipe_path: Path
    recipe: dict
    seed: int
    warnings: tuple[str, ...] = ()
    kind: str = "result"


@dataclass(frozen=True)
class PromptText:
    """One prompt after the optional LLM stages, with its suffixes, encoded."""

    refined: str | None
    final: str  # with the FPS and motion-score suffixes, as the text encoder read it
    motion_score: int
    text: object  # TextEmbeds of `final`
    negative: object  # TextEmbeds of the negative prompt


@dataclass
class GeneratedVideo:
    options: ResolvedOptions
    video: torch.Tensor  # (3, T, H, W) in [-1, 1]: what is saved (extensions include the user's clip)
    raw: torch.Tensor  # (3, T, H, W) the decoded sample before stitching (the last segment's, for Extend)
    prompts: list[PromptText]  # one per segment (the same object where segments share a prompt)
    counter: DenoiseCounter
    timings: dict
    warnings: list[str]
    segments_done: int = 1
    stopped_early: bool = False  # Stop came during a later segment or step: what was finished is kept and saved


EventCallback = Callable[[object], None]


@dataclass
class RunState:
    """What the engine is doing now (read by the memory panel from another thread)."""

    stage: str = "idle"
    last_peak_bytes: int | None = None
    runs: int = 0
    extra: dict = field(default_factory=dict)


def _frame_rate_warning(source_fps: float | None, fps: int) -> list[str]:
    """An extension is made and saved at `fps`: a clip recorded at another rate changes speed in the result."""
    if not source_fps or abs(source_fps - fps) <= 0.01 * fps:
        return []
    return [f"the clip plays at {source_fps:.3g} fps but the extension is made and saved at {fps} fps, so the "
            f"clip's part plays {'slower' if source_fps > fps else 'faster'} than it was; set fps to "
            f"{round(source_fps)} to keep its speed"]


class Engine:
    def __init__(self, preset: ModelPreset | str | None = None, *, device: str | None = None, offload: bool = False,
                 output_dir: str | Path = "outputs", llm: LLMConfig | None = None, preview_every: int = 2,
                 compile: bool = False, embed_recipe: bool = True, partial_videos: bool = False,
                 keep_references: bool = True):
        self.preset = get_preset(preset or DEFAULT_PRESET) if not isinstance(preset, ModelPreset) else preset
        self.device = pick_device(device)
        self.offload = offload and self.device.type == "cuda"
        # torch.compile the MMDiT: 1.37x faster sampling for the 11B on an H200 (bench/gpu_check.py --compile); the
        # first run at each size and branch count compiles first (static shapes: no slower dynamic kernels).
        self.compile = compile
        self._compiled_for: set[tuple] = set()  # (latent shape, condition type) the compiled MMDiT has run
        self.output_dir = Path(output_dir)
        self.embed_recipe = embed_recipe  # the recipe in each file's comment tag too (the JSON sidecar always)
        self.partial_videos = partial_videos  # after each extension segment, the video so far (for a viewer)
        self.keep_references = keep_references  # copies of the reference media beside each result
        self.llm = llm or LLMConfig.from_env()
        self._run_llm = self.llm  # the endpoint of the run in progress (a studio session may bring its own)
        self.preview_every = preview_every
        self.state = RunState()
        self._components: Components | None = None
        self._projection = None
        self._lock = threading.Lock()  # one run at a time per engine (one engine per device)

    # ---- models --------------------------------------------------------------------------------------------------
    @property
    def components(self) -> Components:
        if self._components is None:
            home = torch.device("cpu") if self.offload else self.device
            self._components = load_components(self.preset, home, pick_dtype(self.device, self.preset.official))
            if self.compile:
                self._components.mmdit.compile(dynamic=False)  # in place: the module, its config and weights stay
        return self._components

    def load(self) -> "Engine":
        _ = self.components
        return self

    def unload(self) -> None:
        """Drop the models and free their memory; the next run loads them again."""
        self._components, self._projection = None, None
        self._compiled_for.clear()
        free_memory(self.device)

    def param_stats(self) -> list[ParamStats]:
        if self._components is None:
            return []
        c = self._components
        return [count_params(name, module, c.checkpoints.get(name)) for name, module in c.modules().items()]

    def memory_stats(self) -> MemoryStats:
        return read_memory_stats(self.device)

    def estimate_memory(self, options: GenerationOptions) -> tuple[MemoryEstimate, int]:
        """(estimated peak of running `options`, bytes available to it); raises OptionsError like `check`."""
        estimate = estimate_memory(self.preset, self.check(options), device_type=self.device.type,
                                   dtype=pick_dtype(self.device, self.preset.official),
                                   offload_plan=OFFLOAD_PLAN if self.offload else None)
        held = sum(estimate.weights.values()) if self._components is not None else 0
        if self.offload:  # the weights wait in RAM between their stages (offloading is CUDA only)
            estimate = replace(estimate, host_available=available_bytes("cpu", held))
        return estimate, available_bytes(self.device, held)

    def _place(self, stage: str) -> None:
        if not self.offload:
            return
        wanted = OFFLOAD_PLAN.get(stage, ())
        for name, module in self.components.modules().items():
            module.to(self.device if name in wanted else "cpu")
        free_memory(self.device)

    # ---- one request ---------------------------------------------------------------------------------------------
    def check(self, options: GenerationOptions) -> ResolvedOptions:
        """Validate without running (what the UI calls before queueing)."""
        return resolve_options(options, self.preset)

    def _seeded(self, options: GenerationOptions) -> ResolvedOptions:
        """Validate, and draw a seed when none was given (it is reported back and recorded)."""
        opts = self.check(options)
        return opts if opts.seed is not None else with_seed(opts, draw_seed())

    def run(self, options: GenerationOptions, on_event: EventCallback | None = None,
            should_stop: Callable[[], bool] | None = None, llm: LLMConfig | None = None,
            finish_segment: Callable[[], bool] | None = None) -> GenerationResult:
        """Generate and save one request. `llm`: the endpoint for its LLM stages instead of the engine's own
        (a studio session's settings). `finish_segment`: when it turns true, an extension in segments ends after
        the segment it is making and saves what it has."""
        emit = on_event or (lambda event: None)
        opts = self._seeded(options)
        with self._lock:
            self._run_llm = llm or self.llm
            reset_peak(self.device)
            try:
                with PeakRSSSampler(device=self.device) as peak:
                    result = self._run(opts, emit, should_stop or (lambda: False), peak,
                                       finish_segment or (lambda: False))
            except torch.cuda.OutOfMemoryError as exc:
                raise MemoryError("out of GPU memory: try fewer frames, a smaller resolution, or --offload") from exc
            finally:
                self.state.stage = "idle"
                free_memory(self.device)
        emit(result)
        return result

    def _stage(self, name: str, message: str, emit: EventCallback, stop) -> None:
        if stop():
            raise GenerationStopped(f"stopped before {name}")
        self.state.stage = name
        self._place(name)
        emit(StageEvent(name, message))

    def generate_frames(self, options: GenerationOptions, on_event: EventCallback | None = None,
                        should_stop: Callable[[], bool] | None = None) -> "GeneratedVideo":
        """Run every stage but saving; returns the frames (for evaluation and callers that save elsewhere)."""
        opts = self._seeded(options)
        with self._lock:
            self._run_llm = self.llm
            try:
                return self._generate(opts, on_event or (lambda event: None), should_stop or (lambda: False))
            finally:
                self.state.stage = "idle"

    def _run(self, opts: ResolvedOptions, emit, stop, peak, finish_segment) -> GenerationResult:
        partials = _PartialVideos() if self.partial_videos else None
        try:
            made = self._generate(opts, emit, stop, finish_segment, partials)
        finally:
            if partials is not None:
                partials.close()
        # After a Stop during a later segment (or image first's step 2) what was finished is saved all the same.
        self._stage("save", "Saving the video", emit, (lambda: False) if made.stopped_early else stop)
        recipe = self._recipe(made, peak)
        saved: SavedResult = save_result(made.video, self.output_dir, recipe, opts.fps, opts.mode, opts.seed,
                                         opts.name, references=opts.references if self.keep_references else (),
                                         embed_recipe=self.embed_recipe)
        self.state.last_peak_bytes = recipe["peak_memory_bytes"]
        self.state.runs += 1
        return GenerationResult(saved.video_path, saved.recipe_path, recipe, opts.seed, tuple(made.warnings))

    def _prepare_prompt(self, opts: ResolvedOptions, prompt: str, emit, stop, warnings: list[str],
                        timings: dict) -> PromptText:
        """Refine (optionally), add the suffixes and encode one prompt; stage times add up over prompts."""
        c = self.components
        mark = time.perf_counter()
        prompt, refined, motion = self._refine(opts, prompt, emit, stop, warnings)
        final_prompt = build_prompt(prompt, opts.fps, motion)
        timings["refine"] = timings.get("refine", 0.0) + time.perf_counter() - mark

        mark = time.perf_counter()
        self._stage("encode_text", "Encoding the prompt", emit, stop)
        tokens = c.text_encoder.count_tokens(final_prompt)
        if tokens > c.text_encoder.max_length:
            warnings.append(f"the prompt has {tokens} tokens; the text encoder reads the first "
                            f"{c.text_encoder.max_length}")
        text, negative = encode_text(c.text_encoder, final_prompt, opts.negative_prompt)
        timings["encode_text"] = timings.get("encode_text", 0.0) + time.perf_counter() - mark
        return PromptText(refined, final_prompt, motion, text, negative)

    def _generate(self, opts: ResolvedOptions, emit, stop, finish_segment=lambda: False,
                  partials: _PartialVideos | None = None) -> "GeneratedVideo":
        timings, warnings, t0 = {}, [], time.perf_counter()
        prepared = {piece: self._prepare_prompt(opts, piece, emit, stop, warnings, timings)
                    for piece in dict.fromkeys(opts.segment_prompts)}  # each distinct prompt once, in order
        prompts = [prepared[piece] for piece in opts.segment_prompts]

        pixels = None
        video = raw = None
        counter, done, stopped_early = DenoiseCounter(), 0, False
        if opts.image_first:  # t2i, then i2v from that frame (Open-Sora 2.0's text -> image -> video flow)
            step_one = replace(opts, num_frames=1, segments=1, image_first=False)
            first = self._segment(step_one, prompts[0].text, prompts[0].negative, ReferencePixels(), 0, counter,
                                  timings, emit, stop, label="Step 1 of 2, the first frame: ")
            emit(PreviewEvent(video_strip(first), opts.num_steps))
            pixels, opts = ReferencePixels(head=first), replace(opts, cond_type="i2v_head")
            video = raw = first  # what a Stop during step 2 keeps
        for segment in range(opts.segments):
            if segment and finish_segment():
                warnings.append(f"stopped after segment {segment} of {opts.segments}, as asked: "
                                f"{video.shape[1]} frames were kept")
                stopped_early = True
                break
            try:
                if segment:  # a later extension segment continues from the video so far
                    pixels = clip_references(opts.cond_type, video, pixels.source_fps)
                elif pixels is None:  # (image-first runs already hold their first frame)
                    pixels = load_reference_pixels(opts.cond_type, opts.references, opts.height, opts.width)
                    warnings.extend(_frame_rate_warning(pixels.source_fps, opts.fps))
                raw = self._segment(opts, prompts[segment].text, prompts[segment].negative, pixels, segment, counter,
                                    timings, emit, stop)
            except GenerationStopped:
                if video is None:  # nothing finished yet
                    raise
                warnings.append(f"stopped during segment {segment + 1} of {opts.segments}: the {segment} finished "
                                f"segment(s) were kept ({video.shape[1]} frames)" if segment else
                                "stopped during step 2 of 2 (the video): the first frame was kept")
                stopped_early = True
                break
            video, done = stitch_extension(opts.cond_type, raw, pixels), segment + 1
            if opts.segments > 1:
                emit(StageEvent("decode", f"Segment {done} of {opts.segments} done: {video.shape[1]} frames"))
                emit(PreviewEvent(video_strip(video), opts.num_steps))
                if partials is not None and done < opts.segments:  # playable while the next one samples
                    path = partials.write(video, done, opts.fps)
                    if path is not None:
                        emit(PartialVideoEvent(path, done))
        timings["total"] = time.perf_counter() - t0
        return GeneratedVideo(opts, video, raw, prompts, counter, timings, warnings, done, stopped_early)

    def _segment(self, opts: ResolvedOptions, text, negative, pixels, segment: int, counter, timings: dict, emit,
                 stop, label: str | None = None) -> torch.Tensor:
        """Encode the references, sample and decode one video (one segment of an extension, or an image-first
        run's first frame); returns the raw decoded frames. Stage times add up over segments."""
        c = self.components
        if label is None:
            label = (f"Segment {segment + 1} of {opts.segments}: " if opts.segments > 1
                     else "Step 2 of 2, the video: " if opts.image_first else "")

        def timed(name: str, started: float) -> None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

        mark = time.perf_counter()
        self._stage("encode_references", f"{label}Encoding the references", emit, stop)
        refs = encode_references(c.vae, pixels, text.txt.device, c.dtype)
        timed("encode_references", mark)

        mark = time.perf_counter()
        latent = latent_shape(c.vae, opts.num_frames, opts.height, opts.width)
        shape_key = (tuple(latent), opts.cond_type)
        compiling = self.compile and shape_key not in self._compiled_for
        self._stage("sample", f"{label}Sampling 0/{opts.num_steps}" +
                    (" (compiling the MMDiT for this size first: slower once)" if compiling else ""), emit, stop)
        guidance = guidance_options(opts)
        seed = (opts.seed + segment) % (MAX_SEED + 1)  # each segment draws its own noise, reproducibly
        with torch.inference_mode():
            z = sample(c.mmdit, text, negative, refs, opts.cond_type, latent, seed, guidance,
                       callback=self._progress_callback(emit, latent, mark), should_stop=stop, counter=counter)
        self._compiled_for.add(shape_key)
        timed("sample", mark)

        mark = time.perf_counter()
        self._stage("decode", f"{label}Decoding frames", emit, stop)
        raw = decode_video(c.vae, z, opts.num_frames)
        timed("decode", mark)
        return raw

    def _refine(self, opts: ResolvedOptions, prompt: str, emit, stop, warnings: list[str]):
        """Optional LLM stages for `prompt`; any failure keeps the user's prompt and says why (never silently)."""
        refined, motion = None, opts.motion_score
        if opts.refine:
            self._stage("refine", "Refining the prompt with the LLM", emit, stop)
            kind = refine_kind(opts.cond_type, len(opts.references))
            outcome = refine_prompt(prompt, kind, self._run_llm,
                                    image_path=opts.references[:refine_images(kind)] or None)
            if outcome.ok:
                prompt = refined = outcome.refined
            else:
                warnings.append(f"prompt refinement failed, the original prompt was used: {outcome.error}")
        if motion == "dynamic":
            self._stage("refine", "Asking the LLM for a motion score", emit, stop)
            score, error = ask_motion_score(prompt, self._run_llm)
            motion = score if score is not None else self.preset.sampling.motion_score
            if error:
                warnings.append(f"automatic motion score failed ({error}); used {motion}")
        return prompt, refined, motion

    def _progress_callback(self, emit, latent, start: float):
        def callback(step: StepInfo) -> None:
            done = step.index + 1
            elapsed = time.perf_counter() - start
            emit(ProgressEvent(done, step.num_steps, elapsed, elapsed / done * (step.num_steps - done)))
            if self.preview_every and (done % self.preview_every == 0 or done == step.num_steps):
                if self._projection is None:
                    c = self.components
                    # wherever the VAE is now: with --offload it waits on the CPU while the MMDiT samples
                    self._projection = fit_preview_projection(c.vae, next(c.vae.parameters()).device, c.dtype)
                emit(PreviewEvent(preview_strip(step.x0, self._projection, latent,
                                                self.components.mmdit.config.patch_size), done))
        return callback

    def _recipe(self, made: "GeneratedVideo", peak) -> dict:
        c, opts, video = self.components, made.options, made.video
        return {
            "preset": self.preset.name, "preset_trained": self.preset.trained, "checkpoints": c.checkpoints,
            "mode": opts.mode, "cond_type": opts.cond_type,
            "prompt": {"original": opts.prompt, "refined": made.prompts[0].refined, "final": made.prompts[0].final,
                       "negative": opts.negative_prompt,
                       **({"per_segment": [{"prompt": piece, "refined": p.refined, "final": p.final,
                                             "motion_score": p.motion_score}
                                            for piece, p in zip(opts.segment_prompts, made.prompts)]}
                          if len(set(opts.segment_prompts)) > 1 else {})},
            "options": {**opts.to_dict(), "motion_score": made.prompts[0].motion_score}, "seed": opts.seed,
            "output": {"frames": int(video.shape[1]), "height": int(video.shape[2]), "width": int(video.shape[3]),
                       "fps": opts.fps, "segments": made.segments_done, "stopped_early": made.stopped_early},
            "sampler": {"forwards": made.counter.forwards, "branch_evaluations": made.counter.branch_evals},
            "timings_s": {k: round(v, 3) for k, v in made.timings.items()},
            "peak_memory_bytes": peak.peak_device_bytes or peak.peak_rss_bytes,
            "device": str(self.device), "warnings": made.warnings,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "studio": "0.1.0"},
        }
