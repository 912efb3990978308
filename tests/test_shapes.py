"""The procedural Shapes world: sampling, rendering, captions and the training dataset."""

import itertools
import random
import re
import time

import numpy as np
import pytest
import torch

from pipelines.training.shapes import (
    BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, ShapesDataset, ShapesError, ShapeSpec, caption_for, centre_path,
    caption_with_shape, render_clip, sample_eval_prompts, sample_spec, twin_shape,
)

SHAPE_WORDS = {"circle": {"circle", "ball", "disc"}, "square": {"square", "box", "block"},
               "triangle": {"triangle", "wedge"}}
DIRECTION_WORDS = {"left": {"left", "leftward"}, "right": {"right", "rightward"}, "up": {"up", "upward"},
                   "down": {"down", "downward"}, "still": {"still"}}
ALL_DIRECTION_WORDS = set().union(*DIRECTION_WORDS.values())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _object_mass(clip: np.ndarray, background: str) -> np.ndarray:
    """Per-frame summed distance from the background: proportional to how much of the object is visible."""
    diff = clip.astype(np.float64) - np.asarray(BACKGROUNDS[background], np.float64)
    return np.abs(diff).sum(axis=(1, 2, 3))


def _centroid(frame: np.ndarray, background: str) -> np.ndarray:
    weight = np.abs(frame.astype(np.float64) - np.asarray(BACKGROUNDS[background])).sum(axis=-1)  # (H, W)
    ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]] + 0.5
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_seed_reproducibility_of_specs_clips_and_dataset_items():
    a = [sample_spec(random.Random(7), num_frames=33) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert np.array_equal(render_clip(a[0], 33), render_clip(a[1], 33))
    first, second = ShapesDataset(10, seed=3, loop_fraction=0.5), ShapesDataset(10, seed=3, loop_fraction=0.5)
    item, again = first[4], second[4]
    assert torch.equal(item["video"], again["video"]) and item["caption"] == again["caption"]
    assert first[5]["raw_caption"] != item["raw_caption"] or not torch.equal(first[5]["video"], item["video"])
    other_seed = ShapesDataset(10, seed=4)[4]
    assert not torch.equal(other_seed["video"], item["video"])


@pytest.mark.parametrize("num_frames", [1, 5, 9, 33, 65, 129])
def test_clip_has_any_4k_plus_1_length(num_frames):
    spec = sample_spec(random.Random(num_frames), num_frames=num_frames)
    clip = render_clip(spec, num_frames)
    assert clip.shape == (num_frames, 64, 64, 3) and clip.dtype == np.uint8


@pytest.mark.parametrize("num_frames", [0, 32, 34, 64])
def test_lengths_not_of_the_form_4k_plus_1_are_refused(num_frames):
    with pytest.raises(ShapesError, match="4k\\+1"):
        sample_spec(random.Random(0), num_frames=num_frames)
    with pytest.raises(ValueError):
        ShapesDataset(4, num_frames=num_frames)


def test_object_colour_never_equals_background():
    rng = random.Random(0)
    specs = [sample_spec(rng, num_frames=33) for _ in range(2000)]
    assert all(s.color != s.background for s in specs)
    assert {s.color for s in specs} == set(COLORS) and {s.background for s in specs} == set(BACKGROUNDS)
    assert all(sample_spec(rng, num_frames=33, color="white").background != "white" for _ in range(50))
    assert all(sample_spec(rng, num_frames=33, background="black").color != "black" for _ in range(50))
    with pytest.raises(ShapesError, match="invisible"):
        sample_spec(rng, num_frames=33, color="black", background="black")


def test_bounces_keep_the_whole_object_inside_the_frame():
    for direction, (x0, y0) in {"right": (50, 32), "left": (14, 32), "up": (32, 14), "down": (32, 50)}.items():
        spec = ShapeSpec("square", "red", "black", direction, 7, 20, x0, y0)
        clip = render_clip(spec, 129)
        mass = _object_mass(clip, "black")
        # Clipping at an edge would shrink the visible object; rounding alone moves the mass by well under 1%.
        assert mass.min() > 0.99 * mass.max()
        path = centre_path(spec, 129)
        assert path.min() >= 10 and path.max() <= 54
        axis = 0 if direction in ("left", "right") else 1
        steps = np.sign(np.diff(path[:, axis]))
        assert (steps > 0).any() and (steps < 0).any()  # it came back rather than stopping
        assert (np.abs(np.diff(path[:, axis])) > 0).all()  # and never paused


def test_loop_clip_last_frame_equals_first_and_middle_moves():
    rng = random.Random(1)
    for direction in ("left", "right", "up", "down"):
        spec = sample_spec(rng, num_frames=33, loop=True, direction=direction)
        clip = render_clip(spec, 33)
        assert np.array_equal(clip[0], clip[-1])
        assert not np.array_equal(clip[0], clip[16])


def test_speed_is_a_quarter_pixel_per_frame_per_motion_score():
    for score in range(2, 8):
        spec = ShapeSpec("circle", "blue", "white", "right", score, 14, 8.0, 32.0)
        assert spec.speed == 0.25 * score
        clip = render_clip(spec, 9)
        shift = _centroid(clip[8], "white") - _centroid(clip[0], "white")
        assert shift == pytest.approx([8 * 0.25 * score, 0.0], abs=1e-6)
    still = sample_spec(random.Random(0), num_frames=33, direction="still")
    assert still.motion_score == 1 and still.speed == 0
    clip = render_clip(still, 33)
    assert (clip == clip[0]).all()


def test_sampled_starts_leave_room_for_the_motion():
    rng, checked = random.Random(2), 0
    for _ in range(300):
        spec = sample_spec(rng, num_frames=33)
        travel = spec.speed * 32
        if travel <= 64 - spec.size:
            path = centre_path(spec, 33)
            axis = 0 if spec.direction in ("left", "right") else 1
            assert np.all(np.diff(path[:, axis]) * np.sign(path[-1, axis] - path[0, axis]) >= 0)
            checked += 1
    assert checked > 100  # most sampled clips have room for their whole travel


def test_larger_frames_show_the_same_scene_scaled():
    spec = ShapeSpec("triangle", "green", "gray", "down", 4, 16, 20.0, 12.0)
    small, large = render_clip(spec, 9, size=64), render_clip(spec, 9, size=128)
    assert large.shape == (9, 128, 128, 3)
    for t in (0, 8):
        # Supersampling the slanted edges at two resolutions differs by a few hundredths of a pixel.
        assert _centroid(large[t], "gray") == pytest.approx(2 * _centroid(small[t], "gray"), abs=0.05)


def test_captions_name_colour_shape_direction_and_background_for_every_combination():
    rng = random.Random(0)
    combos = [c for c in itertools.product(SHAPES, COLORS, BACKGROUNDS, DIRECTIONS) if c[1] != c[2]]
    seen = set()
    for shape, color, background, direction in combos:
        for _ in range(6):
            spec = sample_spec(rng, num_frames=33, shape=shape, color=color, background=background,
                               direction=direction)
            caption = caption_for(spec, rng)
            seen.add(caption.split()[0].lower() + " " + caption.split()[-1])
            words = _words(caption)
            assert {color, background} <= words, caption
            assert words & SHAPE_WORDS[shape], caption
            assert words & DIRECTION_WORDS[direction], caption
            assert not (words & (ALL_DIRECTION_WORDS - DIRECTION_WORDS[direction])), caption
    assert len(seen) > 10  # the wording varies


def test_training_caption_carries_fps_and_motion_score_suffix():
    item = ShapesDataset(4, seed=0)[1]
    assert item["caption"] == f"{item['raw_caption']} 24 FPS, {item['motion_score']} motion score."
    custom = ShapesDataset(4, seed=0, suffix_fn=lambda text, fps, score: f"{text}|{fps}|{score}")[1]
    assert custom["caption"] == f"{item['raw_caption']}|24|{item['motion_score']}"


def test_dataset_item_layout_and_loop_fraction():
    dataset = ShapesDataset(8, num_frames=17, size=64, loop_fraction=1.0, seed=5)
    item = dataset[0]
    video = item["video"]
    assert video.shape == (3, 17, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert item["loop"] is True and torch.equal(video[:, 0], video[:, -1])
    assert {"shape", "color", "background", "direction", "motion_score", "size", "x0", "y0"} <= set(item)
    assert not any(ShapesDataset(8, loop_fraction=0.0)[i]["loop"] for i in range(8))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["video"].shape == (2, 3, 17, 64, 64) and len(batch["caption"]) == 2
    with pytest.raises(IndexError):
        dataset[8]


def test_shape_twins_change_only_the_shape_and_cover_every_pair():
    plain, twins = ShapesDataset(12, num_frames=9, seed=3), ShapesDataset(12, num_frames=9, seed=3, twin=True)
    pairs = set()
    for i in range(12):
        a, b = plain[i], twins[i]
        assert b["shape"] == twin_shape(a["shape"], i) != a["shape"]
        assert all(a[k] == b[k] for k in ("color", "background", "direction", "motion_score", "size", "x0", "y0"))
        assert SHAPE_WORDS[b["shape"]] & _words(b["raw_caption"]) and not SHAPE_WORDS[a["shape"]] & _words(
            b["raw_caption"])
        mass_a, mass_b = _object_mass(_uint8(a["video"]), a["background"]), _object_mass(_uint8(b["video"]),
                                                                                          b["background"])
        box_a, box_b = _box(_uint8(a["video"])[0], a["background"]), _box(_uint8(b["video"])[0], b["background"])
        assert not np.allclose(mass_a, mass_b) and np.abs(box_a - box_b).max() <= 1  # same place, other shape
        pairs.add((a["shape"], b["shape"]))
    assert {(s, twin_shape(s, i)) for s in SHAPES for i in range(2)} == {(s, o) for s in SHAPES for o in SHAPES
                                                                          if s != o}
    assert len(pairs) >= 4


def test_caption_with_shape_swaps_only_the_shape_word():
    assert caption_with_shape("A red ball rolls left over gray.", "circle", "triangle") == \
        "A red triangle rolls left over gray."
    assert caption_with_shape("a blue wedge on black", "triangle", "square") == "a blue square on black"
    with pytest.raises(ShapesError, match="names no square"):
        caption_with_shape("a red circle", "square", "circle")


def _box(frame: np.ndarray, background: str) -> np.ndarray:
    """(x_min, y_min, x_max, y_max) of the pixels that differ from the background."""
    ys, xs = np.nonzero(np.abs(frame.astype(np.int64) - np.asarray(BACKGROUNDS[background])).sum(axis=-1))
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def _uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_eval_prompts_are_balanced_and_reproducible():
    prompts = sample_eval_prompts(60, seed=0)
    assert prompts == sample_eval_prompts(60, seed=0)
    for field, values in (("shape", SHAPES), ("direction", DIRECTIONS), ("background", BACKGROUNDS),
                          ("color", COLORS)):
        counts = [sum(getattr(p.spec, field) == v for p in prompts) for v in values]
        assert max(counts) - min(counts) <= 1, (field, counts)
    for prompt in prompts:
        words = _words(prompt.caption)
        assert prompt.spec.color in words and words & DIRECTION_WORDS[prompt.spec.direction]
    assert len({(p.spec.shape, p.spec.color, p.spec.background, p.spec.direction) for p in prompts}) == 60


def test_bad_requests_raise_clear_errors():
    rng = random.Random(0)
    with pytest.raises(ShapesError, match="cannot fix"):
        sample_spec(rng, num_frames=33, speed=3)
    with pytest.raises(ShapesError, match="still clips"):
        sample_spec(rng, num_frames=33, direction="still", motion_score=4)
    with pytest.raises(ShapesError, match="unknown shape|not one of"):
        sample_spec(rng, num_frames=33, shape="hexagon")
    with pytest.raises(ShapesError, match="outside the frame"):
        render_clip(ShapeSpec("circle", "red", "black", "left", 3, 20, 5.0, 32.0), 33)
    assert sample_spec(rng, num_frames=33, motion_score=1).direction == "still"
    assert sample_spec(rng, num_frames=33, object_size=12).size == 12


def test_renderer_is_fast():
    rng = random.Random(0)
    specs = [sample_spec(rng, num_frames=65) for _ in range(50)]
    render_clip(specs[0], 65)  # warm the sprite cache
    start = time.perf_counter()
    for spec in specs:
        render_clip(spec, 65)
    per_clip = (time.perf_counter() - start) / len(specs)
    assert per_clip < 0.02  # a few ms on an idle core; generous for a busy shared machine
