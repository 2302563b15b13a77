"""video.py: probing, sampling, decoding, rotation, timestamps, errors and the decord sandbox.

Videos are written here with PyAV (``testing.write_video``: each frame carries its number in
a band of pixels and a red marker at its bottom-left corner), plus the real clips of
``../shared/videos`` as their README describes them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from freevllm_tools import video
from freevllm_tools.config import sample_frame_indices
from freevllm_tools.errors import InputError, VideoError
from freevllm_tools.testing import read_frame_number, synthetic_frame, write_video
from freevllm_tools.video import (
    Frames,
    VideoInfo,
    decode_runs,
    display_rotation,
    frames_to_decode,
    probe,
    read_frames,
    rotate_upright,
)

HAS_DECORD = importlib.util.find_spec("decord") is not None
requires_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed here")
BACKENDS = ["pyav", pytest.param("decord", marks=requires_decord)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def clip(media):
    """30 frames, 64x48, 30000/1001 fps, H.264 in MP4."""
    return write_video(media / "clip.mp4", num_frames=30)


@pytest.fixture(scope="module")
def long_gop_clip(media):
    """120 frames with a keyframe every 10: sparse sampling makes the reader seek."""
    return write_video(media / "gop.mp4", num_frames=120, keyframe_interval=10)


@pytest.fixture(scope="module")
def rotated_clips(media):
    return {r: write_video(media / f"rot{r}.mp4", num_frames=6, rotation=r) for r in (90, 180, 270)}


def numbers(frames: Frames) -> list[int]:
    """The frame numbers drawn into the returned pictures."""
    return [read_frame_number(image) for image in frames.images]


def is_red(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 150 and g < 90 and b < 90


# -- pure helpers ------------------------------------------------------------------------


def test_index_rule_is_the_segment_middle_rule():
    # seg = 119/8 = 14.875: (0+15)//2, (15+30)//2, (30+45)//2, (45+60)//2, ...
    assert sample_frame_indices(120, 8) == [7, 22, 37, 52, 67, 81, 96, 111]
    assert sample_frame_indices(5, 50) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("angle", "rotation"),
    [(0, 0), (-90, 90), (90, 270), (180, 180), (-180, 180), (-89.6, 90), (-270, 270)],
)
def test_display_rotation_is_clockwise_turn(angle, rotation):
    assert display_rotation(angle) == rotation


def test_rotate_upright_turns_clockwise():
    stored = np.arange(6).reshape(2, 3, 1)  # [[0 1 2], [3 4 5]]
    assert rotate_upright(stored, 90)[..., 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert rotate_upright(stored, 180)[..., 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    assert rotate_upright(stored, 270)[..., 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert rotate_upright(stored, 0).tolist() == stored.tolist()


def test_decode_runs_seek_only_where_it_skips_frames():
    runs = decode_runs([5, 7, 25, 27, 90], [0, 10, 20, 30], min_skip=1)
    assert runs == [(0, [5, 7]), (20, [25, 27]), (30, [90])]
    assert frames_to_decode(runs) == 8 + 8 + 61
    # a seek that would skip fewer than min_skip frames is not worth it
    assert decode_runs([5, 7, 25, 27, 90], [0, 10, 20, 30], min_skip=16) == [(0, [5, 7, 25, 27, 90])]
    assert decode_runs([5, 7, 25, 27, 90], [0, 10, 20, 30, 80], min_skip=16) == [
        (0, [5, 7, 25, 27]),
        (80, [90]),
    ]
    assert decode_runs([3, 12, 14], [0, 10], min_skip=1) == [(0, [3]), (10, [12, 14])]
    assert decode_runs([8, 12], [0, 10], min_skip=1) == [(0, [8]), (10, [12])]
    assert decode_runs([8, 12], [0, 10], min_skip=2) == [(0, [8, 12])]
    assert decode_runs([40], [0, 30], min_skip=16) == [(30, [40])]  # seek at the start too
    assert decode_runs([3, 4], []) == [(0, [3, 4])]


# -- the test writer ---------------------------------------------------------------------


def test_write_video_carries_frame_numbers_and_rotation(rotated_clips):
    with av.open(str(rotated_clips[90])) as container:
        stored = [f for f in container.decode(video=0)]
    # stored turned the other way: 48 wide, 64 tall, with a -90 (counter-clockwise) matrix
    assert (stored[0].width, stored[0].height) == (48, 64)
    assert stored[0].rotation == -90
    upright = np.rot90(stored[3].to_ndarray(format="rgb24"), -1)
    assert read_frame_number(upright) == 3
    assert read_frame_number(synthetic_frame(517)) == 517


# -- probing -----------------------------------------------------------------------------


def test_probe_written_clip(clip, tmp_path):
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    info = probe(link)
    assert isinstance(info, VideoInfo)
    assert info.path == os.path.realpath(clip)
    assert info.num_frames == 30
    assert info.fps == Fraction(30000, 1001)
    assert info.duration == pytest.approx(30 * 1001 / 30000, abs=1e-9)
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert info.codec == "h264"
    assert info.size_bytes == os.path.getsize(clip)
    assert info.backend == "pyav"  # the default backend


# -- reading -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_every_frame_in_order(clip, backend):
    frames = read_frames(clip, 30, backend=backend)
    assert frames.images.shape == (30, 48, 64, 3) and frames.images.dtype == np.uint8
    assert frames.indices.tolist() == list(range(30)) and frames.indices.dtype == np.int64
    assert numbers(frames) == list(range(30))
    assert frames.info.backend == backend
    assert frames.partial is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestamps_are_the_containers_without_drift(clip, backend):
    frames = read_frames(clip, 30, backend=backend)
    expected = [float(Fraction(i * 1001, 30000)) for i in range(30)]
    assert frames.timestamps.dtype == np.float64
    assert frames.timestamps.tolist() == expected  # exact, not approximately
    assert np.all(np.diff(frames.timestamps) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_indices_follow_the_rule_and_match_the_pictures(long_gop_clip, backend):
    frames = read_frames(long_gop_clip, 8, backend=backend)
    assert frames.indices.tolist() == [7, 22, 37, 52, 67, 81, 96, 111]
    assert numbers(frames) == frames.indices.tolist()
    assert frames.timestamps.tolist() == [float(Fraction(i * 1001, 30000)) for i in frames.indices]


def test_pyav_seeks_past_keyframes_and_still_finds_the_right_frames(long_gop_clip):
    index = video._probe(long_gop_clip)
    targets = sample_frame_indices(120, 4)
    assert targets == [15, 45, 74, 104]
    assert len(decode_runs(targets, index.keyframes)) > 1  # the seeking path is exercised
    frames = read_frames(long_gop_clip, 4, backend="pyav")
    assert frames.indices.tolist() == targets
    assert numbers(frames) == targets


def test_pyav_falls_back_to_sequential_when_a_seek_loses_track(long_gop_clip, monkeypatch):
    real = video._frame_number
    seen = {"seek": 0}

    def lost_after_seek(frame, index, position, seek):
        if seek:
            seen["seek"] += 1
            raise video._LostTrack
        return real(frame, index, position, seek)

    monkeypatch.setattr(video, "_frame_number", lost_after_seek)
    frames = read_frames(long_gop_clip, 4, backend="pyav")
    assert seen["seek"] >= 1
    assert numbers(frames) == frames.indices.tolist() == [15, 45, 74, 104]


def test_pyav_notices_a_seek_that_lands_past_its_frame(long_gop_clip, monkeypatch):
    real = video._seek

    def overshoot(container, stream, pts):  # a container whose seeks land 20 frames late
        real(container, stream, pts + 20 * 1001)

    monkeypatch.setattr(video, "_seek", overshoot)
    frames = read_frames(long_gop_clip, 4, backend="pyav")
    assert numbers(frames) == frames.indices.tolist() == [15, 45, 74, 104]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_frames_than_asked(media, backend):
    path = write_video(media / "short.mp4", num_frames=12)
    frames = read_frames(path, 50, backend=backend)
    assert frames.indices.tolist() == list(range(12))
    assert numbers(frames) == list(range(12))
    assert frames.partial is False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_video_comes_out_upright(rotated_clips, rotation, backend):
    frames = read_frames(rotated_clips[rotation], 6, backend=backend)
    assert frames.info.rotation == rotation
    assert (frames.info.width, frames.info.height) == (64, 48)
    assert frames.images.shape == (6, 48, 64, 3)
    assert numbers(frames) == list(range(6))  # the number band reads left to right at the top
    first = frames.images[0]
    assert is_red(first[46, 2])  # the marker sits bottom-left, as written
    assert not any(is_red(first[y, x]) for y, x in [(1, 1), (1, 62), (46, 61)])


def test_mpeg4_in_avi(media):
    path = write_video(media / "clip.avi", num_frames=10, codec="mpeg4", fps=25)
    frames = read_frames(path, 10)
    assert frames.info.codec == "mpeg4" and frames.info.fps == 25
    assert numbers(frames) == list(range(10))
    assert frames.timestamps.tolist() == [i / 25 for i in range(10)]


# -- broken streams ----------------------------------------------------------------------


def test_decoding_that_breaks_part_way_gives_the_frames_before(clip, monkeypatch):
    real = video._decoded_frames

    def breaks_after_five(container, stream):
        for count, frame in enumerate(real(container, stream)):
            if count == 5:
                raise av.error.InvalidDataError(1094995529, "Invalid data found")
            yield frame

    monkeypatch.setattr(video, "_decoded_frames", breaks_after_five)
    frames = read_frames(clip, 30, backend="pyav")
    assert frames.partial is True
    assert frames.indices.tolist() == [0, 1, 2, 3, 4]
    assert numbers(frames) == [0, 1, 2, 3, 4]
    assert frames.images.shape == (5, 48, 64, 3)


def test_nothing_decodable_is_a_video_error(clip, monkeypatch):
    def breaks_at_once(container, stream):
        raise av.error.InvalidDataError(1094995529, "Invalid data found")
        yield  # pragma: no cover

    monkeypatch.setattr(video, "_decoded_frames", breaks_at_once)
    with pytest.raises(VideoError, match=r"clip\.mp4.*none of the sampled frames decodes.*Invalid data"):
        read_frames(clip, 30, backend="pyav")


# -- errors ------------------------------------------------------------------------------


def _audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _no_frames(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()


@pytest.mark.parametrize(
    ("name", "make", "cause"),
    [
        ("missing.mp4", None, "no such file"),
        ("folder.mp4", lambda p: p.mkdir(), "is a directory"),
        ("notes.mp4", lambda p: p.write_text("not a video\n" * 50), "not a video FFmpeg can read"),
        ("zero.mp4", lambda p: p.write_bytes(b""), "empty \\(0 bytes\\)"),
        (
            "noise.mp4",
            lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, np.uint8).tobytes()),
            "not a video FFmpeg can read",
        ),
        ("speech.m4a", _audio_only, "no video stream \\(streams: audio\\)"),
        ("blank.avi", _no_frames, "holds no frames"),
    ],
)
@pytest.mark.parametrize("call", [probe, read_frames])
def test_bad_files_raise_video_error_naming_file_and_cause(tmp_path, name, make, cause, call):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(VideoError, match=re.escape(name) + ".*" + cause) as caught:
        call(path)
    assert str(caught.value).count(";") >= 1  # a cause and a fix


def test_bad_arguments(clip):
    with pytest.raises(InputError, match="num_frames"):
        read_frames(clip, 0)
    with pytest.raises(InputError, match="backend"):
        read_frames(clip, 4, backend="opencv")
    with pytest.raises(InputError, match="path"):
        probe(None)
    assert read_frames(clip, np.int64(2), backend="pyav").indices.tolist() == [7, 21]


# -- the decord sandbox ------------------------------------------------------------------


@pytest.fixture
def fake_decord(monkeypatch):
    """Swap the decord child's program; decord itself need not be installed."""
    monkeypatch.setattr(video, "_decord_available", lambda: True)

    def install(source: str) -> None:
        monkeypatch.setattr(video, "_DECORD_WORKER", source)

    return install


