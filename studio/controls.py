"""The controls every tab shares: prompt and refinement, size, duration, motion, sampler settings and seed.

The pure helpers (sizes, durations, motion choices, LLM settings) are separate from the component builders so that
tests can check them without a browser.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, fields
from typing import Callable
from urllib.parse import urlsplit

import gradio as gr

from pipelines.options import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, OptionsError, frames_for_seconds
from pipelines.prompt_refine import LLMConfig
from pipelines.sizes import closest_aspect_ratio, get_image_size, round_up

log = logging.getLogger(__name__)

AUTO_MOTION = "auto"
NOT_PUBLIC = "its host does not resolve to a public internet address"
LLM_STORAGE_KEY = "open-sora-studio-llm"  # the browser's localStorage entry for the LLM endpoint and model
_MOTION_WORDS = {1: "still", 2: "very slow", 3: "slow", 4: "steady", 5: "lively", 6: "fast", 7: "very fast"}
MOTION_CHOICES = [(f"{score} · {word}", str(score)) for score, word in _MOTION_WORDS.items()] + \
    [("auto (ask the LLM)", AUTO_MOTION)]


# ---- pure helpers --------------------------------------------------------------------------------------------------
def frame_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """The (height, width) a resolution and aspect ratio produce, rounded as the sampler needs."""
    height, width = get_image_size(resolution, aspect_ratio)
    return round_up(height), round_up(width)


def aspect_choices(preset, resolution: str) -> list[tuple[str, str]]:
    """Aspect-ratio choices labelled with the real pixel size at this resolution, e.g. '16:9 · 368×208 px'."""
    choices = []
    for ratio in preset.sampling.aspect_ratios:
        try:
            height, width = frame_size(resolution, ratio)
        except ValueError:
            continue
        if height * width <= preset.sampling.max_pixels:
            choices.append((f"{ratio} · {width}×{height} px", ratio))
    return choices


def size_text(resolution: str, aspect_ratio: str) -> str:
    try:
        height, width = frame_size(resolution, aspect_ratio)
    except ValueError as exc:
        return f"⚠ {exc}"
    return f"Output size: **{width}×{height} px** (width × height)"


def duration_text(num_frames, fps) -> str:
    """'33 frames = 1.38 s at 24 fps', with a hint when the count is not 4k+1."""
    try:
        frames, rate = int(num_frames), int(fps)
    except (TypeError, ValueError):
        return "Set the number of frames and the fps."
    if rate <= 0 or frames <= 0:
        return "Frames and fps must be positive."
    hint = "" if (frames - 1) % 4 == 0 else " ⚠ the frame count must be 4k+1 (…, 29, 33, 37, …)"
    return f"{frames} frames = **{frames / rate:.2f} s** at {rate} fps{hint}"


def seconds_range(num_frames, fps, max_frames: int) -> tuple[float, float] | None:
    """(duration, longest duration) in seconds for the Duration slider at this frame count and fps; None when
    either cannot be read (the slider stays as it is)."""
    try:
        frames, rate = int(num_frames), int(fps)
    except (TypeError, ValueError):
        return None
    if rate <= 0 or frames <= 0:
        return None
    longest = round(max_frames / rate, 2)
    return min(round(frames / rate, 2), longest), longest


def frames_from_seconds(seconds, fps, max_frames: int) -> int:
    """Duration slider -> frame count snapped to 4k+1 (pipelines.options.frames_for_seconds)."""
    return frames_for_seconds(float(seconds or 0), int(fps or 1), max_frames)


def parse_motion(choice) -> int | str | None:
    """A motion choice ('1'..'7' or 'auto') -> 1..7, 'auto', or None (the preset default)."""
    if choice in (None, ""):
        return None
    if str(choice).strip().lower().startswith(AUTO_MOTION):
        return AUTO_MOTION
    try:
        return int(float(choice))
    except (TypeError, ValueError):
        return str(choice)  # resolve_options explains what is wrong with it


def aspect_for_image(height: int, width: int, preset) -> str:
    """The preset aspect ratio closest to an uploaded image's shape."""
    return closest_aspect_ratio(height, width, preset.sampling.aspect_ratios)


