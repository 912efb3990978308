"""Prompt refinement against a local fake OpenAI-compatible server: answers, failures, retries, key hygiene."""

import base64
import io
import logging
import socket

import pytest
from PIL import Image

from pipelines.prompt_refine import (
    LLMConfig,
    RefineResult,
    ask_motion_score,
    image_to_data_url,
    parse_motion_score,
    refine_kind,
    refine_prompt,
)
from tests.fake_llm import DEFAULT_ANSWER, FakeLLMServer

SECRET = "sk-test-SECRET-0123456789"
PROMPT = "red circle moving right on black"


def make_config(server: FakeLLMServer, **overrides) -> LLMConfig:
    options = {"base_url": server.base_url, "model": "fake-model", "api_key": SECRET, "timeout_s": 0.5,
               "max_retries": 0}
    options.update(overrides)
    return LLMConfig(**options)


def assert_no_secret(*values) -> None:
    for value in values:
        assert SECRET not in repr(value)


@pytest.fixture
def png_path(tmp_path):
    path = tmp_path / "frame.png"
    Image.new("RGB", (32, 24), (220, 40, 40)).save(path)
    return path


def test_config_reads_the_environment():
    env = {"OPENSORA_LLM_BASE_URL": "http://local:8000/v1", "OPENAI_BASE_URL": "http://other/v1",
           "OPENSORA_LLM_MODEL": "qwen2-vl", "OPENAI_API_KEY": SECRET}
    config = LLMConfig.from_env(env)
    assert (config.base_url, config.model, config.api_key) == ("http://local:8000/v1", "qwen2-vl", SECRET)
    assert LLMConfig.from_env({"OPENAI_BASE_URL": "http://other/v1"}).base_url == "http://other/v1"


def test_config_defaults_to_gpt4o_and_is_unconfigured_without_key_or_url():
    config = LLMConfig.from_env({"OPENSORA_LLM_BASE_URL": "", "OPENAI_API_KEY": ""})
    assert (config.base_url, config.model, config.api_key) == (None, "gpt-4o", None)
    assert not config.is_configured
    assert LLMConfig(api_key=SECRET).is_configured
    assert LLMConfig(base_url="http://127.0.0.1:11434/v1").is_configured


def test_config_repr_masks_the_key():
    config = LLMConfig(base_url=None, model="gpt-4o", api_key=SECRET)
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert "***" in repr(config)


@pytest.mark.parametrize("overrides", [{"timeout_s": 0}, {"max_retries": -1}, {"model": " "}])
def test_config_rejects_nonsense(overrides):
    with pytest.raises(ValueError):
        LLMConfig(**{"api_key": SECRET, **overrides})


def test_t2v_refinement_returns_the_llm_caption(fake_llm):
    result = refine_prompt(PROMPT, "t2v", make_config(fake_llm))
    assert result == RefineResult(PROMPT, DEFAULT_ANSWER, ok=True, error=None)
    (request,) = fake_llm.requests
    assert request.path == "/v1/chat/completions"
    body = request.json
    assert body["model"] == "fake-model"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert PROMPT in body["messages"][1]["content"]


def test_answer_is_flattened_to_one_unquoted_line(fake_llm):
    fake_llm.answer = '  "A green square\n slides left."  '
    assert refine_prompt("green square", "t2i", make_config(fake_llm)).refined == "A green square slides left."


def test_segment_markers_in_the_answer_are_taken_out(fake_llm):
    """A refined piece of a `|0|...|2|...` prompt is put back behind its marker: markers inside it would split it."""
    fake_llm.answer = "A red circle |1| moves right, |2| then stops."
    assert refine_prompt("red circle", "t2v", make_config(fake_llm)).refined == "A red circle moves right, then stops."
    fake_llm.answer = "|0| |3|"
    result = refine_prompt("red circle", "t2v", make_config(fake_llm))
    assert not result.ok and result.refined == "red circle" and "markers only" in result.error


def test_i2v_sends_the_image_as_a_data_url(fake_llm, png_path):
    result = refine_prompt("it starts moving left", "i2v", make_config(fake_llm), image_path=png_path)
    assert result.ok
    (request,) = fake_llm.requests
    parts = request.json["messages"][1]["content"]
    image_parts = [p for p in parts if p["type"] == "image_url"]
    assert len(image_parts) == 1
    url = image_parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png_path.read_bytes()
    assert any(p["type"] == "text" and "moving left" in p["text"] for p in parts)


def test_a_pair_sends_both_images_first_frame_then_last(fake_llm, png_path, tmp_path):
    last = tmp_path / "last.png"
    Image.new("RGB", (8, 8), (40, 180, 70)).save(last)
    assert refine_prompt("it turns green", "i2v_pair", make_config(fake_llm), image_path=[png_path, last]).ok
    (request,) = fake_llm.requests
    system, user = request.json["messages"]
    urls = [p["image_url"]["url"] for p in user["content"] if p["type"] == "image_url"]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [png_path.read_bytes(), last.read_bytes()]
    assert "first attached image is the first frame" in system["content"] and "last frame" in system["content"]
    with pytest.raises(ValueError, match="needs 2 images"):
        refine_prompt("x", "i2v_pair", make_config(fake_llm), image_path=png_path)
    assert refine_kind("i2v_loop", images=2) == "i2v_pair" and refine_kind("i2v_loop") == "i2v"


