"""What the Generate, Stop and Refine buttons do: build options, validate before queueing, run, report.

Each tab's handler has an explicit signature (tab inputs, then the shared controls) so that gradio_client users see
named parameters; the job and LLM settings ride along in gr.State and never appear in the API.
"""

from __future__ import annotations

import collections
import html
import inspect
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr

from pipelines.options import MAX_SEED, GenerationOptions, OptionsError, draw_seed
from pipelines.prompt_refine import LLMConfig, ask_motion_score, refine_kind, refine_prompt
from pipelines.text import has_segment_prompts, split_segment_markers
from pipelines.units import format_seconds
from studio.controls import AUTO_MOTION, SharedControls, parse_motion
from studio.jobs import EnginePool, JobUpdate, SessionJob, run_job
from studio.media_info import count_video_frames, save_clip_frame
from studio.panels import memory_line

log = logging.getLogger(__name__)

SHARED_NAMES = [name for name in SharedControls.__dataclass_fields__]
TAB_NAMES = {"t2v": ["image_first"], "i2v": ["image", "image_position"], "loop": ["first_image", "last_image"],
             "extend": ["video", "direction", "easy", "segments"]}
MEDIA_INPUTS = ("image", "first_image", "last_image", "video")  # uploads, as opposed to a tab's settings
STATE_NAMES = ["job", "llm"]
# Which input a validation message belongs to, by the words it uses (first match wins).
_FIELD_WORDS = (("prompt", ("the prompt is",)),  # (before "video": "the prompt is empty: describe the video ...")
                ("num_frames", ("number of frames", "4k+1", "frames is more")), ("video", ("clip", "video")),
                ("prompt", ("per-segment", "the text after |")), ("segments", ("segment",)),
                ("image", ("image",)), ("num_steps", ("steps",)), ("guidance_img", ("image guidance",)),
                ("guidance", ("guidance",)), ("seed", ("seed",)), ("fps", ("fps",)), ("motion_score", ("motion",)),
                ("aspect_ratio", ("aspect", "too large", "height", "width")), ("resolution", ("resolution",)))


def input_names(mode: str) -> list[str]:
    """The handler's parameter names for a tab: tab inputs, shared controls, then the session states."""
    return TAB_NAMES[mode] + SHARED_NAMES + STATE_NAMES


def build_options(mode: str, values: dict) -> GenerationOptions:
    """Turn one tab's input values into GenerationOptions (validated later by the engine's check)."""
    prompt = values.get("prompt") or ""
    refined = (values.get("refined_prompt") or "").strip()
    if values.get("use_refined") and refined:
        prompt = refined
    motion = parse_motion(values.get("motion_score"))
    references, extra = _references(mode, values)
    seed = None if values.get("randomize_seed") or values.get("seed") is None else values.get("seed")
    return GenerationOptions(
        mode=mode, prompt=prompt, negative_prompt=values.get("negative_prompt") or "",
        resolution=values.get("resolution") or None, aspect_ratio=values.get("aspect_ratio") or None,
        num_frames=values.get("num_frames"), fps=values.get("fps"),
        motion_score="dynamic" if motion == AUTO_MOTION else motion, num_steps=values.get("num_steps"),
        guidance=values.get("guidance"), guidance_img=values.get("guidance_img"), seed=seed,
        references=references, **extra)


def _references(mode: str, values: dict) -> tuple[tuple[str, ...], dict]:
    if mode == "t2v":
        return (), {"image_first": bool(values.get("image_first"))}
    if mode == "i2v":
        image = values.get("image")
        return ((str(image),) if image else ()), {"i2v_position": _position(values.get("image_position"))}
    if mode == "loop":
        first, last = values.get("first_image"), values.get("last_image")
        if not first and last:
            raise OptionsError("Loop: upload the first image (the last image alone is not enough)")
        return tuple(str(p) for p in (first, last) if p), {}
    video = values.get("video")
    segments = values.get("segments")
    return ((str(video),) if video else ()), {"extend_direction": _direction(values.get("direction")),
                                              "extend_easy": bool(values.get("easy")),
                                              "segments": 1 if segments is None else segments}


def _position(value) -> str:
    text = str(value or "head").lower()
    return "tail" if text.startswith(("tail", "last")) else ("head" if text.startswith(("head", "first")) else text)


