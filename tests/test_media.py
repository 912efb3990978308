"""Media I/O: round trips, every kind of bad upload, resize-to-fill and atomic writes."""

import struct
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import media
from pipelines.media import (
    MediaError,
    probe_video,
    read_image,
    read_video,
    resize_crop,
    to_uint8_frames,
    write_png,
    write_video,
)


def make_frames(t=6, h=32, w=48) -> torch.Tensor:
    """A (3, T, H, W) clip in [-1, 1] with a bright bar that moves, so frames differ."""
    frames = torch.full((3, t, h, w), -1.0)
    for i in range(t):
        frames[:, i, :, i * 4 : i * 4 + 8] = 1.0
    return frames


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- round trips --------------------------------------------------------------------------------------------------


def test_video_round_trip_keeps_count_size_fps_and_is_browser_h264(tmp_path):
    path = write_video(make_frames(), tmp_path / "clip.mp4", fps=24, metadata={"comment": "seed=3"})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert container.metadata["comment"] == "seed=3"
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat"), "faststart puts the index before the media data"
    frames, fps = read_video(path)
    assert frames.shape == (3, 6, 32, 48)
    assert fps == pytest.approx(24.0)
    assert frames.min() >= -1.0 and frames.max() <= 1.0
    assert (frames - make_frames()).abs().mean() < 0.05  # crf 18 is close to lossless on flat colours
    assert probe_video(path) == media.VideoInfo(frames=6, fps=24.0, width=48, height=32)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_read_video_resizes_each_frame_as_it_decodes(tmp_path):
    path = write_video(make_frames(t=5), tmp_path / "clip.mp4", fps=24)
    whole, _ = read_video(path)
    small, fps = read_video(path, size=(16, 16))
    assert small.shape == (3, 5, 16, 16) and fps == pytest.approx(24.0)
    # the same pixels as resizing the decoded clip, up to the uint8 rounding of each resized frame
    assert (small - media.resize_crop(whole, 16, 16)).abs().max() <= 1 / 127.5 + 1e-6


def test_read_video_max_frames_takes_head_or_tail(tmp_path):
    frames = make_frames(t=8)
    path = write_video(frames, tmp_path / "clip.mp4", fps=12)
    head, _ = read_video(path, max_frames=3)
    tail, _ = read_video(path, max_frames=3, last=True)
    assert head.shape[1] == tail.shape[1] == 3
    bar_column = lambda clip, i: clip[0, i, 16].argmax().item()  # noqa: E731
    assert bar_column(head, 0) == 0 and bar_column(tail, 2) == 7 * 4
    with pytest.raises(ValueError):
        read_video(path, max_frames=0)


