"""Saving results: safe names, unique stems under concurrency, redacted recipes, clean failures, history listing."""

import errno
import json
import os
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch

from pipelines import media, saving
from pipelines.results import ResultFiles, list_results
from pipelines.saving import (
    SavedResult,
    SaveError,
    redact_secrets,
    release_output_stem,
    sanitize_name,
    save_result,
    unique_output_stem,
    write_json_atomic,
)

NOW = datetime(2026, 11, 27, 23, 40, 5)


def clip(t=4, h=16, w=16) -> torch.Tensor:
    return torch.rand(3, t, h, w) * 2 - 1  # (3, T, H, W)


# ---- names --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat on a skateboard", "a_cat_on_a_skateboard"),
        ("../etc/passwd", "etc_passwd"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("\x00", "untitled"),
        ("nul\x00byte", "nul_byte"),
        ("CON", "CON_"),
        ("com1", "com1_"),
        ("...", "untitled"),
        ("", "untitled"),
        ("🎬🍿", "untitled"),
        ("café 🎬 au lait", "café_au_lait"),
        ("日本の 猫", "日本の_猫"),
        ("  -_spaced out_-  ", "spaced_out"),
    ],
)
def test_sanitize_name_cases(text, expected):
    assert sanitize_name(text) == expected


def test_sanitize_name_is_short_and_has_no_separators():
    name = sanitize_name("x" * 500)
    assert name == "x" * 60
    long_unicode = sanitize_name("猫" * 500, max_len=200)
    assert len(long_unicode.encode("utf-8")) <= 120
    for text in ["../../x", "a/../b", "..\\..\\win", "C:\\temp\\x", "a..b"]:
        name = sanitize_name(text)
        assert "/" not in name and "\\" not in name and ".." not in name and ":" not in name
    assert sanitize_name("word " * 40, max_len=10) == "word_word"


def test_unique_output_stem_format_and_suffixes(tmp_path):
    first = unique_output_stem(tmp_path, "t2v", 42, name="A cat!", now=NOW)
    assert first.name == "20261127-234005_t2v_s42_A_cat"
    (tmp_path / f"{first.name}.mp4").write_bytes(b"x")
    release_output_stem(first)
    second = unique_output_stem(tmp_path, "t2v", 42, name="A cat!", now=NOW)
    assert second.name == "20261127-234005_t2v_s42_A_cat-2"
    third = unique_output_stem(tmp_path, "t2v", 42, name="A cat!", now=NOW)  # -2 is still reserved
    assert third.name.endswith("-3")
    assert unique_output_stem(tmp_path, "i2v_head", 7, now=NOW).name == "20261127-234005_i2v_head_s7"
    with pytest.raises(ValueError):
        unique_output_stem(tmp_path, "../x", 1, now=NOW)
    with pytest.raises(ValueError):
        unique_output_stem(tmp_path, "t2v", -1, now=NOW)


def test_unique_output_stem_never_repeats_across_threads(tmp_path):
    stems, errors = [], []
    barrier = threading.Barrier(8)

    def reserve():
        try:
            barrier.wait()
            for _ in range(5):
                stems.append(unique_output_stem(tmp_path, "t2v", 1, now=NOW))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(stems) == 40 and len(set(stems)) == 40


def test_concurrent_saves_get_distinct_files(tmp_path):
    results, errors = [], []
    barrier = threading.Barrier(8)

    def save(seed_name):
        try:
            barrier.wait()
            results.append(save_result(clip(t=1), tmp_path, {"seed": 1}, fps=24, mode="t2i", seed=1))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.video_path for r in results}) == 8
    assert len(list_results(tmp_path)) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "reservations are released"


# ---- recipes ------------------------------------------------------------------------------------------------------