def _direction(value) -> str:
    text = str(value or "forward").lower()
    return "backward" if text.startswith("backward") else ("forward" if text.startswith("forward") else text)


def check_request(pool: EnginePool, mode: str, values: dict):
    """Everything that can be refused before queueing; raises OptionsError (a ValueError) with the reason."""
    options = build_options(mode, values)
    resolved = pool.check(options)
    if mode == "extend":
        frames = count_video_frames(resolved.references[0])
        if frames < resolved.reference_frames:
            raise OptionsError(f"the clip has {frames} frames; extending needs at least {resolved.reference_frames} "
                               f"(turn off 'easy' for 33, or upload a longer clip)")
    return options


def _field_for(message: str, mode: str) -> str:
    """The input a validation message marks: by its words, else the prompt (also when the tab lacks that input,
    so the message is always shown and the job never queued)."""
    media = {"i2v": {"image": "image"}, "loop": {"image": "first_image"}, "extend": {"video": "video"}}.get(mode, {})
    text = message.lower()
    for name, words in _FIELD_WORDS:
        if any(word in text for word in words):
            if name in ("image", "video"):
                if name in media:
                    return media[name]
                continue  # e.g. "Image to video needs ..." on the i2v tab is about the image
            return name if name in input_names(mode) else "prompt"
    return "prompt"


def make_validator(pool: EnginePool, mode: str):
    """A Gradio validator for one tab: runs before queueing and marks the input at fault."""
    names = input_names(mode)

    def validate(*args):
        values = dict(zip(names, args))
        try:
            check_request(pool, mode, values)
        except ValueError as exc:
            target = _field_for(str(exc), mode)
            return [gr.validate(name != target, str(exc) if name == target else "") for name in names]
        return [gr.validate(True, "") for _ in names]

    return validate


def make_precheck(pool: EnginePool, mode: str):
    """The same checks, written into the status panel: image and video inputs cannot show validation messages."""
    names = input_names(mode)

    def precheck(*args):
        try:
            options = check_request(pool, mode, dict(zip(names, args)))
        except ValueError as exc:
            return status_html(JobUpdate(stage="refused", message=f"Not started: {exc}"))
        fits, note = memory_note(pool, options)
        return status_html(JobUpdate(stage="queued", message=note)) if note else gr.skip()

    return precheck


def memory_note(pool: EnginePool, options: GenerationOptions) -> tuple[bool, str]:
    """(expected to fit, the estimate's line, marked ⚠ with advice when it will not fit); (True, "") when the
    estimate cannot be made (it must never stop a valid request)."""
    try:
        fits, note = pool.memory_verdict(options)
    except Exception as exc:  # noqa: BLE001
        log.warning("memory estimate failed: %s", exc)
        return True, ""
    return fits, memory_line(fits, note)


# ---- running -------------------------------------------------------------------------------------------------------
def status_html(update: JobUpdate, extra: str = "") -> str:
    """Stage text, a k/N step bar with elapsed time and ETA."""
    title = html.escape(update.message or update.stage)
    parts = [f"<div class='job-status' data-stage='{html.escape(update.stage)}'><b>{title}</b>"]
    if update.total:
        parts.append(f" · step {update.step}/{update.total} · {format_seconds(update.elapsed_s)} elapsed"
                     f" · ETA {format_seconds(update.eta_s)}")
        parts.append(f"<br><progress value='{update.step}' max='{update.total}' style='width:100%'></progress>")
    if update.device:
        parts.append(f"<br><small>device: {html.escape(update.device)}</small>")
    if extra:
        parts.append(f"<br>{extra}")
    return "".join(parts) + "</div>"


def _progress(progress, update: JobUpdate) -> None:
    if progress is None:
        return
    if update.total:
        progress((update.step, update.total), desc=update.message)
    else:
        progress(None, desc=update.message)


def _resolve_motion(options: GenerationOptions, llm: LLMConfig):
    """'auto' motion: ask this session's LLM; fall back to the preset default with a visible warning."""
    if options.motion_score != "dynamic" or has_segment_prompts(options.prompt):
        return options  # (per-segment prompts: the engine asks for each one, through this session's LLM)
    score, error = ask_motion_score(options.prompt, llm) if llm.is_configured else (None, "no LLM configured")
    if score is None:
        gr.Warning(f"Automatic motion score unavailable ({error}); the preset's default was used.")
        return replace(options, motion_score=None)
    gr.Info(f"The LLM chose motion score {score}.")
    return replace(options, motion_score=score)


