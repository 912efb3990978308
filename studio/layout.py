"""build_demo: the whole studio as one gr.Blocks, wiring tabs, shared controls, outputs, panels and history."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from pipelines.options import OptionsError
from pipelines.results import list_results
from pipelines.scratch import remove_later, scratch_folder
from studio.controls import (LLM_STORAGE_KEY, SharedControls, aspect_for_image, build_prompt_block,
                             build_settings_block, llm_status, remember_llm, restore_llm, session_llm, wire_settings)
from studio.export import video_to_gif
from studio.gpu_time import duration_for
from studio.handlers import (BATCH_COLUMNS, BATCH_NAMES, BATCH_SHARED_NAMES, MAX_BATCH, TAB_NAMES, build_options,
                             finish_segment, make_generate, make_generate_batch, make_precheck, make_validator,
                             refine, stop_job, status_html)
from studio.history import gallery_value, read_recipe, settings_from_recipe
from studio.jobs import EnginePool, JobUpdate, SessionJob
from studio.media_info import image_size, save_clip_frame, video_fps, video_size
from studio.panels import build_panels, memory_markdown, param_rows, wire_estimate
from studio.settings import StudioSettings
from studio.tabs import TAB_LABELS, build_extend, build_i2v, build_loop, build_t2v, load_examples

log = logging.getLogger(__name__)

STUDIO_CSS = """
#job-status .job-status { padding: 6px 10px; border-radius: 8px; background: var(--block-background-fill); }
#untrained-notice { border-left: 4px solid #d97706; padding-left: 10px; }
#memory-panel p { margin: 2px 0; font-size: 0.92em; }
"""


def studio_theme():
    """The theme app.py passes to launch() (Gradio 6 takes theme and css there, not in Blocks)."""
    return gr.themes.Soft()


def _header(pool: EnginePool, settings: StudioSettings) -> str:
    preset = pool.preset
    devices = ", ".join(str(getattr(engine, "device", "?")) for engine in pool)
    return (f"# {settings.title}\nModel preset **{preset.name}**: {preset.description or ''}  \n"
            f"{len(pool)} worker(s) on {devices}; jobs queue up and show their position.")


def _untrained_notice(preset) -> str:
    return ("⚠️ **Untrained weights.** The preset *{}* has random (or not yet trained) weights: videos will be noise "
            "until it is trained. Everything else (controls, progress, stop, history) works as usual."
            .format(preset.name))


def _pick_aspect(preset, reader):
    def pick(path):
        if not path:
            return gr.skip()
        try:
            height, width = reader(path)
            return aspect_for_image(height, width, preset)
        except Exception as exc:  # a bad upload is reported when generating; here we just keep the choice
            log.info("could not read the upload's size: %s", exc)
            return gr.skip()
    return pick


def _pick_fps(path):
    """An uploaded clip's own frame rate for the FPS slider: an extension saved at another rate would change the
    clip's speed."""
    if not path:
        return gr.skip()
    try:
        rate = video_fps(path)
    except Exception as exc:  # a bad upload is reported when generating
        log.info("could not read the upload's frame rate: %s", exc)
        return gr.skip()
    return min(60, max(1, round(rate))) if rate else gr.skip()


def last_frame_to_i2v(video, job: SessionJob):
    """The result's last frame (a single-frame result: the frame itself) as the Image to video tab's image, to
    carry a scene on from where it ended. The frame is a scratch file: Gradio keeps its own copy of what it was
    handed, and the file goes a minute later."""
    if video:
        folder = scratch_folder("opensora-last-frame-")
        remove_later(folder)
        try:
            image = str(save_clip_frame(video, last=True, out=folder / "last-frame.png"))
        except Exception as exc:  # an unreadable file, whatever the reason, is said, not raised
            raise gr.Error(f"cannot take a frame from the result: {exc}", print_exception=False) from None
    elif job is not None and str(job.last_result or "").endswith(".png"):
        image = job.last_result
    else:
        gr.Warning("There is no result to take a frame from yet: generate a video first.")
        return gr.skip(), gr.skip(), gr.skip()
    return image, gr.Tabs(selected="i2v"), "i2v"


