"""Does a clip follow its Shapes prompt? The judging rules of `shared/reference/shapes-world.md`, in numpy.

Every function takes a clip as uint8 (T, H, W, 3) (a single frame as (H, W, 3) where noted) and works at any frame
size. Image coordinates: x grows rightward, y grows downward, so "up" is a negative y velocity.

Reading the object: the background is the palette background most border pixels are nearest to; the object is
the pixels far from it. Rather than a hard mask, the shape and centroid use a soft *coverage* (how far a pixel sits
from the background toward the object's colour), restricted to the object and a one-pixel ring: on anti-aliased
edges this is sub-pixel exact, and it degrades gently with blur and noise. The shape is the nearest of circle
(fills π/4 ≈ 0.79 of its box), square (1) and triangle (0.5); a generated triangle's apex blurs and its fill creeps
toward a disc's, so the row-profile skewness (an upright triangle is bottom-heavy) is weighed in as well.

Direction under bounces: the caption names the *initial* direction, and an object that hits an edge reverses. A
least-squares fit over the whole clip would average the two legs (and a loop clip, which travels out and back,
would fit to zero), and the median of frame-to-frame signs picks whichever leg is longer. So the velocity is fitted
over the *first leg* only: the frames up to the first turning point, found with hysteresis (the track must retreat
by more than TURN_TOLERANCE_PX from its running extreme) so that centroid jitter is not taken for a bounce. Each
axis gets its own first leg; the axis with the larger fitted speed is the motion axis, and below
STILL_THRESHOLD_PX per frame the object is still. Speed is that first-leg fitted speed, in px/frame.

Extension continues a clip, and the world may bounce just after the cut: there the continuation is judged over the
world's longest leg after the cut (`continuation_directions`), not its first.

The *literal* readings follow the rules word for word, beside the main ones: colour = the nearest of all palette
colours (the main reading leaves out the background's own, which the world never gives an object), shape = the
nearest fill ratio alone (no skewness), direction = the velocity fitted over the whole clip (not its first leg).
The evaluation reports both, so the difference the refinements make is on record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.training.shapes import BACKGROUNDS, COLORS, ShapeSpec

MIN_OBJECT_DISTANCE = 40.0  # RGB distance from the background below which a pixel is never object
STILL_THRESHOLD_PX = 0.2  # px/frame; the slowest moving clip goes 0.5 px/frame at 64×64
TURN_TOLERANCE_PX = 1.0
# Share of its bounding box each shape fills: a disc π/4, a square all of it, an upright triangle half.
FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# |Skewness| of each shape's row profile: symmetric shapes 0, an upright triangle 2√2/5.
SKEWNESS = {"circle": 0.0, "square": 0.0, "triangle": 2 * math.sqrt(2) / 5}
SKEW_WEIGHT = 0.5


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `palette` of the nearest colour for each pixel: (..., 3) -> (...)."""
    colours = np.asarray(list(palette.values()), np.float32)  # (K, 3)
    dist = np.linalg.norm(rgb[..., None, :].astype(np.float32) - colours, axis=-1)  # (..., K)
    return dist.argmin(axis=-1)