def _stream(pool, options, job: SessionJob, run_id: int, progress, note: str = "", llm: LLMConfig | None = None):
    """Yield (update, outputs) pairs for one engine run; the last update is done."""
    for update in run_job(pool, options, job, run_id=run_id, llm=llm):
        _progress(progress, update)
        preview = update.preview if update.preview is not None else gr.skip()
        so_far = update.partial_video or gr.skip()  # an extension's finished segments, playable meanwhile
        yield update, (so_far, gr.skip(), gr.skip(), status_html(update, note), preview)


def _error_message(error: BaseException) -> str:
    """What a failed run tells the user: a bad request or a full disk in its own words; anything else (a bug) is
    logged with its traceback and named by its type."""
    if isinstance(error, (ValueError, OSError, MemoryError)):
        return str(error) or type(error).__name__
    log.error("generation failed", exc_info=error)
    return f"Generation failed ({type(error).__name__}): {error}"


def _raise_for(update: JobUpdate) -> None:
    raise gr.Error(_error_message(update.error), print_exception=False)


def _shown(result) -> tuple[str | None, object]:
    """(the player's video, the preview) for a saved result: an mp4 plays; a single frame (png) is the preview."""
    path = Path(result.video_path)
    return (str(path) if path.suffix == ".mp4" else None), (str(path) if path.suffix == ".png" else gr.skip())


def generate(pool: EnginePool, mode: str, values: dict, job: SessionJob, server_llm: LLMConfig, progress=None):
    """The body of every Generate button: a generator of (video, recipe, seed, status, preview) tuples."""
    try:
        options = check_request(pool, mode, values)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    if options.seed is None:  # drawn here, not in the engine, so a stopped or failed run still shows its seed
        options = replace(options, seed=draw_seed())
    llm = values.get("llm") or server_llm
    fits, memory = memory_note(pool, options)
    if not fits:  # a warning, not a refusal: the estimate is approximate and the run may still fit
        gr.Warning(memory)
    warning = "" if fits else html.escape(memory)
    started = time.perf_counter()
    run_id = job.start()
    try:
        yield gr.skip(), gr.skip(), options.seed, status_html(JobUpdate(), warning), gr.skip()
        options = _resolve_motion(options, llm)
        shown_so_far = False
        for update, outputs in _stream(pool, options, job, run_id, progress, warning, llm):
            shown_so_far = shown_so_far or bool(update.partial_video)
            yield outputs
        if update.error is not None and shown_so_far:  # an unsaved video so far must not pass for a result
            yield None, gr.skip(), gr.skip(), status_html(update, warning), gr.skip()
        yield from _finish(update, started)
    finally:
        job.finish(run_id)


def _finish(update: JobUpdate, started: float):
    if update.stopped:
        yield (gr.skip(), gr.skip(), gr.skip(),
               status_html(replace(update, message="Stopped"), "The job was stopped; the studio is ready."),
               gr.skip())
        return
    if update.error is not None:
        _raise_for(update)
    result = update.result
    for warning in result.warnings:
        gr.Warning(warning)
    recipe = dict(result.recipe)
    done = replace(update, message=f"Done in {format_seconds(time.perf_counter() - started)} · seed {result.seed}")
    video, preview = _shown(result)
    yield video, recipe, result.seed, status_html(done, f"Saved {html.escape(Path(result.video_path).name)}"), preview


def make_generate(pool: EnginePool, mode: str, server_llm: LLMConfig):
    """One tab's handler with named parameters (as gradio_client shows them)."""
    names = input_names(mode)

    def handler(*args, progress=None):
        values, progress = _named(names, args, progress)
        yield from generate(pool, mode, values, values["job"], server_llm, progress)

    return _signed(handler, names, mode)