def _build_outputs() -> dict:
    status = gr.HTML(status_html(JobUpdate(stage="idle", message="Ready")), label="Status", elem_id="job-status")
    video = gr.Video(label="Result", buttons=["download"], loop=True, autoplay=True, interactive=False,
                     elem_id="result-video")
    with gr.Row():
        stop = gr.Button("■ Stop", variant="stop", elem_id="stop")
        send = gr.Button("Send to Extend →", elem_id="send-to-extend")
        send_frame = gr.Button("Last frame → Image to video", elem_id="send-to-i2v")
        gif = gr.Button("Make GIF", elem_id="make-gif")
    gif_file = gr.File(label="GIF", interactive=False, height=60, elem_id="gif-file")
    preview = gr.Image(label="Preview", interactive=False, height=140,
                       elem_id="preview")
    with gr.Accordion("Recipe (JSON: every setting, to reproduce the result)", open=False):
        recipe = gr.JSON(label="Recipe", elem_id="recipe")
    return {"status": status, "video": video, "stop": stop, "send": send, "send_frame": send_frame, "gif": gif,
            "gif_file": gif_file, "preview": preview, "recipe": recipe}


def _wire_history(demo, shared: SharedControls, tabs_component, tab_list, mode_state, parts: dict,
                  settings: StudioSettings, video, job_state):
    gallery, paths_state, selected, recipe_view, load = (parts[k] for k in ("gallery", "paths", "selected",
                                                                            "recipe", "load"))
    # The tabs' own settings (image first, image position, direction, easy, segments), and their media from the
    # reference copies saved beside the result (older results have none: those inputs are left as they are).
    tab_settings = [(name, component) for tab in tab_list
                    for name, component in zip(TAB_NAMES[tab.mode], tab.inputs)]

    def refresh(job: SessionJob):
        # A public studio is one server for everyone: each visitor's History shows only their own results.
        items = list_results(settings.output_dir, settings.history_limit, job.made if settings.public else None)
        value = gallery_value(items)
        shown = {caption for _, caption in value}
        return value, [(str(item.recipe), str(item.media)) for item in items if item.media.stem in shown]

    def on_select(paths, evt: gr.SelectData):
        if not paths or evt.index is None or evt.index >= len(paths):
            return gr.skip(), None, gr.skip()
        recipe, media = paths[evt.index]
        return read_recipe(recipe), recipe, media if media.endswith(".mp4") else gr.skip()

    def load_settings(path):
        if not path:
            gr.Warning("Select a result in the gallery first.")
            return [gr.skip()] * (len(SharedControls.__dataclass_fields__) + 2 + len(tab_settings))
        values = settings_from_recipe(read_recipe(path), Path(path).parent)
        updates = [values.get(name, gr.skip()) for name in SharedControls.__dataclass_fields__]
        mode = values.get("mode")
        return (updates + [gr.Tabs(selected=mode) if mode else gr.skip(), mode or gr.skip()]
                + [values.get(name, gr.skip()) for name, _ in tab_settings])

    parts["refresh"].click(refresh, job_state, [gallery, paths_state], queue=False, api_visibility="private")
    # Selecting a result also puts it in the player, so it can be downloaded or sent to Extend.
    gallery.select(on_select, paths_state, [recipe_view, selected, video], queue=False, api_visibility="private")
    load.click(load_settings, selected,
               shared.inputs() + [tabs_component, mode_state] + [component for _, component in tab_settings],
               api_visibility="private")
    demo.load(refresh, job_state, [gallery, paths_state], queue=False, api_visibility="private")
    return refresh


