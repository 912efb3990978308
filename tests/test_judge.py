"""The Shapes judge reads background, colour, shape, direction and speed back from rendered clips."""

import math
import random

import numpy as np
import pytest

from pipelines.training.judge import (
    background_color, centroid_track, continuation_directions, first_turn, judge_clip, legs, motion_direction,
    object_color, object_mask, object_shape, object_speed, psnr, speed_score_correlation,
)
from pipelines.training.shapes import BACKGROUNDS, ShapeSpec, render_clip, sample_spec

FIELDS = ("background", "color", "shape", "direction")


@pytest.fixture(scope="module")
def ground_truth():
    """300 rendered clips (33 frames, 64×64, a quarter of them loops) with their judge reports."""
    rng = random.Random(2024)
    specs = [sample_spec(rng, num_frames=33, loop=i % 4 == 0) for i in range(300)]
    return [(spec, judge_clip(render_clip(spec, 33), spec)) for spec in specs]


def test_judge_recovers_ground_truth_on_rendered_clips(ground_truth):
    for field in FIELDS:
        correct = np.mean([report[f"{field}_correct"] for _, report in ground_truth])
        assert correct >= 0.99, (field, correct)
    assert np.mean([report["all_correct"] for _, report in ground_truth]) >= 0.99


def test_measured_speed_tracks_the_motion_score(ground_truth):
    speeds = [report["speed"] for _, report in ground_truth]
    scores = [spec.motion_score for spec, _ in ground_truth]
    correlation = speed_score_correlation(speeds, scores)
    assert correlation["pearson"] > 0.9 and correlation["spearman"] > 0.9
    for spec, report in ground_truth:
        assert report["speed"] == pytest.approx(spec.speed, abs=0.05)


def test_direction_is_the_initial_one_after_a_bounce():
    # Starts 6 px from the right edge: bounces after 6 frames, then travels left for the remaining 58.
    spec = ShapeSpec("circle", "yellow", "black", "right", 4, 16, 50.0, 30.0)
    clip = render_clip(spec, 65)
    assert motion_direction(clip) == "right"
    assert object_speed(clip) == pytest.approx(1.0, abs=0.05)
    looped = ShapeSpec("square", "purple", "gray", "up", 3, 14, 32.0, 40.0, loop=True)
    assert motion_direction(render_clip(looped, 33)) == "up"


def test_literal_readings_follow_the_rules_word_for_word(ground_truth):
    # On clean renders the literal rules agree with the main readings, but for bounces: a whole-clip fit
    # averages the two legs, where the caption names the first.
    for field in ("color", "shape"):
        assert np.mean([report[f"{field}_literal_correct"] for _, report in ground_truth]) >= 0.97, field
    bounce = judge_clip(render_clip(ShapeSpec("circle", "yellow", "black", "right", 4, 16, 50.0, 30.0), 65))
    assert bounce["direction"] == "right" and bounce["direction_literal"] == "left"


def test_still_object_reads_still():
    spec = ShapeSpec("triangle", "orange", "white", "still", 1, 18, 30.0, 25.0)
    clip = render_clip(spec, 33)
    assert motion_direction(clip) == "still" and object_speed(clip) == pytest.approx(0.0, abs=1e-9)
    assert object_shape(clip) == "triangle" and object_color(clip) == "orange"


def test_first_turn_ignores_jitter_below_tolerance():
    track = np.array([0, 1, 2, 3, 2.6, 4, 5, 6, 5, 4, 3], dtype=float)
    assert first_turn(track, tolerance=1.0) == 7
    assert first_turn(np.zeros(5), tolerance=1.0) == 4


def _square_at(xs, ys, size: int = 14) -> np.ndarray:
    """A white square on black whose top-left corner follows (xs, ys), one frame per position."""
    clip = np.full((len(xs), 64, 64, 3), 10, np.uint8)
    for frame, x, y in zip(clip, xs, ys):
        frame[int(y):int(y) + size, int(x):int(x) + size] = 245
    return clip