def _named(names: list[str], args: tuple, progress) -> tuple[dict, object]:
    """A handler's arguments by name, and Gradio's progress tracker: Gradio passes it positionally, after the
    inputs, since it only injects parameters it finds among the positional ones (a keyword-only one would keep an
    untracked default and no bar would move)."""
    return dict(zip(names, args)), (args[len(names)] if len(args) > len(names) else progress)


def _signed(handler, names: list[str], name: str):
    """Give a *args handler the named signature gradio_client shows, with the progress tracker last."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    handler.__signature__ = inspect.Signature(params)
    handler.__name__ = name
    return handler


# ---- batch ---------------------------------------------------------------------------------------------------------
MAX_BATCH = 16  # prompts in one batch (a local studio's queue; public deployments do not offer batches)
BATCH_COLUMNS = ["#", "prompt", "status", "seed", "file"]
# The batch's lines are its prompts: the prompt box and its refinement are not among its inputs.
BATCH_SHARED_NAMES = [name for name in SHARED_NAMES if name not in ("prompt", "refined_prompt", "use_refined")]
BATCH_NAMES = (["mode", "batch"] + [name for mode in TAB_NAMES for name in TAB_NAMES[mode]] + BATCH_SHARED_NAMES
               + STATE_NAMES)


def batch_prompts(text: str | None) -> list[str]:
    """The batch box's prompts: its non-blank lines, in order (a line may hold Extend's |k| segment prompts)."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise OptionsError("the batch is empty: write one prompt per line")
    if len(prompts) > MAX_BATCH:
        raise OptionsError(f"a batch holds at most {MAX_BATCH} prompts, got {len(prompts)}")
    return prompts


def batch_requests(pool: EnginePool, mode: str, values: dict, text: str | None) -> list[GenerationOptions]:
    """One checked request per batch line: the tab's settings with that line as the prompt (the refined-prompt box
    is not used). Seeds: with *randomize* each is drawn, else the seed box's seed, then the next ones."""
    requests = []
    for line, prompt in enumerate(batch_prompts(text), 1):
        try:
            options = check_request(pool, mode, {**values, "prompt": prompt, "refined_prompt": "",
                                                 "use_refined": False})
        except ValueError as exc:
            raise OptionsError(f"batch line {line}: {exc}") from None
        seed = draw_seed() if options.seed is None else (int(options.seed) + line - 1) % (MAX_SEED + 1)
        requests.append(replace(options, seed=seed))
    return requests


def generate_batch(pool: EnginePool, mode: str, values: dict, text: str | None, job: SessionJob,
                   server_llm: LLMConfig, progress=None):
    """Run a batch one prompt after another as one job: a generator of (table, video, recipe, seed, status,
    preview). A failed prompt is marked and the batch goes on; Stop ends the running one and cancels the rest.
    Every finished video is saved and listed in History as usual."""
    try:
        requests = batch_requests(pool, mode, values, text)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    llm = values.get("llm") or server_llm
    fits, memory = memory_note(pool, requests[0])  # same settings for every line, the prompts aside
    if not fits:
        gr.Warning(memory)
    rows = [[line, options.prompt, "queued", options.seed, ""] for line, options in enumerate(requests, 1)]
    # The last yield is what an API caller gets back: it repeats the last finished line's video, recipe and seed.
    total, started, video, recipe, seed = len(requests), time.perf_counter(), gr.skip(), gr.skip(), gr.skip()
    run_id = job.start()  # one run: Stop reaches whichever prompt is running, and the queued ones see it too
    try:
        yield rows, gr.skip(), gr.skip(), gr.skip(), status_html(JobUpdate(message=f"Batch of {total}")), gr.skip()
        for index, options in enumerate(requests):
            if job.should_stop(run_id):
                break
            rows[index][2] = "running"
            note = f"Batch: prompt {index + 1} of {total}"
            options = _resolve_motion(options, llm)
            for update, (so_far, _, _, status, preview) in _stream(pool, options, job, run_id, progress, note, llm):
                yield rows, so_far, gr.skip(), options.seed, status, preview
            if update.stopped:
                rows[index][2] = "stopped"
                break
            if update.error is not None:
                rows[index][2] = f"failed: {_error_message(update.error)[:200]}"
                continue
            result = update.result
            for warning in result.warnings:
                gr.Warning(warning)
            rows[index][2], rows[index][4] = "done", Path(result.video_path).name
            (video, preview), recipe, seed = _shown(result), dict(result.recipe), result.seed
            yield rows, video, recipe, seed, status_html(update, note), preview
        for row in rows:
            if row[2] in ("queued", "running"):
                row[2] = "cancelled"
        counts = collections.Counter(row[2].split(":")[0] for row in rows)
        summary = ", ".join(f"{n} {state}" for state, n in counts.items())
        done = JobUpdate(stage="done", message=f"Batch finished in {format_seconds(time.perf_counter() - started)}: "
                                               f"{summary}")
        yield rows, video, recipe, seed, status_html(done), gr.skip()
    finally:
        job.finish(run_id)