def test_large_images_are_downscaled_before_sending(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (300, 200), (40, 90, 220)).save(path)
    url = image_to_data_url(path, max_side=64)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(decoded.size) == 64


def test_bad_images_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        image_to_data_url(tmp_path / "missing.png")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        image_to_data_url(not_image)


@pytest.mark.parametrize(
    "behaviour, reason",
    [("empty", "empty answer"), ("malformed", "malformed answer"), ("no_choices", "no choices"),
     ("http_500", "HTTP 500"), ("slow", "within 0.5 s")],
)
def test_failures_keep_the_original_and_say_why(fake_llm, behaviour, reason):
    fake_llm.behaviour = behaviour
    result = refine_prompt(PROMPT, "t2v", make_config(fake_llm))
    assert not result.ok
    assert result.refined == result.original == PROMPT
    assert reason in result.error


def test_server_errors_are_retried_a_bounded_number_of_times(fake_llm):
    fake_llm.behaviour = "http_500"
    result = refine_prompt(PROMPT, "t2v", make_config(fake_llm, max_retries=1))
    assert not result.ok
    assert len(fake_llm.requests) == 2


def test_redirects_are_never_followed(fake_llm):
    """A public studio checks the address it is given; a redirect must not lead the request anywhere else."""
    with FakeLLMServer() as elsewhere:
        fake_llm.behaviour, fake_llm.redirect_to = "redirect", elsewhere.base_url + "/chat/completions"
        result = refine_prompt(PROMPT, "t2v", make_config(fake_llm))
        assert not result.ok and "307" in result.error and result.refined == PROMPT
        assert elsewhere.requests == [] and len(fake_llm.requests) == 1


def test_unreachable_server_is_reported():
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET, timeout_s=0.5, max_retries=0)
    result = refine_prompt(PROMPT, "t2v", config)
    assert not result.ok and "could not reach" in result.error


def test_unconfigured_llm_is_a_clear_error_not_a_silent_fallback():
    result = refine_prompt(PROMPT, "t2v", LLMConfig())
    assert not result.ok and result.refined == PROMPT
    assert "OPENAI_API_KEY" in result.error
    score, error = ask_motion_score(PROMPT, LLMConfig())
    assert score is None and "OPENAI_API_KEY" in error


def test_key_goes_only_into_the_authorization_header(fake_llm, png_path, caplog):
    caplog.set_level(logging.DEBUG)
    results = [refine_prompt(PROMPT, "t2v", make_config(fake_llm)),
               refine_prompt(PROMPT, "i2v", make_config(fake_llm), image_path=png_path),
               ask_motion_score(PROMPT, make_config(fake_llm))]
    for behaviour in ("http_500", "http_401_echo_key", "malformed", "slow"):
        fake_llm.behaviour = behaviour
        results.append(refine_prompt(PROMPT, "t2v", make_config(fake_llm)))
        results.append(ask_motion_score(PROMPT, make_config(fake_llm)))
    assert_no_secret(*results)
    assert SECRET not in caplog.text
    assert any("401" in str(r) for r in results)
    for request in fake_llm.requests:
        assert SECRET.encode() not in request.body
        carrying = {k.lower(): v for k, v in request.headers.items() if SECRET in v}
        assert carrying == {"authorization": f"Bearer {SECRET}"}


def test_bad_arguments_raise_value_error(png_path):
    config = LLMConfig(api_key=SECRET)
    with pytest.raises(ValueError, match="t2v, t2i, i2v, i2v_tail, i2v_pair"):
        refine_prompt(PROMPT, "v2v", config)
    with pytest.raises(ValueError, match="needs the reference image"):
        refine_prompt(PROMPT, "i2v", config)
    with pytest.raises(ValueError, match="only sent for i2v"):
        refine_prompt(PROMPT, "t2v", config, image_path=png_path)
    with pytest.raises(ValueError, match="empty"):
        refine_prompt("   ", "t2v", config)


@pytest.mark.parametrize("answer, score", [("4", 4), ("Motion score: 5/7", 5), ("3 motion score.", 3),
                                           ("4.6", 5), ("12", 7), ("1", 1)])
def test_motion_score_is_parsed_and_kept_in_the_studio_range(fake_llm, answer, score):
    fake_llm.answer = answer
    assert ask_motion_score(PROMPT, make_config(fake_llm)) == (score, None)
    system = fake_llm.requests[0].json["messages"][0]["content"]
    assert "1 to 7" in system


@pytest.mark.parametrize("answer", ["fast", "0", "-3", "20", "no idea at all"])
def test_unusable_motion_scores_are_errors(answer):
    score, error = parse_motion_score(answer)
    assert score is None and error


def test_motion_score_request_failures_are_reported(fake_llm):
    fake_llm.behaviour = "http_500"
    score, error = ask_motion_score(PROMPT, make_config(fake_llm))
    assert score is None and "HTTP 500" in error


def test_refine_kind_follows_the_condition():
    from pipelines.prompt_refine import refine_kind

    assert [refine_kind(c) for c in ("t2v", "i2v_head", "i2v_loop", "i2v_tail", "v2v_head")] == [
        "t2v", "i2v", "i2v", "i2v_tail", "t2v"]
