"""Resolution/aspect buckets must match upstream get_image_size exactly (golden image_sizes.json)."""

import pytest

from pipelines.sizes import (
    ASPECT_RATIO_LD_LIST,
    ASPECT_RATIOS,
    closest_aspect_ratio,
    flip_aspect_ratio,
    get_aspect_ratio_sizes,
    get_image_size,
    get_num_pixels,
    round_up,
    sanitized_image_size,
)
from tests.golden import load_golden_json

STUDIO_RATIOS = ("16:9", "9:16", "1:1", "2.39:1")


@pytest.fixture(scope="module")
def golden():
    return load_golden_json("image_sizes.json")


def test_base_list_and_key_order_match_upstream(golden):
    assert list(ASPECT_RATIO_LD_LIST) == golden["ASPECT_RATIO_LD_LIST"]
    for resolution, entry in golden["results"].items():
        assert list(ASPECT_RATIOS) == entry["keys_in_dict_order"]
        sizes = get_aspect_ratio_sizes(get_num_pixels(resolution))
        assert list(sizes) == entry["keys_in_dict_order"], resolution


def test_pixel_budgets_match_upstream(golden):
    for resolution, entry in golden["results"].items():
        assert get_num_pixels(resolution) == entry["num_pixels"]


def test_inference_sizes_match_upstream(golden):
    for resolution, entry in golden["results"].items():
        for ratio, size in entry["sizes"].items():
            assert get_image_size(resolution, ratio) == (size["height"], size["width"]), (resolution, ratio)
            expected = (size["sanitized_height"], size["sanitized_width"])
            assert sanitized_image_size(resolution, ratio) == expected, (resolution, ratio)


def test_training_sizes_match_upstream(golden):
    for resolution, entry in golden["results"].items():
        for ratio, size in entry["sizes"].items():
            if size["training_true"] is None:
                # Upstream merges this ratio into an earlier bucket with the same size.
                with pytest.raises(ValueError, match="shares its training bucket"):
                    get_image_size(resolution, ratio, training=True)
            else:
                assert get_image_size(resolution, ratio, training=True) == tuple(size["training_true"]), ratio


def test_vertical_flip_transposes_the_size():
    for resolution in ("64px", "256px", "768px"):
        for ratio in ASPECT_RATIO_LD_LIST:
            height, width = get_image_size(resolution, ratio)
            assert get_image_size(resolution, flip_aspect_ratio(ratio)) == (width, height)


def test_small_resolutions_use_the_same_formula():
    # 64² = 4096 px: width = floor(sqrt(4096·16/9)/16)·16 = 80, height = floor(4096/80/16)·16 = 48.
    assert get_image_size("64px", "16:9") == (48, 80)
    assert get_image_size("64px", "9:16") == (80, 48)
    assert get_image_size("64px", "1:1") == (64, 64)
    assert get_image_size("128px", "1:1") == (128, 128)
    for resolution in ("64px", "128px"):
        for ratio in ASPECT_RATIOS:
            height, width = get_image_size(resolution, ratio)
            assert height > 0 and width > 0 and height % 16 == 0 and width % 16 == 0, (resolution, ratio)


def test_p_resolutions_are_16_by_9_budgets():
    assert get_num_pixels("360p") == 230400
    assert get_num_pixels("720p") == 921600


def test_sizes_follow_the_spatial_compression():
    height, width = get_image_size("768px", "16:9", spatial_compression=32)
    assert height % 32 == 0 and width % 32 == 0


def test_too_small_budget_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        get_image_size("16px", "2.39:1")


@pytest.mark.parametrize("resolution", ["256", "256PX", "abc", "0px", "px", "-256px", "256px_max", 256, None])
def test_unknown_resolution_names_valid_forms(resolution):
    with pytest.raises(ValueError, match="256px"):
        get_image_size(resolution, "16:9")


@pytest.mark.parametrize("ratio", ["7:5", "16/9", "", "16:9:1", None])
def test_unknown_aspect_ratio_lists_valid_ones(ratio):
    with pytest.raises(ValueError, match="16:9, 1.85:1"):
        get_image_size("256px", ratio)


@pytest.mark.parametrize("value, expected", [(0, 0), (1, 16), (16, 16), (17, 32), (335, 336), (336, 336)])
def test_round_up_to_multiple_of_16(value, expected):
    assert round_up(value) == expected


def test_round_up_other_multiples():
    assert round_up(33, 8) == 40
    with pytest.raises(ValueError):
        round_up(3, 0)


@pytest.mark.parametrize(
    "height, width, expected",
    [(1080, 1920, "16:9"), (1920, 1080, "9:16"), (512, 512, "1:1"), (100, 239, "2.39:1"), (239, 100, "1:2.39"),
     (600, 800, "4:3"), (800, 600, "3:4"), (64, 128, "2:1")],
)
def test_closest_aspect_ratio_picks_the_nearest_bucket(height, width, expected):
    assert closest_aspect_ratio(height, width) == expected


def test_closest_aspect_ratio_can_be_limited_to_the_studio_presets():
    assert closest_aspect_ratio(600, 800, STUDIO_RATIOS) == "16:9"  # 0.75 is nearer 0.5625 than 1.0
    assert closest_aspect_ratio(900, 800, STUDIO_RATIOS) == "1:1"
    assert closest_aspect_ratio(720, 1280, STUDIO_RATIOS) == "16:9"
    assert closest_aspect_ratio(400, 1000, STUDIO_RATIOS) == "2.39:1"


@pytest.mark.parametrize("height, width", [(0, 100), (100, 0), (-5, 10)])
def test_closest_aspect_ratio_rejects_empty_images(height, width):
    with pytest.raises(ValueError, match="positive"):
        closest_aspect_ratio(height, width)