def make_generate_batch(pool: EnginePool, server_llm: LLMConfig):
    """The Run batch handler with named parameters: the active tab's name, the batch box, every tab's inputs (only
    the named tab's are used), the shared controls."""

    def handler(*args, progress=None):
        values, progress = _named(BATCH_NAMES, args, progress)
        mode = values["mode"]
        if mode not in TAB_NAMES:
            raise gr.Error(f"mode must be one of {', '.join(TAB_NAMES)}, got {mode!r}", print_exception=False)
        yield from generate_batch(pool, mode, values, values["batch"], values["job"], server_llm, progress)

    return _signed(handler, BATCH_NAMES, "batch")


# ---- stop and refine -----------------------------------------------------------------------------------------------
def stop_job(job: SessionJob) -> str:
    """Ask this session's running job to stop at its next step."""
    if job.request_stop():
        return status_html(JobUpdate(stage="stopping", message="Stopped: the job ends within one step, queued jobs "
                                                               "are cancelled; the studio is ready."))
    return status_html(JobUpdate(stage="idle", message="Nothing is running; the studio is ready."))


def finish_segment(job: SessionJob) -> str:
    """Ask this session's running extension to end after the segment it is making (and keep what it has)."""
    if job.request_finish_segment():
        return status_html(JobUpdate(stage="finishing", message="The job stops after the segment it is making "
                                                                "and keeps the finished ones."))
    return status_html(JobUpdate(stage="idle", message="Nothing is running; the studio is ready."))


def refine(prompt: str, mode: str, image, first_image, llm: LLMConfig | None, server_llm: LLMConfig,
           image_position: str = "head", clip=None, direction: str = "forward", last_image=None):
    """Refine the prompt into the separate box; the original is left as it was.

    The vision model sees the reference: the i2v image (as first or last frame), the loop's image (two images: the
    first and the last frame), or for Extend the clip's frame the new footage joins (its last frame going forward,
    its first going backward; with per-segment prompts only the first segment's prompt sees it, later ones
    continue generated footage)."""
    config = llm or server_llm
    if not config.is_configured:
        raise gr.Error("No LLM endpoint is configured: open *LLM settings* or start the server with "
                       "OPENAI_API_KEY / OPENSORA_LLM_BASE_URL.", print_exception=False)
    pieces = split_segment_markers(prompt or "")  # [(None, prompt)] or [(k, text), ...] for |k| prompts
    with tempfile.TemporaryDirectory(prefix="refine-") as tmp:
        if mode == "extend" and clip:
            backward = direction == "backward"
            try:
                picture = str(save_clip_frame(clip, last=not backward, out=Path(tmp) / "frame.png"))
            except OptionsError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            kind = refine_kind("i2v_tail" if backward else "i2v_head")
        elif mode == "loop" and first_image and last_image:
            picture, kind = [first_image, last_image], refine_kind("i2v_loop", images=2)
        else:
            picture = image if mode == "i2v" else (first_image if mode == "loop" else None)
            kind = (refine_kind(f"i2v_{_position(image_position)}" if mode == "i2v" else "i2v_loop") if picture
                    else "t2v")
        refined = []
        for index, (start, piece) in enumerate(pieces):
            sees = picture if index == 0 or mode != "extend" else None
            try:
                outcome = refine_prompt(piece, kind if sees else "t2v", config, image_path=sees or None)
            except ValueError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            if not outcome.ok:
                raise gr.Error(f"Refinement failed: {outcome.error}", print_exception=False)
            refined.append(outcome.refined if start is None else f"|{start}|{outcome.refined}")
    return "".join(refined), True