def public_endpoint_problem(base_url: str, resolve: Callable = socket.getaddrinfo) -> str | None:
    """Why a public studio must not call this visitor-typed LLM base URL, or None when it may.

    A studio others can reach (a Space, a share link, a non-loopback host) would otherwise make requests from the
    server to wherever a visitor points it: its own loopback services, the private network, a cloud metadata
    address. Only http(s) URLs whose host resolves to public internet addresses pass. The reason given is the
    same for every refused host, so a visitor cannot map the server's network by trying names (the server's log
    has the details). Redirects are never followed (pipelines.prompt_refine); a name that resolves differently
    later (DNS rebinding) is not caught here."""
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "it is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not host:
        return "it names no host"
    try:
        addresses = [ipaddress.ip_address(host)]  # a literal address needs no lookup
    except ValueError:
        try:
            infos = resolve(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        except (OSError, UnicodeError, ValueError) as exc:
            log.info("visitor LLM URL refused: %s does not resolve (%s)", host, exc)
            return NOT_PUBLIC
    private = [str(address) for address in addresses if not address.is_global]
    if private:
        log.info("visitor LLM URL refused: %s is %s", host, ", ".join(private))
        return NOT_PUBLIC
    return None


@functools.lru_cache(maxsize=256)
def _checked_recently(base_url: str, minute: int) -> str | None:
    """public_endpoint_problem, looked up at most once a minute per URL (the settings boxes re-check on every
    keystroke)."""
    return public_endpoint_problem(base_url)


def session_llm(server: LLMConfig, base_url: str | None, model: str | None, api_key: str | None, *,
                public: bool = False, resolve: Callable = socket.getaddrinfo) -> tuple[LLMConfig, str | None]:
    """The server's LLM settings with this session's non-empty overrides, and a note when an override was refused.

    The server's key goes only to the server's own endpoint: a visitor who types another base URL (on a Space or
    a share link) brings their own key, or none for a local server, and never receives the operator's. On a
    `public` studio such a URL must also pass `public_endpoint_problem`; otherwise the server's settings stay and
    the note says why."""
    base_url, model, api_key = ((value or "").strip() for value in (base_url, model, api_key))
    own_endpoint = not base_url or base_url.rstrip("/") == (server.base_url or "").rstrip("/")
    if public and not own_endpoint:
        problem = (_checked_recently(base_url, int(time.monotonic() // 60)) if resolve is socket.getaddrinfo
                   else public_endpoint_problem(base_url, resolve))
        if problem:
            return server, (f"The base URL `{base_url}` is not used: {problem}. This studio is public, so it "
                            "calls only public endpoints; the server's LLM setting stays.")
    try:
        return LLMConfig(base_url=base_url or server.base_url, model=model or server.model,
                         api_key=api_key or (server.api_key if own_endpoint else None),
                         timeout_s=server.timeout_s, max_retries=server.max_retries), None
    except ValueError as exc:
        return server, f"These LLM settings are not used ({exc}); the server's stay."


# Saved parameter sets: every shared setting but the prompt (a set is reused across prompts).
PARAMETER_SET_FIELDS = ("negative_prompt", "resolution", "aspect_ratio", "num_frames", "fps", "motion_score",
                        "num_steps", "guidance", "guidance_img", "seed", "randomize_seed")
MAX_PARAMETER_SETS = 30
SETTINGS_STORAGE_KEY = "open-sora-studio-settings"  # the browser's localStorage entry for saved parameter sets


def save_parameter_set(saved, name: str | None, values: list) -> tuple[dict, str]:
    """(the browser's saved sets with `values` (PARAMETER_SET_FIELDS order) under `name`, a line saying so);
    raises OptionsError for a missing or overlong name, or one set too many."""
    sets = dict(saved) if isinstance(saved, dict) else {}
    name = (name or "").strip()
    if not name:
        raise OptionsError("name the settings first (e.g. 'slow pans, 8 s')")
    if len(name) > 60:
        raise OptionsError("keep the name under 60 characters")
    if name not in sets and len(sets) >= MAX_PARAMETER_SETS:
        raise OptionsError(f"{MAX_PARAMETER_SETS} sets are saved already: delete one first")
    sets[name] = dict(zip(PARAMETER_SET_FIELDS, values))
    return sets, f"Saved the settings as *{name}* (in this browser)."


def load_parameter_set(saved, name: str | None) -> dict:
    """The values of a saved set by field name (only PARAMETER_SET_FIELDS); raises OptionsError when it is gone."""
    sets = saved if isinstance(saved, dict) else {}
    values = sets.get((name or "").strip())
    if not isinstance(values, dict):
        raise OptionsError("choose a saved set first")
    return {key: value for key, value in values.items() if key in PARAMETER_SET_FIELDS and value is not None}


def delete_parameter_set(saved, name: str | None) -> dict:
    """The browser's saved sets without `name`; raises OptionsError when no set is chosen."""
    name = (name or "").strip()
    if not name:
        raise OptionsError("choose a saved set to delete first")
    return {k: v for k, v in saved.items() if k != name} if isinstance(saved, dict) else {}


def remember_llm(base_url: str | None, model: str | None) -> dict:
    """What the browser keeps of the LLM settings between visits: the endpoint and model, never the key."""
    return {"base_url": (base_url or "").strip(), "model": (model or "").strip()}


def restore_llm(saved) -> tuple[str | None, str | None]:
    """(base URL, model) a browser saved on an earlier visit; None where nothing usable was saved (the server's
    setting stays)."""
    saved = saved if isinstance(saved, dict) else {}

    def pick(key: str) -> str | None:
        value = saved.get(key)
        return value.strip() if isinstance(value, str) and value.strip() else None

    return pick("base_url"), pick("model")


def llm_status(config: LLMConfig, note: str | None = None) -> str:
    """One line saying whether refinement is available and, if not, why; `note` (a refused override) first."""
    if config.is_configured:
        where = config.base_url or "OpenAI"
        line = f"LLM ready: `{config.model}` at {where}."
    else:
        line = ("Prompt refinement and 'auto' motion are off: no LLM endpoint is configured. Start the server with "
                "OPENAI_API_KEY (or OPENSORA_LLM_BASE_URL for a local server), or fill in *LLM settings* below.")
    return f"{note} {line}" if note else line


# ---- components ----------------------------------------------------------------------------------------------------
@dataclass
class SharedControls:
    """Components every tab's Generate reads; `inputs()` gives them in the handlers' parameter order."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    refined_prompt: gr.Textbox
    use_refined: gr.Checkbox
    resolution: gr.Radio
    aspect_ratio: gr.Dropdown
    num_frames: gr.Number
    fps: gr.Slider
    motion_score: gr.Dropdown
    num_steps: gr.Slider
    guidance: gr.Slider
    guidance_img: gr.Slider
    seed: gr.Number
    randomize_seed: gr.Checkbox

    def inputs(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class RefineControls:
    button: gr.Button
    status: gr.Markdown
    base_url: gr.Textbox
    model: gr.Textbox
    api_key: gr.Textbox


@dataclass
class ParameterSets:
    choice: gr.Dropdown
    name: gr.Textbox
    save: gr.Button
    load: gr.Button
    delete: gr.Button


@dataclass
class DurationControls:
    seconds: gr.Slider
    text: gr.Markdown
    size: gr.Markdown
    sets: ParameterSets


def build_prompt_block(server_llm: LLMConfig) -> tuple[dict, RefineControls]:
    """Prompt, negative prompt and the refine-with-LLM row; returns (components, refine controls)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                placeholder="a red circle moving to the right on a black background",
                                info="What happens in the video: objects, colours, motion, background.")
        with gr.Column(scale=3):
            refined = gr.Textbox(label="Refined prompt (editable)", lines=3, value="", elem_id="refined-prompt",
                                 info="Written by the LLM when you press Refine; edit it freely. Used only when "
                                      "'use refined' is ticked.")
    with gr.Row():
        ready = server_llm.is_configured
        button = gr.Button("Refine with LLM", size="sm", interactive=ready, elem_id="refine")
        use_refined = gr.Checkbox(label="use refined", value=False,
                                  info="Generate from the refined prompt instead of the original.")
    status = gr.Markdown(llm_status(server_llm), elem_id="llm-status")
    negative = gr.Textbox(label="Negative prompt", lines=1, value="",
                          info="What the video should avoid (the sampler steers away from it).")
    with gr.Accordion("LLM settings", open=False):
        base_url = gr.Textbox(label="Base URL", value=server_llm.base_url or "",
                              info="Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama …); empty = OpenAI. "
                                   "This browser remembers it, and the model, for the next visit.")
        model = gr.Textbox(label="Model", value=server_llm.model, elem_id="llm-model",
                           info="A vision model lets Image to video / Loop describe the uploaded image.")
        api_key = gr.Textbox(label="API key", type="password", value="",
                             placeholder="set on the server" if server_llm.api_key else "sk-…",
                             info="Used for this browser session only; never stored, shown or logged.")
    return ({"prompt": prompt, "negative_prompt": negative, "refined_prompt": refined, "use_refined": use_refined},
            RefineControls(button, status, base_url, model, api_key))


def build_settings_block(preset) -> tuple[dict, DurationControls]:
    """Size, duration, fps, motion, sampler settings and seed, with help on each."""
    s = preset.sampling
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            resolution = gr.Radio(list(s.resolutions), value=s.resolution, label="Resolution",
                                  info="Pixel budget per frame (256px ≈ 256×256 pixels).")
            aspect = gr.Dropdown(aspect_choices(preset, s.resolution), value=s.aspect_ratio, label="Aspect ratio",
                                 info="Width:height, with the real pixel size; picked from an uploaded image.")
        size = gr.Markdown(size_text(s.resolution, s.aspect_ratio))
        with gr.Row():
            seconds = gr.Slider(0, round(s.max_frames / s.fps, 2), value=round(s.num_frames / s.fps, 2),
                                step=0.01, label="Duration (s)",
                                info="Converted to a frame count of the form 4k+1 (the model's unit).")
            frames = gr.Number(value=s.num_frames, precision=0, label="Frames", minimum=1, maximum=s.max_frames,
                               info=f"4k+1, at most {s.max_frames}.")
            fps = gr.Slider(1, 60, value=s.fps, step=1, label="FPS", info="Playback rate; also told to the model.")
        text = gr.Markdown(duration_text(s.num_frames, s.fps))
        with gr.Row():
            # allow_custom_value: API callers may send a number (5) as well as a choice ("5"); anything else is
            # refused by the options' validation with a clear message
            motion = gr.Dropdown(MOTION_CHOICES, value=str(s.motion_score), label="Motion score",
                                 allow_custom_value=True,
                                 info="How much moves: 1 still … 7 very fast; 'auto' asks the LLM.")
            steps = gr.Slider(1, MAX_STEPS, value=s.num_steps, step=1, label="Steps", elem_id="num-steps",
                              info="Sampling steps: more is slower and usually cleaner.")
        with gr.Row():
            guidance = gr.Slider(0, MAX_GUIDANCE, value=s.guidance, step=0.5, label="Guidance",
                                 info="How strongly to follow the prompt (classifier-free guidance).")
            guidance_img = gr.Slider(0, MAX_GUIDANCE, value=s.guidance_img, step=0.5, label="Image guidance",
                                     info="How strongly to follow reference images or clips.")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                             info="The seed used is written back here after each run.")
            randomize = gr.Checkbox(value=True, label="Randomize seed",
                                    info="Untick to reuse the seed above and reproduce a result.")
        with gr.Row(equal_height=True):
            saved_sets = gr.Dropdown([], value=None, label="Saved settings", allow_custom_value=False,
                                     elem_id="saved-settings", info="Everything above and the negative prompt, "
                                                                    "kept in this browser.")
            set_name = gr.Textbox(label="Name", max_lines=1, placeholder="e.g. slow pans, 8 s", elem_id="set-name")
            with gr.Column(min_width=120):
                save_set = gr.Button("Save", size="sm", elem_id="save-settings")
                load_set = gr.Button("Load", size="sm", elem_id="load-saved-settings")
                delete_set = gr.Button("Delete", size="sm", elem_id="delete-settings")
    components = {"resolution": resolution, "aspect_ratio": aspect, "num_frames": frames, "fps": fps,
                  "motion_score": motion, "num_steps": steps, "guidance": guidance, "guidance_img": guidance_img,
                  "seed": seed, "randomize_seed": randomize}
    return components, DurationControls(seconds, text, size, ParameterSets(saved_sets, set_name, save_set, load_set,
                                                                          delete_set))


def wire_settings(demo, preset, shared: SharedControls, duration: DurationControls,
                  browser_secret: str | None = None) -> None:
    """Keep the derived texts in step (size label, aspect choices, seconds <-> frames, duration text) and wire the
    saved parameter sets."""
    max_frames = preset.sampling.max_frames

    def on_resolution(resolution, aspect):
        choices = aspect_choices(preset, resolution)
        value = aspect if aspect in [v for _, v in choices] else (choices[0][1] if choices else None)
        return gr.Dropdown(choices=choices, value=value), size_text(resolution, value)

    shared.resolution.change(on_resolution, [shared.resolution, shared.aspect_ratio],
                             [shared.aspect_ratio, duration.size], queue=False, api_visibility="private")
    shared.aspect_ratio.change(size_text, [shared.resolution, shared.aspect_ratio], duration.size, queue=False,
                               api_visibility="private")
    duration.seconds.input(lambda sec, fps: frames_from_seconds(sec, fps, max_frames), [duration.seconds, shared.fps],
                           shared.num_frames, queue=False, api_visibility="private")
    def on_frames_or_fps(num_frames, fps):
        seconds = seconds_range(num_frames, fps, max_frames)
        slider = gr.skip() if seconds is None else gr.Slider(value=seconds[0], maximum=seconds[1])
        return duration_text(num_frames, fps), slider

    _wire_parameter_sets(demo, shared, duration.sets, browser_secret)
    for source in (shared.num_frames, shared.fps):  # frames, fps or Load settings -> the text and the slider
        source.change(on_frames_or_fps, [shared.num_frames, shared.fps], [duration.text, duration.seconds],
                      queue=False, api_visibility="private")


def _wire_parameter_sets(demo, shared: SharedControls, sets: ParameterSets, secret: str | None) -> None:
    """Save / load / delete named parameter sets in the browser's localStorage (gr.BrowserState)."""
    stored = gr.BrowserState({}, storage_key=SETTINGS_STORAGE_KEY, secret=secret)
    fields_ = [getattr(shared, name) for name in PARAMETER_SET_FIELDS]

    def names(saved) -> list[str]:
        return sorted(saved) if isinstance(saved, dict) else []

    def on_save(saved, name, *values):
        try:
            saved, message = save_parameter_set(saved, name, list(values))
        except OptionsError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(message)
        return saved, gr.Dropdown(choices=names(saved), value=name.strip())

    def on_load(saved, name):
        try:
            values = load_parameter_set(saved, name)
        except OptionsError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return [values.get(field, gr.skip()) for field in PARAMETER_SET_FIELDS]

    def on_delete(saved, name):
        try:
            sets = delete_parameter_set(saved, name)
        except OptionsError as exc:
            gr.Warning(str(exc).capitalize() + ".")
            return gr.skip(), gr.skip()
        return sets, gr.Dropdown(choices=names(sets), value=None)

    sets.save.click(on_save, [stored, sets.name, *fields_], [stored, sets.choice], queue=False,
                    api_visibility="private")
    sets.load.click(on_load, [stored, sets.choice], fields_, queue=False, api_visibility="private")
    sets.delete.click(on_delete, [stored, sets.choice], [stored, sets.choice], queue=False, api_visibility="private")
    sets.choice.select(lambda name: name, sets.choice, sets.name, queue=False, api_visibility="private")
    demo.load(lambda saved: gr.Dropdown(choices=names(saved)), stored, sets.choice, queue=False,
              api_visibility="private")
