"""Faults and secrets through the engine: OOM, a failing disk, stops at every stage, LLM failures, no pickles."""

import ast
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import pipelines.engine as engine_module
import pipelines.media as media
from pipelines.engine import Engine, StageEvent
from pipelines.prompt_refine import LLMConfig
from pipelines.sampling import GenerationStopped
from pipelines.saving import SaveError
from pipelines.options import GenerationOptions
from tests.fake_llm import FakeLLMServer
from tests.tiny_preset import tiny_preset

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-DO-NOT-LEAK-12345"


@pytest.fixture
def engine(tmp_path):
    return Engine(tiny_preset(), output_dir=tmp_path / "out", preview_every=0).load()


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if not p.name.startswith(".")) if folder.exists() else []


def test_out_of_memory_in_a_step_gives_advice_and_the_next_job_runs(engine, monkeypatch):
    real_sample = engine_module.sample

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine_module, "sample", oom)
    with pytest.raises(MemoryError, match="fewer frames.*smaller resolution.*offload"):
        engine.run(GenerationOptions(prompt="a red circle", seed=1))
    assert engine.state.stage == "idle"
    monkeypatch.setattr(engine_module, "sample", real_sample)
    assert engine.run(GenerationOptions(prompt="a red circle", seed=1)).video_path.exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_read_only_or_full_disk_mid_save_leaves_nothing_visible(engine, monkeypatch, code):
    out = engine.output_dir
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(media.os, "replace", failing_replace)
    with pytest.raises(SaveError, match="another output folder"):
        engine.run(GenerationOptions(prompt="a red circle", seed=1))
    assert visible_files(out) == []
    monkeypatch.setattr(media.os, "replace", real_replace)
    result = engine.run(GenerationOptions(prompt="a red circle", seed=1))
    assert visible_files(out) == sorted([result.video_path.name, result.recipe_path.name])


@pytest.mark.parametrize("stage", ["encode_text", "encode_references", "sample", "decode"])
def test_stop_at_any_stage_ends_the_job_and_saves_nothing(engine, stage):
    """A stop asked for during a stage ends the job before the next one (once saving has begun, it finishes)."""
    seen = []

    def on_event(event):
        if isinstance(event, StageEvent):
            seen.append(event.stage)

    with pytest.raises(GenerationStopped):
        engine.run(GenerationOptions(prompt="a red circle", seed=1), on_event=on_event,
                   should_stop=lambda: stage in seen)
    assert visible_files(engine.output_dir) == [] and engine.state.stage == "idle"


@pytest.mark.parametrize("behaviour", ["http_500", "slow", "malformed", "empty", "http_401_echo_key"])
def test_llm_failure_keeps_the_prompt_says_why_and_never_leaks_the_key(tmp_path, behaviour, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeLLMServer(behaviour=behaviour, delay_s=3.0) as server:
        llm = LLMConfig(base_url=server.base_url, api_key=SECRET, timeout_s=0.5, max_retries=0)
        engine = Engine(tiny_preset(), output_dir=tmp_path, llm=llm, preview_every=0)
        result = engine.run(GenerationOptions(prompt="a red circle", refine=True, seed=1))
    recipe_text = result.recipe_path.read_text()
    recipe = json.loads(recipe_text)
    assert recipe["prompt"]["refined"] is None and recipe["prompt"]["final"].startswith("a red circle.")
    assert any("refinement failed" in w for w in result.warnings)
    assert SECRET not in recipe_text and SECRET not in caplog.text and SECRET not in repr(llm)


def test_llm_success_keeps_original_beside_refined(tmp_path):
    with FakeLLMServer(answer="A red circle glides right over black.") as server:
        llm = LLMConfig(base_url=server.base_url, api_key=SECRET, timeout_s=2)
        result = Engine(tiny_preset(), output_dir=tmp_path, llm=llm, preview_every=0).run(
            GenerationOptions(prompt="red circle", refine=True, seed=1))
        assert server.requests and all(SECRET not in r.body.decode() for r in server.requests)
    prompt = json.loads(result.recipe_path.read_text())["prompt"]
    assert prompt["original"] == "red circle" and prompt["refined"] == "A red circle glides right over black."
    assert SECRET not in result.recipe_path.read_text()


def test_refining_a_two_image_loop_shows_the_llm_both_images(tmp_path):
    from PIL import Image

    images = []
    for name, colour in (("first.png", (220, 40, 40)), ("last.png", (40, 90, 220))):
        Image.new("RGB", (64, 64), colour).save(tmp_path / name)
        images.append(str(tmp_path / name))
    with FakeLLMServer(answer="The red frame turns blue.") as server:
        llm = LLMConfig(base_url=server.base_url, api_key=SECRET, timeout_s=2)
        Engine(tiny_preset(), output_dir=tmp_path / "out", llm=llm, preview_every=0).run(
            GenerationOptions(mode="loop", prompt="it turns blue", references=tuple(images), refine=True, seed=1,
                              num_frames=9))
        (request,) = server.requests
    parts = request.json["messages"][1]["content"]
    assert len([part for part in parts if part["type"] == "image_url"]) == 2


def torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                yield node


def test_no_pickle_based_load_path_anywhere():
    sources = [p for d in ("pipelines", "studio", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "app.py"]
    for path in sources:
        tree = ast.parse(path.read_text())
        for call in torch_load_calls(tree):
            flags = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in flags and getattr(flags["weights_only"], "value", None) is True, \
                f"{path}:{call.lineno} calls torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("loads",
                                                                                                      "load"):
                assert not (isinstance(node.func.value, ast.Name) and node.func.value.id == "pickle"), \
                    f"{path}:{node.lineno} unpickles data"


def test_a_run_can_bring_its_own_llm_endpoint(tmp_path):
    """A studio session's LLM settings reach the engine's LLM stages (here per-segment motion scores)."""
    with FakeLLMServer(answer="6") as server:
        session = LLMConfig(base_url=server.base_url, api_key="sk-session", timeout_s=2)
        engine = Engine(tiny_preset(), output_dir=tmp_path, llm=LLMConfig(), preview_every=0)  # none of its own
        result = engine.run(GenerationOptions(prompt="a red circle", motion_score="dynamic", seed=1), llm=session)
        assert len(server.requests) == 1
    assert result.recipe["options"]["motion_score"] == 6 and not result.warnings
    later = engine.run(GenerationOptions(prompt="a red circle", motion_score="dynamic", seed=1))
    assert any("no LLM" in w or "motion score failed" in w for w in later.warnings)  # the next run: back to its own

