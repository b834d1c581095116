"""Video decoding with PyAV on real MP4 clips written by PyAV in the test."""

import pytest
from PIL import Image

from nvila.core.data.video import VideoDecodeError, VideoSampling, decode_video, encode_video, uniform_indices


def clip(n: int, size=(32, 24)) -> list[Image.Image]:
    """Frame i is a flat grey of level 8*i, so a decoded frame tells which source frame it was."""
    return [Image.new("RGB", size, (8 * i, 8 * i, 8 * i)) for i in range(n)]


def levels(frames: list[Image.Image]) -> list[int]:
    """The source index of each decoded frame (lossy coding moves the grey level by a little)."""
    return [round(sum(f.convert("L").getdata()) / (f.width * f.height) / 8) for f in frames]


@pytest.fixture(scope="module")
def mp4_30():
    return encode_video(clip(30), fps=10)


def test_uniform_indices_are_segment_centres_and_repeat_for_short_clips():
    assert uniform_indices(30, 3) == [5, 15, 25]
    assert uniform_indices(10, 10) == list(range(10))
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert uniform_indices(5, 1) == [2]
    assert uniform_indices(0, 4) == []


@pytest.mark.parametrize("n", [1, 8, 30])
def test_n_frames_are_sampled_uniformly_in_order(mp4_30, n):
    frames = decode_video(mp4_30, VideoSampling(num_frames=n))
    assert len(frames) == n and all(f.mode == "RGB" and f.size == (32, 24) for f in frames)
    assert levels(frames) == uniform_indices(30, n)


def test_more_frames_than_the_clip_has_repeat_or_return_what_there_is(mp4_30):
    frames = decode_video(mp4_30, VideoSampling(num_frames=256))
    assert len(frames) == 256
    got = levels(frames)
    assert got == sorted(got) and set(got) == set(range(30))
    assert levels(decode_video(mp4_30, VideoSampling(num_frames=256, repeat_short=False))) == list(range(30))


def test_sampling_by_fps_with_a_cap(mp4_30):
    # 30 frames at 10 fps = 3 s: 2 fps gives 6 frames, 20 fps is capped by the clip, max_frames caps too
    assert levels(decode_video(mp4_30, VideoSampling(num_frames=None, fps=2))) == uniform_indices(30, 6)
    assert len(decode_video(mp4_30, VideoSampling(num_frames=None, fps=20, repeat_short=False))) == 30
    assert len(decode_video(mp4_30, VideoSampling(num_frames=None, fps=20, max_frames=4))) == 4


def test_a_clip_on_disk_with_the_index_first_decodes_from_a_path(tmp_path):
    path = tmp_path / "a.mp4"
    encode_video(clip(12), fps=4, path=path)
    assert levels(decode_video(path, VideoSampling(num_frames=4))) == uniform_indices(12, 4)


def test_truncated_clips_raise_whether_the_index_comes_first_or_last(tmp_path, mp4_30):
    with pytest.raises(VideoDecodeError):
        decode_video(mp4_30[: len(mp4_30) // 2], VideoSampling(num_frames=8))  # index at the end: cut off
    streamable = encode_video(clip(30), fps=10, path=tmp_path / "s.mp4")
    with pytest.raises(VideoDecodeError, match="truncated|Invalid|no frame"):
        decode_video(streamable[: len(streamable) * 2 // 3], VideoSampling(num_frames=8))


def test_garbage_is_not_a_video():
    with pytest.raises(VideoDecodeError):
        decode_video(b"\x00\x01not a video at all" * 10)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="num_frames or fps"):
        VideoSampling(num_frames=None)
    with pytest.raises(ValueError):
        VideoSampling(num_frames=0)


def test_a_clip_with_frames_over_the_pixel_limit_is_refused_before_decoding(mp4_30):
    with pytest.raises(VideoDecodeError, match=r"frames of 32x24 = 768 pixels, more than the limit of 700"):
        decode_video(mp4_30, VideoSampling(num_frames=4), max_pixels=700)
    assert len(decode_video(mp4_30, VideoSampling(num_frames=4), max_pixels=768)) == 4