CRASH = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
HANG = "import time\ntime.sleep(60)\n"
GARBAGE = "import sys\nsys.stdout.write('not json\\n')\n"
WRONG_SHAPE = (
    "import json, sys\nsys.stdout.write(json.dumps({'shape': [10, 10, 3], 'timestamps': []}) + '\\n')\n"
)


@pytest.mark.parametrize("worker", [CRASH, GARBAGE, WRONG_SHAPE], ids=["crash", "garbage", "shape"])
def test_decord_failure_falls_back_to_pyav(clip, fake_decord, worker):
    fake_decord(worker)
    frames = read_frames(clip, 5, backend="auto")
    assert frames.info.backend == "pyav"
    assert numbers(frames) == frames.indices.tolist() == [3, 9, 14, 20, 26]


def test_decord_crash_with_explicit_backend_is_a_video_error(clip, fake_decord):
    fake_decord(CRASH)
    with pytest.raises(VideoError, match=r"clip\.mp4.*decord.*signal 11.*backend='pyav'"):
        read_frames(clip, 5, backend="decord")


def test_hanging_decord_is_killed_at_its_time_out(clip, fake_decord, monkeypatch):
    fake_decord(HANG)
    monkeypatch.setattr(video, "DECORD_TIMEOUT_BASE_S", 0.5)
    monkeypatch.setattr(video, "DECORD_SECONDS_PER_MEGAPIXEL", 0.0)
    started = time.monotonic()
    frames = read_frames(clip, 5, backend="auto")
    assert time.monotonic() - started < 20  # not the worker's 60 s
    assert frames.info.backend == "pyav" and numbers(frames) == [3, 9, 14, 20, 26]