def test_redact_secrets_drops_secret_keys_at_any_depth():
    recipe = {
        "prompt": "a cat",
        "api_key": "sk-abc",
        "OpenAI-API-Key": "x",
        "refine": {"model": "gpt-4o", "token": "t", "max_tokens": 128, "headers": {"Authorization": "Bearer z"}},
        "refs": [{"path": "a.png", "key": "k", "access_token": "a"}],
        "num_keyframes": 3,
        "note": "sk-proj-ABCDEFGHIJKLMNOPQRSTUV",
    }
    clean = redact_secrets(recipe)
    assert clean == {
        "prompt": "a cat",
        "refine": {"model": "gpt-4o", "max_tokens": 128, "headers": {}},
        "refs": [{"path": "a.png"}],
        "num_keyframes": 3,
        "note": "<redacted>",
    }
    assert recipe["api_key"] == "sk-abc", "the input is not modified"


def test_write_json_atomic_never_overwrites(tmp_path):
    path = write_json_atomic({"a": Path("/x"), "b": [1, 2]}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": "/x", "b": [1, 2]}
    with pytest.raises(FileExistsError):
        write_json_atomic({"a": 2}, path)
    assert json.loads(path.read_text())["b"] == [1, 2]
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_save_result_writes_video_and_redacted_recipe(tmp_path):
    recipe = {"prompt": "a cat", "seed": 3, "openai": {"api_key": "sk-secret"}, "steps": 2}
    result = save_result(clip(), tmp_path / "out", recipe, fps=24, mode="t2v", seed=3, name="a cat")
    assert result.video_path.suffix == ".mp4" and result.video_path.exists()
    assert result.recipe_path == result.video_path.with_suffix(".json")
    saved = json.loads(result.recipe_path.read_text())
    assert saved == {"prompt": "a cat", "seed": 3, "openai": {}, "steps": 2}
    assert "sk-secret" not in result.video_path.read_bytes().decode("latin-1")
    frames, fps = media.read_video(result.video_path)
    assert frames.shape == (3, 4, 16, 16) and fps == pytest.approx(24)
    assert result.video_path.suffix == ".mp4"


def test_save_result_keeps_copies_of_the_references_beside_the_result(tmp_path):
    image, clip_file = tmp_path / "upload.PNG", tmp_path / "clip.mp4"
    image.write_bytes(b"png bytes")
    clip_file.write_bytes(b"mp4 bytes")
    out = tmp_path / "out"
    result = save_result(clip(), out, {"prompt": "x"}, fps=24, mode="loop", seed=2, references=(str(image), clip_file))
    saved = json.loads(result.recipe_path.read_text())
    stem = result.video_path.stem
    assert saved["references_saved"] == [f"{stem}.ref0.png", f"{stem}.ref1.mp4"]
    assert (out / f"{stem}.ref0.png").read_bytes() == b"png bytes" and (out / f"{stem}.ref1.mp4").exists()
    image.unlink()  # the upload cache is cleared: the copies remain
    assert (out / saved["references_saved"][0]).exists()
    assert [r.media for r in list_results(out)] == [result.video_path]  # the copies are not results themselves


def test_a_reference_that_cannot_be_copied_never_costs_the_result(tmp_path, caplog):
    out = tmp_path / "out"
    good = tmp_path / "good.png"
    good.write_bytes(b"png")
    refs = (tmp_path / "gone.png", tmp_path, good)  # deleted meanwhile, a folder, a file
    result = save_result(clip(), out, {"prompt": "x"}, fps=24, mode="loop", seed=1, references=refs)
    saved = json.loads(result.recipe_path.read_text())
    assert result.video_path.exists() and saved["references_saved"] == [f"{result.video_path.stem}.ref2.png"]
    assert "not kept beside the result" in caplog.text
    # a reference already in the output folder (a result sent to Extend) is linked, not copied again
    again = save_result(clip(), out, {"prompt": "x"}, fps=24, mode="extend", seed=2, references=(result.video_path,))
    copy = out / json.loads(again.recipe_path.read_text())["references_saved"][0]
    assert copy.stat().st_ino == result.video_path.stat().st_ino
    odd = tmp_path / "clip.mp4;rm -rf"
    odd.write_bytes(b"x")
    weird = save_result(clip(), out, {"prompt": "x"}, fps=24, mode="extend", seed=3, references=(odd,))
    assert json.loads(weird.recipe_path.read_text())["references_saved"] == [f"{weird.video_path.stem}.ref0"]


def test_a_failed_save_removes_the_reference_copies_too(tmp_path, monkeypatch):
    image = tmp_path / "upload.png"
    image.write_bytes(b"png bytes")
    monkeypatch.setattr(saving.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SaveError):
        save_result(clip(), tmp_path / "out", {"prompt": "x"}, fps=24, mode="i2v", seed=1, references=(image,))
    assert list((tmp_path / "out").iterdir()) == []


def test_the_recipe_can_be_left_out_of_the_files_own_tags(tmp_path):
    kept = save_result(clip(), tmp_path, {"prompt": "a secret plan"}, fps=24, mode="t2v", seed=1)
    bare = save_result(clip(), tmp_path, {"prompt": "a secret plan"}, fps=24, mode="t2v", seed=2, embed_recipe=False)
    single = save_result(clip(t=1), tmp_path, {"prompt": "a secret plan"}, fps=24, mode="t2i", seed=3,
                         embed_recipe=False)
    assert b"a secret plan" in kept.video_path.read_bytes()
    assert b"a secret plan" not in bare.video_path.read_bytes() + single.video_path.read_bytes()
    assert json.loads(bare.recipe_path.read_text())["prompt"] == "a secret plan"  # the sidecar stays


def test_save_result_writes_png_for_one_frame(tmp_path):
    result = save_result(clip(t=1), tmp_path, {"prompt": "x"}, fps=24, mode="t2i", seed=0)
    assert result.video_path.suffix == ".png"
    assert media.read_image(result.video_path).shape == (3, 16, 16)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_save_result_reports_unwritable_folder_and_leaves_nothing(tmp_path, monkeypatch, code):
    # Patching os.replace/os.link (rather than chmod) works even as root, where permissions are not enforced.
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(media.os, "replace", refuse)
    with pytest.raises(SaveError, match="another output folder") as info:
        save_result(clip(), tmp_path, {"prompt": "x"}, fps=24, mode="t2v", seed=1)
    assert info.value.errno == code
    assert list(tmp_path.iterdir()) == []


def test_save_result_removes_the_video_when_the_recipe_fails(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving.os, "link", refuse)
    with pytest.raises(SaveError, match="disk is full"):
        save_result(clip(), tmp_path, {"prompt": "x"}, fps=24, mode="t2v", seed=1)
    assert list(tmp_path.iterdir()) == []


# ---- history ------------------------------------------------------------------------------------------------------


def test_list_results_newest_first_and_ignores_partial_files(tmp_path):
    old = save_result(clip(t=1), tmp_path, {"n": 1}, fps=24, mode="t2i", seed=1)
    new = save_result(clip(), tmp_path, {"n": 2}, fps=24, mode="t2v", seed=2)
    os.utime(old.recipe_path, ns=(1_000_000_000, 1_000_000_000))
    (tmp_path / ".20260101-000000_t2v_s9.1234abcd.partial.mp4").write_bytes(b"x")
    (tmp_path / ".20260101-000000_t2v_s9.lock").write_bytes(b"")
    (tmp_path / "20260101-000000_t2v_s8.mp4").write_bytes(b"x")  # video without its recipe: incomplete
    (tmp_path / "20260101-000000_t2v_s7.json").write_text("{}")  # recipe without its video
    (tmp_path / "notes.txt").write_text("hi")
    assert list_results(tmp_path) == [ResultFiles(r.video_path, r.recipe_path) for r in (new, old)]
    assert [r.media for r in list_results(tmp_path, limit=1)] == [new.video_path]
    assert list_results(tmp_path / "missing") == []
    assert isinstance(new, SavedResult)