def test_legs_cut_a_track_at_each_bounce():
    track = np.array([5, 4, 3, 4, 5, 6, 7, 8, 7, 6], dtype=float)
    assert legs(track) == [(0, 2), (2, 7), (7, 9)]
    assert legs(np.arange(6, dtype=float)) == [(0, 5)]


def test_continuation_is_judged_over_the_worlds_longest_leg():
    # The world goes up for 4 frames after the cut, bounces off the top and goes down for 28; a continuation that
    # bounces a little early and jitters 2 px sideways carries on the same way, though the first legs disagree.
    ys = np.concatenate([np.arange(4, 0, -1), np.arange(0, 29)]).astype(float)
    world = _square_at(np.full(len(ys), 20.0), ys)
    jitter = np.where(np.arange(len(ys)) % 8 < 4, 22.0, 20.0)
    early = _square_at(jitter, np.concatenate([[4.0, 3.0], np.linspace(3.0, 29.0, len(ys) - 2)]))
    assert continuation_directions(early, world) == ("down", "down")
    assert motion_direction(early) != motion_direction(world) == "up"
    going_on_up = _square_at(np.full(len(ys), 20.0), np.linspace(30.0, 0.0, len(ys)))
    assert continuation_directions(going_on_up, world) == ("up", "down")
    lost = np.full_like(world, 10)
    assert continuation_directions(lost, world) == ("still", "down")


def test_background_is_the_most_common_border_colour():
    # The object touches the left edge, yet the border is still mostly background.
    spec = ShapeSpec("square", "white", "gray", "still", 1, 20, 10.0, 32.0)
    clip = render_clip(spec, 5)
    assert background_color(clip) == "gray"
    mask = object_mask(clip[0], BACKGROUNDS["gray"])
    assert mask.sum() == 400 and mask[:, 0].any()


def test_centroid_track_follows_the_object():
    spec = ShapeSpec("circle", "red", "black", "down", 4, 12, 20.0, 10.0)
    track = centroid_track(render_clip(spec, 9))
    assert track[:, 0] == pytest.approx(np.full(9, 20.0), abs=1e-6)
    assert track[:, 1] == pytest.approx(10.0 + np.arange(9), abs=1e-6)


def test_judge_tolerates_mild_noise():
    rng, noise = random.Random(9), np.random.default_rng(0)
    correct = []
    for _ in range(60):
        spec = sample_spec(rng, num_frames=33)
        clip = render_clip(spec, 33).astype(np.float64) + noise.normal(0, 6, (33, 64, 64, 3))
        correct.append(judge_clip(np.clip(clip, 0, 255).astype(np.uint8), spec)["all_correct"])
    assert np.mean(correct) >= 0.95


def test_empty_clip_has_no_object():
    clip = np.full((9, 64, 64, 3), 245, np.uint8)
    report = judge_clip(clip, ShapeSpec("circle", "red", "white", "still", 1, 12, 32.0, 32.0))
    assert report["background"] == "white" and report["color"] is None and report["shape"] is None
    assert report["direction"] == "still" and math.isnan(report["speed"])
    assert report["all_correct"] is False and judge_clip(clip)["all_correct"] is None


def test_psnr_of_identical_frames_is_infinite_and_of_different_frames_finite():
    clip = render_clip(ShapeSpec("circle", "blue", "white", "right", 5, 14, 20.0, 20.0), 9)
    assert psnr(clip[0], clip[0]) == math.inf
    value = psnr(clip[0], clip[8])
    assert math.isfinite(value) and 5 < value < 60
    with pytest.raises(ValueError):
        psnr(clip[0], clip)


def test_speed_score_correlation_summaries():
    perfect = speed_score_correlation([0.5, 1.0, 1.5, float("nan")], [2, 4, 6, 7])
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert perfect["n"] == 3
    reversed_ = speed_score_correlation([3, 2, 1], [1, 2, 3])
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert math.isnan(speed_score_correlation([1, 1], [2, 3])["pearson"])
    with pytest.raises(ValueError):
        speed_score_correlation([1, 2], [1])


def test_bad_clip_shape_is_refused():
    with pytest.raises(ValueError, match="T, H, W, 3"):
        judge_clip(np.zeros((64, 64, 3), np.uint8))