def _build_history(public: bool) -> dict:
    title = "History: your results in this session" if public else "History: results on this server"
    with gr.Accordion(title, open=True):
        gallery = gr.Gallery(label="Results (newest first): select one to play it and see its recipe", columns=8,
                             height=220, allow_preview=False, object_fit="contain", elem_id="history")
        with gr.Row():
            refresh = gr.Button("Refresh", size="sm")
            load = gr.Button("Load these settings", size="sm", elem_id="load-settings")
        recipe = gr.JSON(label="Selected result's recipe", elem_id="history-recipe")
    return {"gallery": gallery, "refresh": refresh, "load": load, "recipe": recipe,
            "paths": gr.State([]), "selected": gr.State(None)}


def build_demo(pool, settings: StudioSettings | None = None) -> gr.Blocks:
    """The studio for an EnginePool (or a list of engines, or one engine); call .launch() on the result."""
    if isinstance(pool, (list, tuple)):
        pool = EnginePool(list(pool))
    elif not hasattr(pool, "acquire"):  # duck-typed: reload mode re-imports studio.jobs, so isinstance would fail
        pool = EnginePool([pool])
    settings = settings or StudioSettings()
    preset = pool.preset
    examples = load_examples(Path(settings.examples_dir))
    with gr.Blocks(title=settings.title, delete_cache=(3600, 86400)) as demo:
        job_state, llm_state, mode_state = gr.State(SessionJob()), gr.State(None), gr.State("t2v")
        gr.Markdown(_header(pool, settings))
        if not preset.trained:
            gr.Markdown(_untrained_notice(preset), elem_id="untrained-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                prompt_parts, refine_ctl = build_prompt_block(settings.llm)
                prompt = prompt_parts["prompt"]
                with gr.Tabs(selected="t2v") as tabs:
                    tab_list = [build(prompt, examples) for build in (build_t2v, build_i2v, build_loop, build_extend)]
                batch = None if settings.public else _build_batch()
                settings_parts, duration = build_settings_block(preset)
            with gr.Column(scale=4):
                out = _build_outputs()
                panels = build_panels(pool, settings.memory_refresh_s, allow_unload=not settings.public)
        history = _build_history(settings.public)
        shared = SharedControls(**prompt_parts, **settings_parts)
        wire_settings(demo, preset, shared, duration, settings.browser_secret)
        extend_tab = next(tab for tab in tab_list if tab.mode == "extend")  # inputs: video, direction, easy, segments
        wire_estimate(pool, shared, panels, mode_state, *extend_tab.inputs[2:4])
        refresh_history = _wire_history(demo, shared, tabs, tab_list, mode_state, history, settings, out["video"],
                                        job_state)
        ui = SimpleNamespace(tabs=tabs, tab_list=tab_list, shared=shared, out=out, panels=panels, history=history,
                             refresh_history=refresh_history, job=job_state, llm=llm_state, mode=mode_state,
                             refine=refine_ctl)
        _wire_tab_choice(ui, batch)
        events = _wire_generation(pool, settings, ui)
        if batch is not None:
            events.append(_wire_batch(pool, settings, ui, batch))
        _wire_result_buttons(ui, events, settings)
        _wire_refine(demo, settings, ui)
        demo.load(lambda: (memory_markdown(pool), param_rows(pool)), None, [panels.memory, panels.params],
                  queue=False, api_visibility="private")
    demo.queue(max_size=settings.queue_size)
    return demo


def _wire_tab_choice(ui, batch: dict | None) -> None:
    """Opening a tab sets the session's mode (the memory estimate and History read it) and, where the Batch panel
    is offered, the tab whose settings a batch uses: one listener per tab for both."""
    targets = [ui.mode] + ([batch["mode"]] if batch is not None else [])
    for tab in ui.tab_list:  # (one output takes the value itself, several a tuple)
        tab.tab.select(lambda mode=tab.mode: mode if len(targets) == 1 else (mode,) * len(targets), None, targets,
                       queue=False, api_visibility="private")


def _wire_generation(pool: EnginePool, settings: StudioSettings, ui) -> list:
    """Each tab's Generate: a pre-check into the status panel, then the validated, queued, named endpoint."""
    shared, out = ui.shared, ui.out
    outputs = [out["video"], out["recipe"], shared.seed, out["status"], out["preview"]]
    events = []
    for tab in ui.tab_list:
        handler = make_generate(pool, tab.mode, settings.llm)
        if settings.gpu_decorator is not None:  # ZeroGPU: ask for the time this request needs
            handler = settings.gpu_decorator(duration=duration_for(pool, tab.mode, handler, build_options))(handler)
        inputs = tab.inputs + shared.inputs() + [ui.job, ui.llm]
        # The pre-check writes a refusal into the status panel (image and video inputs cannot show validation
        # messages); the validator then refuses the same request before it is queued, for API callers too.
        event = tab.button.click(make_precheck(pool, tab.mode), inputs, out["status"], queue=False,
                                 api_visibility="private", show_progress="hidden").then(
            handler, inputs, outputs, api_name=tab.mode, concurrency_id="gpu", concurrency_limit=len(pool),
            validator=make_validator(pool, tab.mode), show_progress="full", show_progress_on=[out["video"]])
        _after_run(pool, ui, event)
        events.append(event)
        for upload in tab.uploads:
            reader = video_size if tab.mode == "extend" else image_size
            upload.upload(_pick_aspect(pool.preset, reader), upload, shared.aspect_ratio, queue=False,
                          api_visibility="private")
            if tab.mode == "extend":
                upload.upload(_pick_fps, upload, shared.fps, queue=False, api_visibility="private")
    return events


def _after_run(pool: EnginePool, ui, event) -> None:
    """After a run: record the shown result, refresh History and the parameter panel. The worker records what it
    saved; on ZeroGPU it runs in a forked process, so the shown result is recorded here too (idempotent)."""
    recorded = event.then(lambda video, job: job.record(video), [ui.out["video"], ui.job], None, queue=False,
                          api_visibility="private")
    recorded.then(ui.refresh_history, ui.job, [ui.history["gallery"], ui.history["paths"]], queue=False,
                  api_visibility="private").then(lambda: param_rows(pool), None, ui.panels.params, queue=False,
                                                 api_visibility="private")


def _build_batch() -> dict:
    with gr.Accordion("Batch: several prompts, one after another", open=False, elem_id="batch"):
        mode = gr.Radio([(label, mode) for mode, label in TAB_LABELS.items()], value="t2v", elem_id="batch-mode",
                        label="With the settings and media of", info="Follows the tab you open; pick another here.")
        text = gr.Textbox(label=f"Prompts, one per line (up to {MAX_BATCH})", lines=4, elem_id="batch-prompts",
                          placeholder="a red circle moving to the right on a black background\n"
                                      "a blue square sliding left over white")
        gr.Markdown("Each line runs with that tab's settings and media. Seeds: the seed box's seed, then "
                    "the next ones (or each drawn, with *randomize*). A failed line is marked and the batch goes "
                    "on; **Stop** ends the running line and cancels the rest. Every video lands in History.")
        button = gr.Button("Run batch", elem_id="run-batch")
        table = gr.Dataframe(headers=BATCH_COLUMNS, value=None, interactive=False, wrap=True, label="Batch",
                             elem_id="batch-table", column_widths=["6%", "50%", "18%", "12%", "14%"])
    return {"mode": mode, "text": text, "button": button, "table": table}


def _wire_batch(pool: EnginePool, settings: StudioSettings, ui, batch: dict):
    """Run batch: the tab whose settings it uses, the batch box, every tab's inputs, the shared controls
    (BATCH_NAMES). The tab choice is a visible input, so gradio_client callers name it too."""
    shared, out = ui.shared, ui.out
    tab_inputs = [component for tab in ui.tab_list for component in tab.inputs]
    inputs = ([batch["mode"], batch["text"]] + tab_inputs + [getattr(shared, name) for name in BATCH_SHARED_NAMES]
              + [ui.job, ui.llm])
    assert len(inputs) == len(BATCH_NAMES), "the batch inputs must follow BATCH_NAMES"
    event = batch["button"].click(
        make_generate_batch(pool, settings.llm), inputs,
        [batch["table"], out["video"], out["recipe"], shared.seed, out["status"], out["preview"]], api_name="batch",
        concurrency_id="gpu", concurrency_limit=len(pool), show_progress="full", show_progress_on=[out["video"]])
    _after_run(pool, ui, event)
    return event


def _wire_result_buttons(ui, events: list, settings: StudioSettings) -> None:
    """Stop (this session's running job, plus queued ones), Send to Extend and Make GIF."""
    out = ui.out
    out["stop"].click(stop_job, ui.job, out["status"], queue=False, api_name="stop", cancels=events)
    for tab in ui.tab_list:
        if tab.finish is not None:  # no cancels=: the running job goes on to the end of its segment
            tab.finish.click(finish_segment, ui.job, out["status"], queue=False, api_name="stop_after_segment")
    extend_video = next(tab for tab in ui.tab_list if tab.mode == "extend").inputs[0]

    def send_to_extend(path):
        if not path:
            gr.Warning("There is no result to send yet: generate a video first.")
            return gr.skip(), gr.skip(), gr.skip()
        return path, gr.Tabs(selected="extend"), "extend"

    out["send"].click(send_to_extend, out["video"], [extend_video, ui.tabs, ui.mode], api_visibility="private")
    i2v_image = next(tab for tab in ui.tab_list if tab.mode == "i2v").inputs[0]
    out["send_frame"].click(last_frame_to_i2v, [out["video"], ui.job], [i2v_image, ui.tabs, ui.mode],
                            api_visibility="private")

    def make_gif(path):
        if not path:
            gr.Warning("There is no result to export yet: generate a video first.")
            return gr.skip()
        # The player may hold Gradio's cached copy of a result: the GIF belongs beside the result itself.
        saved = Path(settings.output_dir) / Path(path).name
        try:
            return str(video_to_gif(saved if saved.is_file() else path))
        except OptionsError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    out["gif"].click(make_gif, out["video"], out["gif_file"], concurrency_limit=1, api_visibility="private")


def _wire_refine(demo, settings: StudioSettings, ui) -> None:
    """LLM settings per session, the base URL and model remembered by the browser (never the key, which stays in
    this session on the server and is never echoed), and the Refine button."""
    ctl, by_mode = ui.refine, {tab.mode: tab for tab in ui.tab_list}
    remembered = gr.BrowserState({}, storage_key=LLM_STORAGE_KEY, secret=settings.browser_secret)
    for box in (ctl.base_url, ctl.model):
        box.change(remember_llm, [ctl.base_url, ctl.model], remembered, queue=False, api_visibility="private")
    demo.load(lambda saved: [gr.skip() if value is None else value for value in restore_llm(saved)], remembered,
              [ctl.base_url, ctl.model], queue=False, api_visibility="private")

    def update_llm(base_url, model, api_key):
        config, note = session_llm(settings.llm, base_url, model, api_key, public=settings.public)
        return config, gr.Button(interactive=config.is_configured), llm_status(config, note)

    for box in (ctl.base_url, ctl.model, ctl.api_key):
        box.change(update_llm, [ctl.base_url, ctl.model, ctl.api_key], [ui.llm, ctl.button, ctl.status],
                   queue=False, api_visibility="private")
    ctl.button.click(lambda p, m, i, f, llm, position, clip, direction, last: refine(
                         p, m, i, f, llm, settings.llm, position, clip, direction, last),
                     [ui.shared.prompt, ui.mode, by_mode["i2v"].inputs[0], by_mode["loop"].inputs[0], ui.llm,
                      by_mode["i2v"].inputs[1], by_mode["extend"].inputs[0], by_mode["extend"].inputs[1],
                      by_mode["loop"].inputs[1]],
                     [ui.shared.refined_prompt, ui.shared.use_refined], concurrency_id="llm", concurrency_limit=4,
                     api_visibility="private")