def _check_clip(clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a clip of shape (T, H, W, 3), got {clip.shape}")
    return clip


def _border_pixels(clip: np.ndarray) -> np.ndarray:
    """The one-pixel frame border of every frame: (N, 3)."""
    rows = clip[:, [0, -1], :, :].reshape(-1, 3)
    cols = clip[:, 1:-1, [0, -1], :].reshape(-1, 3)
    return np.concatenate([rows, cols])


def background_estimate(clip: np.ndarray) -> tuple[str, np.ndarray]:
    """(palette name, measured RGB) of the background: the palette background most border pixels are nearest to."""
    border = _border_pixels(_check_clip(clip))  # (N, 3)
    votes = _nearest(border, BACKGROUNDS)
    winner = int(np.bincount(votes, minlength=len(BACKGROUNDS)).argmax())
    # Measure the actual background level too, so a slightly off-palette generated background still masks well.
    rgb = np.median(border[votes == winner].astype(np.float32), axis=0)
    return list(BACKGROUNDS)[winner], rgb


def background_color(clip: np.ndarray) -> str:
    """Palette name of the most common border colour."""
    return background_estimate(clip)[0]


def _distance(frames: np.ndarray, bg_rgb) -> np.ndarray:
    """RGB distance of every pixel from the background: (..., H, W, 3) -> (..., H, W)."""
    diff = np.asarray(frames, np.float32) - np.asarray(bg_rgb, np.float32)
    return np.sqrt(np.einsum("...c,...c->...", diff, diff))


def _object_contrast(dist: np.ndarray) -> np.ndarray:
    """Per-frame distance of the object's own colour from the background (95th percentile of the pixels that
    stand out, robust to a few saturated outliers): (..., H, W) -> (...), NaN where nothing stands out."""
    flat = np.sort(dist.reshape(*dist.shape[:-2], -1), axis=-1)  # (..., H·W) ascending
    count = (flat > MIN_OBJECT_DISTANCE).sum(axis=-1)  # (...,) the candidates are the top `count`
    position = flat.shape[-1] - count + 0.95 * np.maximum(count - 1, 0)
    low = np.clip(np.floor(position).astype(np.int64), 0, flat.shape[-1] - 1)
    high = np.clip(low + 1, 0, flat.shape[-1] - 1)
    frac = position - np.floor(position)
    take = lambda index: np.take_along_axis(flat, index[..., None], axis=-1)[..., 0]  # noqa: E731
    contrast = take(low) * (1 - frac) + take(high) * frac
    return np.where(count > 0, contrast, np.nan)


def _cut(contrast: np.ndarray) -> np.ndarray:
    """Mask threshold halfway to the object's colour, never below MIN_OBJECT_DISTANCE; inf where no object."""
    return np.where(np.isnan(contrast), np.inf, np.maximum(MIN_OBJECT_DISTANCE, 0.5 * contrast))


def object_mask(frame: np.ndarray, bg_rgb, thresh: float | None = None) -> np.ndarray:
    """Boolean (H, W) mask of pixels far from the background.

    With `thresh=None` the cut sits halfway between the background and the object's own colour (but never below
    MIN_OBJECT_DISTANCE), so an anti-aliased edge pixel counts as object when at least half covered, whatever the
    contrast of the colour pair.
    """
    dist = _distance(frame, bg_rgb)  # (H, W)
    if thresh is None:
        thresh = float(_cut(_object_contrast(dist)))
    return dist > thresh


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation of (..., H, W) boolean masks."""
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    return np.logical_or.reduce([padded[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def object_coverage(frames: np.ndarray, bg_rgb) -> np.ndarray:
    """Soft coverage in [0, 1] of a frame or clip ((..., H, W, 3) -> (..., H, W)): how far each pixel sits from
    the background toward the object's colour.

    Only the half-covered mask (cleared of isolated specks) and a one-pixel ring around it count, so background
    noise away from the object adds nothing; partial edge pixels give the fill ratio and the centroid sub-pixel
    accuracy.
    """
    dist = _distance(frames, bg_rgb)  # (..., H, W)
    contrast = _object_contrast(dist)[..., None, None]  # (..., 1, 1)
    mask = dist > _cut(contrast)  # (..., H, W)
    # Opening (erode, then dilate) drops isolated noise pixels that would drag the centroid; a second dilation
    # takes back the anti-aliased ring. Frames whose object is too thin to survive erosion keep their mask.
    core = _erode(mask)
    core = np.where(core.any(axis=(-2, -1), keepdims=True), core, mask)
    near = _dilate(_dilate(core))
    with np.errstate(invalid="ignore"):
        coverage = np.clip(dist / contrast, 0.0, 1.0)
    return np.where(near, coverage, 0.0).astype(np.float32)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of (..., H, W) boolean masks; pixels outside the frame count as empty."""
    inner = mask.copy()
    inner[..., 1:, :] &= mask[..., :-1, :]
    inner[..., :-1, :] &= mask[..., 1:, :]
    inner[..., :, 1:] &= mask[..., :, :-1]
    inner[..., :, :-1] &= mask[..., :, 1:]
    inner[..., [0, -1], :] = False
    inner[..., :, [0, -1]] = False
    return inner


def _clip_coverage(clip: np.ndarray, coverage: np.ndarray | None) -> np.ndarray:
    """Coverage of every frame (T, H, W) against the measured background, unless already computed."""
    return object_coverage(clip, background_estimate(clip)[1]) if coverage is None else coverage


def _object_color(clip: np.ndarray, bg_name: str | None, coverage: np.ndarray) -> str | None:
    """The palette colour nearest the object's mean, leaving out `bg_name` (None: every colour is a candidate)."""
    masks = coverage > 0.5  # (T, H, W) the half-covered object
    inner = _erode(masks)
    pick = inner if inner.any() else masks
    if not pick.any():
        return None
    mean = clip[pick].astype(np.float32).mean(axis=0)  # (3,)
    candidates = {name: rgb for name, rgb in COLORS.items() if name != bg_name}
    return list(candidates)[int(_nearest(mean, candidates))]


def object_color(clip: np.ndarray) -> str | None:
    """Palette name nearest the mean object colour; None when no object is found.

    Only interior pixels (the half-covered mask, eroded once) are averaged, so edges blended with the background
    don't pull the mean toward a neighbouring colour; the background's own colour is never returned.
    """
    bg_name, bg_rgb = background_estimate(clip)
    return _object_color(clip, bg_name, object_coverage(clip, bg_rgb))


def fill_ratio(mask: np.ndarray) -> float | np.ndarray:
    """Share of its bounding box a boolean mask or soft coverage fills ((H, W) or a stack (..., H, W)); NaN
    when empty.

    The box sides are taken as the longest column and the longest row of the mask (sums of coverage), which for
    a convex shape are its height and width. Summing makes this sub-pixel exact on anti-aliased edges and keeps
    it steady under blur and noise, where the extent of thresholded pixels would jump by whole pixels.
    """
    weight = np.asarray(mask, np.float64)
    area = weight.sum(axis=(-2, -1))
    box = weight.sum(axis=-2).max(axis=-1) * weight.sum(axis=-1).max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(area > 0, area / box, np.nan)
    return float(ratio) if ratio.ndim == 0 else ratio


def vertical_skewness(mask: np.ndarray) -> float | np.ndarray:
    """Skewness of a mask's row profile (its mass per row), for (H, W) or a stack (..., H, W); NaN when empty.

    An upright triangle puts most of its mass near its base, a skewness of −2√2/5 ≈ −0.57, while a disc or a
    square is symmetric (0). Unlike the fill ratio this survives blur, which rounds a triangle's apex.
    """
    profile = np.asarray(mask, np.float64).sum(axis=-1)  # (..., H)
    total = profile.sum(axis=-1, keepdims=True)
    rows = np.arange(profile.shape[-1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = profile / total
        mean = (weights * rows).sum(axis=-1, keepdims=True)
        var = (weights * (rows - mean) ** 2).sum(axis=-1)
        third = (weights * (rows - mean) ** 3).sum(axis=-1)
        skew = np.where(var > 0, third / var**1.5, 0.0)
    skew = np.where(total[..., 0] > 0, skew, np.nan)
    return float(skew) if skew.ndim == 0 else skew


def shape_features(clip: np.ndarray, coverage: np.ndarray | None = None) -> tuple[float, float]:
    """(fill ratio, |vertical skewness|), medians over the frames that show an object; NaNs when none does."""
    coverage = _clip_coverage(_check_clip(clip), coverage)  # (T, H, W)
    shown = coverage[coverage.any(axis=(1, 2))]
    if len(shown) == 0:
        return float("nan"), float("nan")
    return float(np.median(fill_ratio(shown))), float(np.median(np.abs(vertical_skewness(shown))))


def clip_fill_ratio(clip: np.ndarray, coverage: np.ndarray | None = None) -> float:
    """Median per-frame fill ratio over frames with an object; NaN when none has one."""
    return shape_features(clip, coverage)[0]


def shape_from_features(fill: float, skew: float) -> str | None:
    """Nearest shape by fill ratio (circle ≈ 0.79, square 1, triangle 0.5), with |skewness| weighed at half so a
    blurred triangle, whose fill creeps up toward a disc's, is still told apart; None for NaN."""
    if math.isnan(fill) or math.isnan(skew):
        return None

    def distance(name: str) -> float:
        return math.hypot(FILL_RATIOS[name] - fill, SKEW_WEIGHT * (SKEWNESS[name] - skew))

    return min(FILL_RATIOS, key=distance)


def shape_from_fill(fill: float) -> str | None:
    """Nearest shape by fill ratio alone (the literal rule); None for NaN."""
    if math.isnan(fill):
        return None
    return min(FILL_RATIOS, key=lambda name: abs(FILL_RATIOS[name] - fill))


def object_shape(clip: np.ndarray, coverage: np.ndarray | None = None) -> str | None:
    """Shape read from the clip's fill ratio and vertical skewness; None when no object is found."""
    return shape_from_features(*shape_features(clip, coverage))


def centroid_track(clip: np.ndarray, coverage: np.ndarray | None = None) -> np.ndarray:
    """Coverage-weighted object centroid (x, y) in px per frame: (T, 2), NaN where a frame has no object."""
    weight = _clip_coverage(_check_clip(clip), coverage).astype(np.float64)  # (T, H, W)
    area = weight.sum(axis=(1, 2))  # (T,)
    xs = np.arange(weight.shape[2]) + 0.5  # pixel centres
    ys = np.arange(weight.shape[1]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight.sum(axis=1) * xs).sum(axis=1) / area
        cy = (weight.sum(axis=2) * ys).sum(axis=1) / area
    return np.stack([cx, cy], axis=1)


def first_turn(values: np.ndarray, tolerance: float = TURN_TOLERANCE_PX) -> int:
    """Index where a 1-D track first turns back (retreats > tolerance from its running extreme), else the last."""
    heading, extreme = 0, 0
    for i in range(1, len(values)):
        if heading == 0:
            if abs(values[i] - values[0]) > tolerance:
                heading = 1 if values[i] > values[0] else -1
                extreme = int(np.argmax(heading * values[: i + 1]))
        elif heading * (values[i] - values[extreme]) > 0:
            extreme = i
        elif heading * (values[extreme] - values[i]) > tolerance:
            return extreme
    return len(values) - 1


def _first_leg_velocity(times: np.ndarray, values: np.ndarray, tolerance: float) -> float:
    """Least-squares slope over the first leg (px/frame); the whole track when the leg is too short to fit."""
    end = first_turn(values, tolerance)
    if end < 2:
        end = len(values) - 1
    if end < 1:
        return 0.0
    return float(np.polyfit(times[: end + 1], values[: end + 1], 1)[0])


def fitted_velocity(clip: np.ndarray, coverage: np.ndarray | None = None,
                    tolerance: float = TURN_TOLERANCE_PX, first_leg: bool = True) -> np.ndarray:
    """First-leg (or, with first_leg=False, whole-clip) least-squares centroid velocity (vx, vy) in px/frame; NaN
    when fewer than two frames show the object."""
    track = centroid_track(clip, coverage)  # (T, 2)
    seen = ~np.isnan(track).any(axis=1)
    if seen.sum() < 2:
        return np.full(2, np.nan)
    times = np.nonzero(seen)[0].astype(np.float64)
    if not first_leg:
        return np.array([float(np.polyfit(times, track[seen, axis], 1)[0]) for axis in range(2)])
    return np.array([_first_leg_velocity(times, track[seen, axis], tolerance) for axis in range(2)])


def direction_from_velocity(velocity: np.ndarray, still_threshold_px_per_frame: float = STILL_THRESHOLD_PX) -> str:
    """"left"/"right"/"up"/"down" from the dominant axis and its sign, "still" below the threshold."""
    if np.isnan(velocity).any() or np.abs(velocity).max() < still_threshold_px_per_frame:
        return "still"
    vx, vy = velocity
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def motion_direction(clip: np.ndarray, still_threshold_px_per_frame: float = STILL_THRESHOLD_PX) -> str:
    """Initial motion direction of the object (see the module docstring for bounces)."""
    return direction_from_velocity(fitted_velocity(clip), still_threshold_px_per_frame)


def legs(values: np.ndarray, tolerance: float = TURN_TOLERANCE_PX) -> list[tuple[int, int]]:
    """A 1-D track cut at its turning points (the same hysteresis as `first_turn`): [(start, end), ...] inclusive
    frame indices, consecutive legs sharing their turning frame."""
    cuts, start = [], 0
    while start < len(values) - 1:
        end = start + first_turn(values[start:], tolerance)  # (first_turn returns >= 1 on two or more values)
        cuts.append((start, end))
        start = end
    return cuts or [(0, len(values) - 1)]


def continuation_directions(made: np.ndarray, world: np.ndarray) -> tuple[str, str]:
    """(made, world) directions over the world's longest leg: does a continuation move the way the scene does?

    Both clips start at the cut. The world's track is cut at its bounces and the longest leg is the one judged: there
    the world's direction is its fitted velocity, and the made clip's is the velocity fitted over the same frames
    (whole-segment, both axes). Judging the *first* leg instead reads a bounce a few frames after the cut as the
    whole continuation, and two pixels of jitter then outweigh a leg of four frames."""
    world_coverage = _clip_coverage(world, None)  # (T, H, W), once for the track and the fit
    world_track = centroid_track(world, world_coverage)
    axis = int(np.argmax(np.ptp(world_track, axis=0)))
    start, end = max(legs(world_track[:, axis]), key=lambda leg: leg[1] - leg[0])
    frames = slice(start, end + 1)
    return (direction_from_velocity(fitted_velocity(made[frames], first_leg=False)),
            direction_from_velocity(fitted_velocity(world[frames], world_coverage[frames], first_leg=False)))


def object_speed(clip: np.ndarray) -> float:
    """Speed in px/frame along the motion axis over the first leg; NaN without an object."""
    velocity = fitted_velocity(clip)
    return float(np.abs(velocity).max()) if not np.isnan(velocity).any() else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two same-shaped images or clips; inf when identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


@dataclass
class JudgeReport:
    """What the judge read from a clip and, given the spec it should follow, whether each reading is right."""

    background: str
    color: str | None
    shape: str | None
    direction: str
    speed: float  # px/frame along the motion axis
    fill_ratio: float
    skewness: float  # |skewness| of the row profile
    velocity: tuple[float, float]
    color_literal: str | None = None  # the rules read word for word (see the module docstring)
    shape_literal: str | None = None
    direction_literal: str | None = None
    background_correct: bool | None = None
    color_correct: bool | None = None
    shape_correct: bool | None = None
    direction_correct: bool | None = None
    color_literal_correct: bool | None = None
    shape_literal_correct: bool | None = None
    direction_literal_correct: bool | None = None

    @property
    def all_correct(self) -> bool | None:
        """All four readings match the expected spec (None when there was none)."""
        flags = (self.background_correct, self.color_correct, self.shape_correct, self.direction_correct)
        return None if None in flags else all(flags)


def judge_clip(clip: np.ndarray, expected: ShapeSpec | None = None,
               still_threshold_px_per_frame: float = STILL_THRESHOLD_PX) -> dict:
    """Read background, colour, shape, direction and speed from a clip and compare them with `expected`."""
    clip = _check_clip(clip)
    bg_name, bg_rgb = background_estimate(clip)
    coverage = object_coverage(clip, bg_rgb)  # (T, H, W)
    velocity = fitted_velocity(clip, coverage)
    fill, skew = shape_features(clip, coverage)
    report = JudgeReport(
        background=bg_name,
        color=_object_color(clip, bg_name, coverage),
        shape=shape_from_features(fill, skew),
        direction=direction_from_velocity(velocity, still_threshold_px_per_frame),
        speed=float(np.abs(velocity).max()) if not np.isnan(velocity).any() else float("nan"),
        fill_ratio=fill,
        skewness=skew,
        velocity=(float(velocity[0]), float(velocity[1])),
        color_literal=_object_color(clip, None, coverage),
        shape_literal=shape_from_fill(fill),
        direction_literal=direction_from_velocity(fitted_velocity(clip, coverage, first_leg=False),
                                                  still_threshold_px_per_frame),
    )
    if expected is not None:
        report.background_correct = report.background == expected.background
        report.color_correct = report.color == expected.color
        report.shape_correct = report.shape == expected.shape
        report.direction_correct = report.direction == expected.direction
        report.color_literal_correct = report.color_literal == expected.color
        report.shape_literal_correct = report.shape_literal == expected.shape
        report.direction_literal_correct = report.direction_literal == expected.direction
    return {**asdict(report), "all_correct": report.all_correct}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's coefficient needs."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def speed_score_correlation(speeds, scores) -> dict[str, float]:
    """Pearson and Spearman correlation between measured speeds and motion scores (NaN speeds dropped)."""
    speeds, scores = np.asarray(speeds, np.float64), np.asarray(scores, np.float64)
    if speeds.shape != scores.shape:
        raise ValueError(f"speeds and scores differ in length: {speeds.shape} vs {scores.shape}")
    keep = ~np.isnan(speeds)
    speeds, scores = speeds[keep], scores[keep]
    if len(speeds) < 2 or speeds.std() == 0 or scores.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": int(len(speeds))}
    pearson = float(np.corrcoef(speeds, scores)[0, 1])
    spearman = float(np.corrcoef(_ranks(speeds), _ranks(scores))[0, 1])
    return {"pearson": pearson, "spearman": spearman, "n": int(len(speeds))}