def test_without_decord_pyav_serves_everything(clip, monkeypatch):
    monkeypatch.setattr(video, "_decord_available", lambda: False)
    assert probe(clip).backend == "pyav"
    assert read_frames(clip, 3, backend="auto").info.backend == "pyav"
    with pytest.raises(VideoError, match="decord is not installed.*backend='pyav'"):
        read_frames(clip, 3, backend="decord")


# -- the shared real videos (../shared/videos/README.md) ---------------------------------


def test_shared_pancake_mkv(shared_videos):
    path = shared_videos / "flipping_a_pancake.mkv"
    info = probe(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (310, 30, 426, 240)
    frames = read_frames(path, 310)
    assert frames.indices.tolist() == list(range(310)) and not frames.partial
    # the container's millisecond timestamps (0, 33, 67, 100, ...), not i/30
    milliseconds = frames.timestamps * 1000
    assert np.allclose(milliseconds, np.round(milliseconds), atol=1e-9)
    assert frames.timestamps[:4].tolist() == [0.0, 0.033, 0.067, 0.1]
    assert frames.timestamps[-1] == pytest.approx(10.3, abs=1e-12)
    assert np.all(np.diff(frames.timestamps) > 0)
    assert np.max(np.abs(frames.timestamps - np.arange(310) / 30)) < 0.001


def test_shared_sample_demo_fractional_rate_without_drift(shared_videos):
    path = shared_videos / "sample_demo_3.mp4"
    info = probe(path)
    assert info.fps == Fraction(24000, 1001)
    assert (info.num_frames, info.width, info.height, info.codec) == (146, 640, 360, "h264")
    assert info.duration == pytest.approx(146 * 1001 / 24000, abs=1e-9)  # about 6.09 s
    frames = read_frames(path, 50)
    assert frames.indices.tolist() == sample_frame_indices(146, 50)
    assert frames.timestamps.tolist() == [float(Fraction(int(i) * 1001, 24000)) for i in frames.indices]
    assert frames.timestamps[-1] == 143 * 1001 / 24000


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_video_90_comes_out_upright(shared_videos, backend):
    path = shared_videos / "video_90.mov"
    info = probe(path)
    assert (info.num_frames, info.rotation, info.width, info.height) == (3, 90, 320, 568)
    frames = read_frames(path, backend=backend)
    assert frames.images.shape == (3, 568, 320, 3)
    with av.open(str(path)) as container:
        first = next(container.decode(video=0))
        stored = first.to_ndarray(format="rgb24")
    assert first.rotation == -90 and stored.shape == (320, 568, 3)
    # Upright is the stored picture turned 90 degrees clockwise (checked by eye: the keyboard's
    # key legends read upright); turned the other way it would be upside down.
    assert np.array_equal(frames.images[0], np.rot90(stored, -1))
    assert not np.array_equal(frames.images[0], np.rot90(stored, 1))


@requires_decord
def test_shared_video_90_agrees_with_decords_own_rotation(shared_videos):
    path = shared_videos / "video_90.mov"
    ours = read_frames(path, backend="pyav")
    theirs = read_frames(path, backend="decord")  # decord rotates by itself
    assert np.array_equal(ours.images, theirs.images)


def test_shared_no_duration_webm_served_by_pyav(shared_videos):
    path = shared_videos / "no_duration.webm"
    info = probe(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (74, Fraction(15000, 1001), 1280, 720)
    assert info.backend == "pyav"
    frames = read_frames(path, 74)
    assert frames.indices.tolist() == list(range(74)) and not frames.partial
    assert frames.info.backend == "pyav"
    assert np.all(np.diff(frames.timestamps) > 0)


@requires_decord
def test_shared_no_duration_webm_is_refused_by_decord(shared_videos):
    with pytest.raises(VideoError, match="no_duration.webm.*duration"):
        read_frames(shared_videos / "no_duration.webm", 4, backend="decord")


def test_shared_corrupted_mp4_gives_a_clear_error_or_the_frames_that_decode(shared_videos):
    path = shared_videos / "corrupted.mp4"
    try:
        frames = read_frames(path, 50)
    except VideoError as exc:
        assert "corrupted.mp4" in str(exc)
        return
    assert frames.partial is True
    assert 0 < len(frames.indices) < 50
    assert frames.indices.tolist() == list(range(len(frames.indices)))
    assert frames.timestamps.tolist() == pytest.approx([i / 10 for i in frames.indices])
    assert frames.images.shape == (len(frames.indices), 720, 1280, 3)


@requires_decord
def test_shared_corrupted_mp4_with_decord_is_a_video_error(shared_videos):
    with pytest.raises(VideoError, match="corrupted.mp4.*decord could not decode it"):
        read_frames(shared_videos / "corrupted.mp4", 50, backend="decord")