def test_write_video_accepts_uint8_and_refuses_odd_sizes(tmp_path):
    pixels = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    write_video(pixels, tmp_path / "u8.mp4", fps=8)
    assert read_video(tmp_path / "u8.mp4")[0].shape == (3, 2, 16, 16)
    with pytest.raises(ValueError, match="even"):
        write_video(make_frames(h=31), tmp_path / "odd.mp4", fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_video(make_frames(), tmp_path / "bad.mp4", fps=0)
    with pytest.raises(ValueError, match="NaN"):
        write_video(torch.full((3, 2, 16, 16), float("nan")), tmp_path / "nan.mp4", fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u8.mp4"]


def test_png_round_trip(tmp_path):
    frame = make_frames(t=1)[:, 0]  # (3, H, W)
    path = write_png(frame, tmp_path / "still.png", metadata={"Comment": "hi"})
    image = read_image(path)
    assert image.shape == (3, 32, 48)
    assert torch.equal(image, frame)  # PNG is lossless and -1/1 map exactly to 0/255
    assert Image.open(path).text["Comment"] == "hi"


def test_read_image_accepts_arrays_and_composites_alpha_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half transparent
    image = read_image(rgba)
    assert image.shape == (3, 4, 4)
    assert image[0, 0, 0] == 1.0 and image[0, 3, 0] == -1.0
    grey = read_image(np.full((3, 5), 255, dtype=np.uint8))
    assert grey.shape == (3, 3, 5) and bool((grey == 1.0).all())
    assert read_image(Image.new("RGB", (6, 4))).shape == (3, 4, 6)
    with pytest.raises(MediaError, match="uint8"):
        read_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(MediaError, match="shape"):
        read_image(np.zeros((4, 4, 2), dtype=np.uint8))


# ---- bad images ---------------------------------------------------------------------------------------------------


def test_read_image_refuses_missing_empty_and_non_images(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="empty"):
        read_image(write_bytes(tmp_path / "empty.png", b""))
    with pytest.raises(MediaError, match="not a readable image"):
        read_image(write_bytes(tmp_path / "text.png", b"hello, I am text\n" * 20))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_read_image_refuses_truncated_files(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(noise).save(full, format=fmt)
    data = full.read_bytes()
    cut = write_bytes(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert read_image(full).shape == (3, 64, 64)
    with pytest.raises(MediaError, match="truncated"):
        read_image(cut)


def test_read_image_refuses_decompression_bomb_header_fast(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    bomb = write_bytes(tmp_path / "bomb.png", data)
    start = time.perf_counter()
    with pytest.raises(MediaError, match="too large|limit"):
        read_image(bomb)
    assert time.perf_counter() - start < 1.0


def test_read_image_refuses_header_above_our_limit_but_below_pillows(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)  # 81 MP: Pillow would only warn
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    with pytest.raises(MediaError, match="64 MP"):
        read_image(write_bytes(tmp_path / "big.png", data))


def test_read_image_refuses_one_pixel_images(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(MediaError, match="too small"):
        read_image(tmp_path / "dot.png")
    with pytest.raises(MediaError, match="too small"):
        read_image(np.zeros((1, 8, 3), dtype=np.uint8))


# ---- bad videos ---------------------------------------------------------------------------------------------------


def test_read_video_refuses_missing_empty_and_non_videos(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="empty"):
        read_video(write_bytes(tmp_path / "empty.mp4", b""))
    with pytest.raises(MediaError, match="not a readable video"):
        read_video(write_bytes(tmp_path / "text.mp4", b"not a video at all\n" * 50))
    with pytest.raises(MediaError, match="not a readable video"):
        probe_video(write_bytes(tmp_path / "text2.mp4", b"nope" * 100))


def test_read_video_refuses_truncated_file_without_frames(tmp_path):
    path = write_video(make_frames(t=12), tmp_path / "clip.mp4", fps=24)
    data = path.read_bytes()
    header_only = write_bytes(tmp_path / "header.mp4", data[: data.find(b"mdat") + 8])
    with pytest.raises(MediaError):
        read_video(header_only)
    tail_cut = write_bytes(tmp_path / "no_index.mp4", data[data.find(b"mdat") - 4 :])  # index gone
    with pytest.raises(MediaError):
        read_video(tail_cut)


def test_read_video_keeps_decodable_frames_of_a_half_file(tmp_path):
    noise = torch.rand(3, 30, 32, 32) * 2 - 1  # noise so the frames are big and spread through the file
    data = write_video(noise, tmp_path / "clip.mp4", fps=24).read_bytes()
    half = write_bytes(tmp_path / "half.mp4", data[: len(data) // 2])
    frames, _ = read_video(half)
    assert 0 < frames.shape[1] < 30


def test_one_frame_video_reads_back(tmp_path):
    path = write_video(make_frames(t=1), tmp_path / "one.mp4", fps=24)
    frames, fps = read_video(path)
    assert frames.shape == (3, 1, 32, 48) and fps == pytest.approx(24.0)
    assert probe_video(path).frames == 1


def test_variable_frame_rate_uses_the_average_rate(tmp_path, caplog):
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 10, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 50 * i + (30 if i % 2 else 0), Fraction(1, 1000)  # uneven gaps
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with caplog.at_level("INFO", logger="pipelines.media"):
        frames, fps = read_video(path)
    assert frames.shape[1] == 20
    assert 15 < fps < 25
    assert "variable frame rate" in caplog.text


def test_probe_counts_frames_when_the_container_does_not(tmp_path):
    path = tmp_path / "clip.webm"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(7):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 30, np.uint8), "rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # WebM keeps no frame count
    assert probe_video(path) == media.VideoInfo(frames=7, fps=12.0, width=16, height=16)


def test_read_video_applies_display_rotation(tmp_path):
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    frames, _ = read_video(path)
    assert frames.shape == (3, 2, 32, 16)
    assert (probe_video(path).width, probe_video(path).height) == (16, 32)
    from studio.media_info import video_fps, video_size

    assert video_size(path) == (32, 16)  # the studio picks the aspect ratio from the upright size too
    assert video_fps(path) == pytest.approx(8.0)  # ... and Extend's FPS from the clip's own rate


def test_studio_reads_a_phone_photos_upright_size(tmp_path):
    from PIL import Image

    from studio.media_info import image_size

    sideways = Image.new("RGB", (40, 30))
    exif = sideways.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    sideways.save(tmp_path / "phone.jpg", exif=exif)
    Image.new("RGB", (40, 30)).save(tmp_path / "plain.jpg")
    assert image_size(tmp_path / "phone.jpg") == (40, 30) == tuple(media.read_image(tmp_path / "phone.jpg").shape[1:])
    assert image_size(tmp_path / "plain.jpg") == (30, 40)


# ---- resize_crop and conversions ------------------------------------------------------------------------------------


def test_resize_crop_fills_then_centre_crops():
    wide = torch.zeros(3, 40, 80)
    wide[:, :, 30:50] = 1.0  # a centred stripe survives the crop
    out = resize_crop(wide, 32, 32)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 16].min() > 0.9 and out[:, :, 0].abs().max() < 0.1

    video = torch.rand(3, 5, 90, 60) * 2 - 1
    assert resize_crop(video, 48, 64).shape == (3, 5, 48, 64)
    assert resize_crop(video, 90, 60).equal(video)  # already the target: untouched
    shrunk = resize_crop(torch.ones(3, 2, 400, 600), 16, 16)
    assert torch.allclose(shrunk, torch.ones_like(shrunk))
    with pytest.raises(ValueError):
        resize_crop(video, 0, 16)
    with pytest.raises(ValueError):
        resize_crop(torch.zeros(3, 8, 8, dtype=torch.uint8), 4, 4)


def test_to_uint8_frames_maps_range_and_layout():
    frames = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).expand(3, 4, 2, 2)
    pixels = to_uint8_frames(frames)
    assert pixels.shape == (4, 2, 2, 3) and pixels.dtype == np.uint8
    assert pixels[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


# ---- atomic writes ------------------------------------------------------------------------------------------------


def test_write_video_leaves_nothing_when_the_encoder_fails(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = media._frame_from_array

    def failing(array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("encoder exploded")
        return real(array)

    monkeypatch.setattr(media, "_frame_from_array", failing)
    with pytest.raises(RuntimeError, match="exploded"):
        write_video(make_frames(), tmp_path / "clip.mp4", fps=24)
    assert list(tmp_path.iterdir()) == []


def test_write_png_leaves_nothing_when_replace_fails(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(media.os, "replace", refuse)
    with pytest.raises(OSError):
        write_png(make_frames(t=1), tmp_path / "still.png")
    assert list(tmp_path.iterdir()) == []


def test_from_uint8_frames_inverts_to_uint8_frames():
    from pipelines.media import from_uint8_frames, to_uint8_frames

    clip = np.random.default_rng(0).integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)  # (T, H, W, 3)
    unit = from_uint8_frames(clip)
    assert unit.shape == (3, 5, 8, 6) and unit.dtype == torch.float32
    assert float(unit.min()) >= -1.0 and float(unit.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8_frames(unit), clip)
