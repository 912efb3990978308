"""Prompt suffixes must match upstream Open-Sora 2.0 character for character (golden text_suffix.json)."""

import math

import pytest

from pipelines.text import (
    add_fps_info_to_text,
    add_motion_score_to_text,
    build_prompt,
    check_fps_added,
    ensure_sentence_ends_with_period,
    format_training_caption,
    map_target_fps,
)
from tests.golden import load_golden_json


@pytest.fixture(scope="module")
def golden():
    return load_golden_json("text_suffix.json")


def test_suffix_calls_match_upstream_golden(golden):
    # The golden "call" strings are plain Python over these two helpers; evaluating them keeps every case
    # (including held-out variants of the same shape) checked without a hand-written table.
    namespace = {
        "text": list(golden["inputs"]),
        "add_fps_info_to_text": add_fps_info_to_text,
        "add_motion_score_to_text": add_motion_score_to_text,
    }
    assert golden["cases"], "golden file has no cases"
    for case in golden["cases"]:
        got = eval(case["call"], {"__builtins__": {}}, namespace)  # noqa: S307 - trusted reference file
        assert got == case["output"], case["call"]


def test_helpers_match_upstream_golden(golden):
    for sentence, expected in golden["helpers"]["check_fps_added"].items():
        assert check_fps_added(sentence) is expected, sentence
    for sentence, expected in golden["helpers"]["ensure_sentence_ends_with_period"].items():
        assert ensure_sentence_ends_with_period(sentence) == expected, sentence


def test_build_prompt_puts_fps_before_motion_score():
    assert build_prompt("raining, sea", 24, "4") == "raining, sea. 24 FPS. 4 motion score."
    assert build_prompt("  a red circle moving right  ", 24, 7) == "a red circle moving right. 24 FPS. 7 motion score."


def test_build_prompt_without_motion_score_adds_only_fps():
    assert build_prompt("a blue square", 16, None) == "a blue square. 16 FPS."


def test_build_prompt_keeps_an_existing_fps_suffix():
    assert build_prompt("city at night 16 FPS.", 24, 4) == "city at night 16 FPS. 4 motion score."


def test_inputs_are_not_modified_in_place():
    texts = ["A cat"]
    add_fps_info_to_text(texts, 24)
    add_motion_score_to_text(texts, 4)
    assert texts == ["A cat"]


@pytest.mark.parametrize("score", ["dynamic", "", " 4", "4 ", "four", True, math.nan, math.inf, None, [4]])
def test_motion_score_rejects_non_numbers(score):
    with pytest.raises(ValueError, match="motion score"):
        add_motion_score_to_text(["a cat"], score)


@pytest.mark.parametrize("score, suffix", [("4", "4"), (7, "7"), (4.5, "4.5"), ("2.5", "2.5")])
def test_motion_score_is_written_verbatim(score, suffix):
    assert add_motion_score_to_text(["a cat"], score) == [f"a cat {suffix} motion score."]


@pytest.mark.parametrize("fps", [0, -24, 24.0, "24", True, None])
def test_fps_must_be_a_positive_integer(fps):
    with pytest.raises(ValueError, match="fps"):
        add_fps_info_to_text(["a cat"], fps)


@pytest.mark.parametrize(
    "fps, expected",
    [(30, (15, 2)), (24, (24, 1)), (25, (12, 2)), (60, (20, 3)), (48, (24, 2)), (12, (12, 1)), (29.97, (14, 2))],
)
def test_map_target_fps_subsamples_fast_clips(fps, expected):
    assert map_target_fps(fps, 24) == expected


def test_map_target_fps_maps_unknown_fps_to_zero():
    assert map_target_fps(math.nan) == (0, 1)


def test_training_caption_joins_parts_with_a_comma():
    expected = "a red circle moving right 24 FPS, 4 motion score."
    assert format_training_caption("a red circle moving right", 24, 4) == expected
    assert format_training_caption("clip", 30, 3.5) == "clip 15 FPS, 4 motion score."
    assert format_training_caption("clip", 60, 4.4) == "clip 20 FPS, 4 motion score."


def test_training_caption_drops_missing_parts():
    assert format_training_caption("clip", math.nan, 4) == "clip 4 motion score."
    assert format_training_caption("clip", None, 4) == "clip 4 motion score."
    assert format_training_caption("clip", 24, None) == "clip 24 FPS."
    assert format_training_caption("clip", 24, math.nan) == "clip 24 FPS."
    assert format_training_caption("clip", None, None) == "clip"


def test_training_and_inference_formats_differ():
    # Facts §10.8: the model saw "24 FPS, 4 motion score." in training but is prompted with "24 FPS. 4 motion score."
    assert format_training_caption("sea", 24, 4) == "sea 24 FPS, 4 motion score."
    assert build_prompt("sea", 24, 4) == "sea. 24 FPS. 4 motion score."


def test_segment_prompts_follow_open_soras_multi_prompt_syntax():
    from pipelines.text import has_segment_prompts, segment_prompts, split_segment_markers

    assert segment_prompts("a red circle", 3) == ["a red circle"] * 3
    assert segment_prompts("|0|a red circle|2|a blue circle", 4) == ["a red circle", "a red circle",
                                                                     "a blue circle", "a blue circle"]
    assert segment_prompts("  |0| a cat |1| a dog ", 2) == ["a cat", "a dog"]
    assert not has_segment_prompts("a cat |0| in a box") and segment_prompts("a cat |0| in a box", 1) == [
        "a cat |0| in a box"]  # markers count only at the start
    assert split_segment_markers(" a cat ") == [(None, "a cat")]
    assert split_segment_markers("|0|a cat|3| a dog") == [(0, "a cat"), (3, "a dog")]
    for bad, message in (("|1|a", r"start with \|0\|"), ("|0|a|0|b", "must increase"),
                         ("|0|a|3|b", r"sets segment 3 .* set 4 or more segments"),
                         ("|0|a|1| ", r"after \|1\| is empty")):
        with pytest.raises(ValueError, match=message):
            segment_prompts(bad, 3)
