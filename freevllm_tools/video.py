"""Open a video, sample frame indices, decode upright RGB frames with their timestamps.

Two calls: :func:`probe` (what the file holds) and :func:`read_frames` (the frames the
perception plan samples, by the segment-middle rule of :func:`config.sample_frame_indices`).

How a file is read, and why the process never crashes on a bad one
-----------------------------------------------------------------
1. **Probe with PyAV, in-process.** FFmpeg through PyAV fails with exceptions, not signals:
   it opens the container, picks the first real video stream (cover art is skipped), demuxes
   every packet of that stream *without decoding* (the exact frame count and each frame's
   presentation timestamp, keyframe positions), and decodes only the first frame (that the
   stream decodes at all, its display rotation and stored size). Cost: reading the file
   once, about 5 ms for the shared test clips and 90 ms for a 7 MB, 900-frame 720p file.
2. **PyAV decode, in-process, by default** (see 3): measured fastest (docs/benchmarks.md,
   table 2). decord is there on request, ``backend="auto"`` (decord when the probe finds the
   file sane, PyAV otherwise) or ``backend="decord"``, and then always in a sandbox:
   **decord in a killable subprocess.** decord aborts or segfaults on some corrupt
   H.264/HEVC streams and hangs, holding the GIL, when a container over-reports its frame
   count; no ``except`` or thread time-out helps in-process. So decord only ever runs in a
   child ``python -c`` process that imports nothing but decord and numpy, refuses to
   decode when its frame count differs from the probe's, and streams the raw frames back
   through a pipe under a time-out. A crash, hang, refusal or disagreement with the probe
   (frame size after rotation, timestamps) sends the file to PyAV instead. The child is
   only started when the probe looks sane for decord: a codec from :data:`DECORD_CODECS`
   (VP8/VP9 WebM is left out: decord's seeks return wrong frames there), a known duration,
   no demux error, no packet flagged corrupt, the container's frame count equal to the
   packets found, strictly increasing timestamps. Measured cost of the sandbox on a
   2-core x86_64 machine: 0.25-0.3 s a call (starting Python + decord in the child is
   0.13 s of it; the rest is decord's open and exit and the copy through the pipe); for
   the 50 frames of the shared clips that makes decord-in-a-sandbox 0.3-0.4 s against
   0.01-0.13 s for PyAV in-process, which decodes as fast as decord does in-process.
3. **PyAV decode, in-process**, for the default and whatever decord leaves: sequentially from the first frame,
   seeking to the keyframe before a sampled frame only when that skips frames (long
   videos), identifying frames by their timestamp (by their position in a stream without
   usable timestamps, where it never seeks).
   Decoding stops at the first error: the frames before it come back with
   ``Frames.partial`` set; a broken reference frame makes later frames suspect, and their
   positions could no longer be trusted. PyAV runs with slice threads only (frame threads
   with an early stop can hang), and every container is closed.

With decord missing (aarch64, Python 3.13), PyAV alone serves everything.

Every probe and read is held to a :class:`~freevllm_tools.limits.Limits` (``limits=``; None:
the defaults) before the work each bound covers: the file size before opening; FFmpeg's own
``max_pixels`` for its stream probing and every decoder (a header claiming a 16000x12000 PNG
is refused before the picture is allocated); the header's size, duration and frame count
before the packet scan; packets and their times during it; the bytes of the frames asked for
before decoding; and one wall-clock budget across the probe and the decode (the decord child's
time-out included).

Timestamps are the container's presentation timestamps, ``(pts - start) * time_base`` in
integer arithmetic per frame (no accumulated drift at 24000/1001 fps), so they are the same
whichever backend decoded the frames. Rotation is taken from the display matrix and applied
to the pixels, so images are upright (``VideoInfo.rotation`` is the clockwise turn a player
applies; flips in the matrix are ignored).
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import logging
import numbers
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from .config import sample_frame_indices
from .errors import InputError, VideoError
from .limits import DEFAULT_LIMITS, Limits, resolve_limits

__all__ = [
    "BACKENDS",
    "DECORD_CODECS",
    "Frames",
    "VideoInfo",
    "decode_runs",
    "display_rotation",
    "probe",
    "read_frames",
    "rotate_upright",
]

logger = logging.getLogger(__name__)

#: Backends :func:`read_frames` accepts; ``None`` picks decord when safe, else PyAV.
BACKENDS = ("decord", "pyav")
#: What ``read_frames`` uses unless told otherwise: PyAV in-process, seeking to keyframes. It is
#: the fastest measured here (docs/benchmarks.md, table 2: 1.4x the sandboxed decord on a
#: 10-minute 720p video, a quarter of in-process decord's memory) and needs no child process.
DEFAULT_BACKEND = "pyav"

#: Codecs (FFmpeg names) whose files are handed to decord; others go to PyAV.
DECORD_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg"})

#: The decord child gets this long plus :data:`DECORD_SECONDS_PER_MEGAPIXEL` for each
#: megapixel of frames it must decode (keyframe runs included) before it is killed.
DECORD_TIMEOUT_BASE_S = 30.0
DECORD_SECONDS_PER_MEGAPIXEL = 0.05


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds, as the probe read it from the container."""

    path: str
    """The file's real path (symlinks resolved)."""
    num_frames: int
    """Frames in the video stream (packets the container holds, not the header's claim)."""
    fps: Fraction
    """Frame rate, exact: ``Fraction(24000, 1001)`` for 23.976 fps."""
    duration: float
    """Seconds from the first frame's start to the last frame's end."""
    width: int
    """Width as displayed, after rotation."""
    height: int
    """Height as displayed, after rotation."""
    rotation: int
    """Clockwise turn (0, 90, 180 or 270) a player applies to the stored pictures."""
    codec: str
    """FFmpeg's codec name, e.g. ``h264``."""
    backend: str
    """``decord`` or ``pyav``: from :func:`probe`, the backend :func:`read_frames` will try
    first; in :attr:`Frames.info`, the one that decoded the frames."""
    size_bytes: int
    """File size."""


@dataclass
class Frames:
    """Sampled frames of a video with where they sit in it."""

    images: np.ndarray
    """``(T, H, W, 3)`` uint8 RGB, upright."""
    indices: np.ndarray
    """``(T,)`` int64 frame numbers in the video (presentation order)."""
    timestamps: np.ndarray
    """``(T,)`` float64 presentation times in seconds from the stream's start, increasing."""
    info: VideoInfo
    partial: bool = False
    """Decoding stopped early (a broken stream): fewer frames came back than were asked."""


# -- pure helpers ------------------------------------------------------------------------


def display_rotation(angle: float) -> int:
    """The clockwise display turn (0/90/180/270) for a display-matrix angle.

    ``angle`` is counter-clockwise, as FFmpeg's ``av_display_rotation_get`` and PyAV's
    ``VideoFrame.rotation`` give it: -90 (a phone held upright) gives 90. Angles that are
    not multiples of 90 round to the nearest one.
    """
    return int(round(-angle / 90.0)) % 4 * 90


def rotate_upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored ``(H, W, C)`` picture clockwise by ``rotation`` degrees (a view)."""
    return np.rot90(image, k=-(rotation // 90) % 4)


def decode_runs(
    targets: Sequence[int], keyframes: Sequence[int], min_skip: int = 16
) -> list[tuple[int, list[int]]]:
    """Group sorted frame ``targets`` into runs a decoder covers without seeking.

    Each run is ``(first frame to decode, its targets)``; a new run starts where seeking to
    the keyframe before a target skips at least ``min_skip`` frames the decoder would
    otherwise decode (a seek costs a decoder flush and a jump in the file).
    ``keyframes`` are sorted frame numbers; frame 0 is treated as one.
    """
    runs: list[tuple[int, list[int]]] = []
    position = 0  # the next frame a continuing decoder gives
    for target in targets:
        slot = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[slot] if slot >= 0 else 0
        if keyframe - position < min_skip:
            keyframe = position  # continuing is as cheap as seeking
        if runs and keyframe <= position:
            runs[-1][1].append(target)
        else:
            runs.append((keyframe, [target]))
        position = target + 1
    return runs


def frames_to_decode(runs: Sequence[tuple[int, Sequence[int]]]) -> int:
    """How many frames a decoder decodes to serve ``runs`` (see :func:`decode_runs`)."""
    return sum(targets[-1] - start + 1 for start, targets in runs)


# -- probing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Index:
    """What the probe learnt beyond :class:`VideoInfo`: enough to decode and time frames."""

    info: VideoInfo
    stream_index: int
    pts: np.ndarray | None  # (N,) int64 presentation order; None when the container has none
    timestamps: np.ndarray  # (N,) float64 seconds
    keyframes: tuple[int, ...]  # frame numbers of keyframes
    stored_size: tuple[int, int]  # (width, height) before rotation
    decord_refusal: str | None  # why decord is not tried; None: it may be
    limits: Limits = DEFAULT_LIMITS  # what the probe was held to; the read is held to it too
    deadline: float | None = None  # time.monotonic() by which the probe + read must finish


@dataclass
class _Scan:
    pts: list[int]
    keyframe_pts: list[int]
    has_missing_pts: bool = False
    corrupt_packets: int = 0
    demux_error: str | None = None
    decode_error: str | None = None
    first_frame: tuple[int, int, int] | None = None  # (width, height, rotation)


def probe(path: str | os.PathLike[str], *, limits: Limits | None = None) -> VideoInfo:
    """Read what ``path`` holds: frame count, exact fps, duration, displayed size, rotation.

    Demuxes the video stream once (no decoding but its first frame). Raises
    :class:`VideoError` naming the file and the cause for a missing file, a directory, a
    file that is not a video, one without a video stream, frames, or a decodable frame, and
    for a file over one of the ``limits`` (None: the defaults of
    :class:`~freevllm_tools.limits.Limits`), checked before the work they bound.
    """
    return _probe(path, limits).info


def _probe(
    path: str | os.PathLike[str], limits: Limits | None = None, deadline: float | None = None
) -> _Index:
    limits = resolve_limits(limits)
    real = _checked_path(path, limits)
    if deadline is None:
        deadline = limits.deadline()
    with _open_container(real, limits) as container:
        stream = _video_stream(container, real)
        _check_header(container, stream, real, limits)
        scan = _scan_stream(container, stream, real, limits, deadline)
        index = _index(real, container, stream, scan, limits)
    limits.check_info(index.info)
    return replace(index, limits=limits, deadline=deadline)


def _check_header(container, stream, path: str, limits: Limits) -> None:
    """Refuse what the headers claim beyond the limits, before a packet is read; make the
    decoder refuse pictures over ``max_pixels`` before allocating them."""
    context = stream.codec_context
    if context.width and context.height:
        limits.check_pixels(context.width, context.height, shown=path, source="its header claims frames of")
    seconds = None
    if stream.duration is not None and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1e6
    if seconds is not None:
        limits.check_duration(seconds, shown=path, source="its header claims a duration of")
    if stream.frames:
        limits.check_frames(stream.frames, shown=path, source="its header claims")
    context.options = {**(context.options or {}), **limits.ffmpeg_options()}


def _checked_path(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> str:
    try:
        name = os.fspath(path)
    except TypeError:
        raise InputError(f"a video path must be a str or os.PathLike, got {path!r}") from None
    real = os.path.realpath(name)
    if not os.path.exists(real):
        raise VideoError(f"video {name!r}: no such file; check the path (resolved to {real!r})")
    if os.path.isdir(real):
        raise VideoError(f"video {name!r}: is a directory; pass a video file inside it")
    if not os.path.isfile(real):
        raise VideoError(f"video {name!r}: is not a regular file (a device, socket or pipe)")
    size = os.path.getsize(real)
    if size == 0:
        raise VideoError(
            f"video {name!r}: the file is empty (0 bytes); re-download or re-export it"
        )
    limits.check_file_size(size, shown=name)
    return real


def _open_container(path: str, limits: Limits | None = None):
    import av

    options = limits.ffmpeg_options() if limits is not None else {}
    try:
        return av.open(path, mode="r", options=options)
    except PermissionError as exc:
        raise VideoError(f"video {path!r}: cannot be read (permission denied)") from exc
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VideoError(
            f"video {path!r}: is not a video FFmpeg can read ({_reason(exc)}); "
            "check that it is a complete video file (mp4, mkv, mov, webm, avi ...)"
        ) from exc


def _video_stream(container, path: str):
    import av

    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            continue  # cover art, not video
        if stream.codec_context is None:
            raise VideoError(
                f"video {path!r}: FFmpeg has no decoder for its video codec; "
                "re-encode it, e.g. to H.264"
            )
        return stream
    kinds = ", ".join(s.type for s in container.streams) or "none"
    raise VideoError(
        f"video {path!r}: has no video stream (streams: {kinds}); pass a file with pictures"
    )


def _scan_stream(
    container, stream, path: str = "", limits: Limits = DEFAULT_LIMITS, deadline: float | None = None
) -> _Scan:
    """Demux every packet of ``stream``; decode only until the first frame comes out.

    Stops with :class:`VideoError` as soon as the packets pass ``limits.max_frames`` or
    ``limits.max_duration_s``, or the scan runs past ``deadline``.
    """
    import av

    scan = _Scan(pts=[], keyframe_pts=[])
    max_frames = limits.max_frames
    max_ticks = None
    if limits.max_duration_s is not None and stream.time_base:
        max_ticks = limits.max_duration_s / float(stream.time_base)
    low = high = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                _first_frame(scan, stream, None)
                continue
            if packet.is_corrupt:
                scan.corrupt_packets += 1
            if not packet.is_discard:
                _record_packet(scan, packet)
                count, pts = len(scan.pts), scan.pts[-1]
                if max_frames is not None and count > max_frames:
                    limits.check_frames(count, shown=path, source="its stream holds at least")
                if max_ticks is not None and not scan.has_missing_pts:
                    low, high = (pts, pts) if low is None else (min(low, pts), max(high, pts))
                    if high - low > max_ticks:
                        seconds = (high - low) * float(stream.time_base)
                        limits.check_duration(seconds, shown=path, source="its frames span at least")
                if count % 256 == 0:
                    limits.check_deadline(deadline, shown=path, doing="probing")
            _first_frame(scan, stream, packet)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        scan.demux_error = _reason(exc)
    return scan


def _record_packet(scan: _Scan, packet) -> None:
    pts = packet.pts if packet.pts is not None else packet.dts
    if pts is None:
        scan.has_missing_pts = True
        pts = len(scan.pts)
    scan.pts.append(int(pts))
    if packet.is_keyframe:
        scan.keyframe_pts.append(int(pts))


def _first_frame(scan: _Scan, stream, packet) -> None:
    import av

    if scan.first_frame is not None or scan.decode_error is not None:
        return
    try:
        frames = stream.decode(packet)
    except (av.error.FFmpegError, ValueError) as exc:
        scan.decode_error = _reason(exc)
        return
    if frames:
        frame = frames[0]
        scan.first_frame = (frame.width, frame.height, display_rotation(frame.rotation))


def _index(path: str, container, stream, scan: _Scan, limits: Limits = DEFAULT_LIMITS) -> _Index:
    codec = stream.codec_context.name
    if not scan.pts:
        cause = f"; FFmpeg said: {scan.demux_error}" if scan.demux_error else ""
        raise VideoError(
            f"video {path!r}: its {codec} video stream holds no frames{cause}; "
            "the file is empty or truncated: re-export it"
        )
    if scan.first_frame is None:
        cause = scan.decode_error or "the decoder gave no picture"
        if limits.max_pixels is not None and not stream.codec_context.width:
            # FFmpeg was told max_pixels: a header claiming more leaves the size unknown (0x0).
            raise VideoError(
                f"video {path!r}: no frame of its {codec} stream decodes within the limit of "
                f"{limits.max_pixels:,} pixels a frame (Limits.max_pixels), and its header gives no "
                f"size under it ({cause}); the file claims enormous pictures or is corrupt: "
                "re-encode it smaller, or raise the limit"
            )
        raise VideoError(
            f"video {path!r}: no frame of its {codec} stream decodes ({cause}); "
            "the file is corrupt or truncated: re-download or re-encode it"
        )
    pts, timestamps, fps = _timing(stream, scan)
    stored_w, stored_h, rotation = scan.first_frame
    width, height = (stored_h, stored_w) if rotation in (90, 270) else (stored_w, stored_h)
    keyframes = _keyframe_numbers(pts, scan.keyframe_pts) if pts is not None else ()
    refusal = _decord_refusal(container, stream, scan, pts is not None)
    info = VideoInfo(
        path=path,
        num_frames=len(timestamps),
        fps=fps,
        duration=float(timestamps[-1] - timestamps[0]) + fps.denominator / fps.numerator,
        width=width,
        height=height,
        rotation=rotation,
        codec=codec,
        backend=DEFAULT_BACKEND,
        size_bytes=os.path.getsize(path),
    )
    return _Index(info, stream.index, pts, timestamps, keyframes, (stored_w, stored_h), refusal)


def _timing(stream, scan: _Scan) -> tuple[np.ndarray | None, np.ndarray, Fraction]:
    """Sorted pts (None when unusable: missing or repeated), seconds per frame, and fps.

    Without usable pts, frame ``i`` is timed ``i / fps``.
    """
    pts = np.sort(np.asarray(scan.pts, dtype=np.int64))
    time_base = Fraction(stream.time_base) if stream.time_base else None
    usable = time_base is not None and not scan.has_missing_pts and bool(np.all(np.diff(pts) > 0))
    fps = _frame_rate(stream, pts if usable else None, time_base)
    if not usable:
        return None, np.arange(len(pts)) * fps.denominator / fps.numerator, fps
    start = int(stream.start_time) if stream.start_time is not None else int(pts[0])
    return pts, _pts_seconds(pts, start, time_base), fps


def _keyframe_numbers(pts: np.ndarray, keyframe_pts: list[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.searchsorted(pts, sorted(set(keyframe_pts))))


def _pts_seconds(pts: np.ndarray, start: int, time_base: Fraction) -> np.ndarray:
    """Seconds per frame, one exact division each (no accumulated drift)."""
    return (pts - start) * time_base.numerator / time_base.denominator


def _frame_rate(stream, pts: np.ndarray | None, time_base: Fraction | None) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    if pts is not None and time_base is not None and len(pts) > 1:
        return Fraction(len(pts) - 1) / (Fraction(int(pts[-1] - pts[0])) * time_base)
    return Fraction(25)  # FFmpeg's own default when a stream states nothing


def _decord_refusal(container, stream, scan: _Scan, usable_pts: bool) -> str | None:
    """Why the probe will not hand this file to decord, or None when it looks sane."""
    codec = stream.codec_context.name
    if codec not in DECORD_CODECS:
        return f"codec {codec} is not one decord is trusted with"
    if container.duration is None:
        return "the container states no duration (decord fails to measure it)"
    if scan.demux_error:
        return f"demuxing failed part-way ({scan.demux_error})"
    if scan.corrupt_packets:
        return f"{scan.corrupt_packets} packets are flagged corrupt"
    if stream.frames and stream.frames != len(scan.pts):
        return f"the container claims {stream.frames} frames but holds {len(scan.pts)}"
    if not usable_pts:
        return "the frames have no usable presentation timestamps"
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _decord_available() -> bool:
    return bool(sys.executable) and importlib.util.find_spec("decord") is not None


# -- reading -----------------------------------------------------------------------------


def read_frames(
    path: str | os.PathLike[str],
    num_frames: int = 50,
    *,
    backend: str | None = None,
    limits: Limits | None = None,
) -> Frames:
    """Decode ``num_frames`` frames (fewer when the video is shorter), upright RGB.

    Frame ``i`` is the middle of segment ``i`` of ``num_frames`` equal segments
    (:func:`config.sample_frame_indices`). ``backend``: ``None`` or ``"pyav"`` (PyAV
    in-process, the fastest here), ``"auto"`` (decord in a sandbox when the probe finds the
    file sane for it, PyAV otherwise and as the fallback) or ``"decord"`` (no fallback). A stream that breaks part-way gives the frames before the
    break with ``partial=True``; one with no decodable sampled frame raises
    :class:`VideoError`, as does a file over one of the ``limits`` (None: the defaults of
    :class:`~freevllm_tools.limits.Limits`; the time limit covers the probe and the decode).
    """
    if backend is not None and backend not in (*BACKENDS, "auto"):
        raise InputError(f"backend must be one of {(*BACKENDS, 'auto')} or None, got {backend!r}")
    integral = isinstance(num_frames, numbers.Integral) and not isinstance(num_frames, bool)
    if not integral or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    limits = resolve_limits(limits)
    index = _probe(path, limits)
    targets = sample_frame_indices(index.info.num_frames, int(num_frames))
    limits.check_decoded(len(targets), index.info.width, index.info.height, shown=index.info.path)
    if _use_decord(index, backend):
        try:
            images = _read_decord(index, targets)
            return _frames(index, targets, images, "decord")
        except _BackendFailed as exc:
            if backend == "decord":
                raise VideoError(
                    f"video {index.info.path!r}: decord could not decode it ({exc}); "
                    "use backend='pyav' (the default)"
                ) from None
            logger.warning("decord failed on %s (%s); decoding with PyAV", index.info.path, exc)
    images, decoded, error = _read_pyav(index, targets)
    return _frames(index, decoded, images, "pyav", error=error, asked=len(targets))


def _use_decord(index: _Index, backend: str | None) -> bool:
    if backend in (None, "pyav"):
        return False
    if backend == "decord":
        if not _decord_available():
            raise VideoError(
                f"video {index.info.path!r}: backend='decord' was asked but decord is not "
                "installed (it has wheels for x86_64 and Python < 3.13); "
                "`pip install decord` or use backend='pyav'"
            )
        return True
    return index.decord_refusal is None and _decord_available()


def _frames(
    index: _Index, decoded: Sequence[int], images: np.ndarray, backend: str,
    *, error: str | None = None, asked: int | None = None,
) -> Frames:
    info = index.info
    if not decoded:
        raise VideoError(
            f"video {info.path!r}: none of the sampled frames decodes ({error or 'no picture'}); "
            "the file is corrupt: re-download or re-encode it"
        )
    indices = np.asarray(decoded, dtype=np.int64)
    partial = asked is not None and len(decoded) < asked
    if partial:
        logger.warning(
            "%s: %d of %d sampled frames came back (%s)", info.path, len(decoded), asked,
            error or "the decoder gave fewer frames than the container holds",
        )
    return Frames(
        images=images,
        indices=indices,
        timestamps=index.timestamps[indices].astype(np.float64),
        info=replace(info, backend=backend),
        partial=partial,
    )


class _BackendFailed(Exception):
    """decord refused, crashed, hung or disagreed with the probe."""


# -- PyAV ----------------------------------------------------------------------------------


class _LostTrack(Exception):
    """After a seek, a frame could not be placed by its timestamp."""


def _read_pyav(index: _Index, targets: Sequence[int]) -> tuple[np.ndarray, list[int], str | None]:
    """Decode ``targets`` with PyAV: (images of the decoded ones, their numbers, error)."""
    images = np.empty((len(targets), index.info.height, index.info.width, 3), dtype=np.uint8)
    slots = {t: i for i, t in enumerate(targets)}
    done: dict[int, None] = {}
    runs = decode_runs(targets, index.keyframes) if index.pts is not None else [(0, list(targets))]
    try:
        error = _decode_pyav(index, runs, images, slots, done)
    except _LostTrack:  # a seek misplaced the decoder: decode everything from the start
        done.clear()
        error = _decode_pyav(index, [(0, list(targets))], images, slots, done)
    decoded = sorted(done)
    if len(decoded) < len(targets):
        images = images[[slots[t] for t in decoded]]
    return images, decoded, error


def _decode_pyav(index: _Index, runs, images, slots, done) -> str | None:
    """Decode ``runs`` into ``images``; the error that stopped decoding, or None."""
    import av

    with _open_container(index.info.path, index.limits) as container:
        stream = container.streams[index.stream_index]
        stream.thread_type = "SLICE"  # never frame threads: an early stop can hang them
        stream.codec_context.options = index.limits.ffmpeg_options()  # no picture over max_pixels
        try:
            for start, run_targets in runs:
                _decode_run(container, stream, index, start, run_targets, images, slots, done)
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as exc:
            return _reason(exc)
    return None


def _decode_run(container, stream, index: _Index, start, run_targets, images, slots, done) -> None:
    """Decode from frame ``start`` (seeking there unless it is 0) through ``run_targets``.

    Frames are placed by :func:`_frame_number`; a seek that lands past its first target (or
    a frame without a known timestamp after a seek) raises :class:`_LostTrack`.
    """
    seek = start > 0
    if seek:
        _seek(container, stream, int(index.pts[start]))
    wanted, last = set(run_targets), run_targets[-1]
    position, first = 0, True
    for frame in _decoded_frames(container, stream):
        index.limits.check_deadline(index.deadline, shown=index.info.path, doing="decoding")
        number = _frame_number(frame, index, position, seek)
        if seek and first and number > run_targets[0]:
            raise _LostTrack
        position, first = number + 1, False
        if number in wanted:
            picture = frame.to_ndarray(
                format="rgb24", width=index.stored_size[0], height=index.stored_size[1]
            )
            images[slots[number]] = rotate_upright(picture, index.info.rotation)
            done[number] = None
        if number >= last:
            return


def _seek(container, stream, pts: int) -> None:
    """Move the demuxer to the keyframe at or before ``pts`` (the decoder is flushed)."""
    container.seek(pts, stream=stream, backward=True, any_frame=False)


def _frame_number(frame, index: _Index, position: int, seek: bool) -> int:
    """The frame number of a decoded ``frame``: by its timestamp when the probe knows it
    (robust to a decoder that drops a broken frame), else by its position in the output;
    after a seek a frame must be known by its timestamp."""
    if frame.pts is not None and index.pts is not None:
        slot = int(np.searchsorted(index.pts, frame.pts))
        if slot < len(index.pts) and index.pts[slot] == frame.pts:
            return slot
    if seek:
        raise _LostTrack
    return position


def _decoded_frames(container, stream):
    for packet in container.demux(stream):
        yield from stream.decode(packet if packet.size else None)


# -- decord, in a subprocess ---------------------------------------------------------------

#: The child's program: imports only decord and numpy, never this package.
_DECORD_WORKER = r"""
import sys
sys.path[:] = [entry for entry in sys.path if entry]  # no module from the caller's cwd
import json, os
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # whatever native code prints goes to stderr, not into the frames

def fail(kind, message):
    sys.stderr.write("\n" + json.dumps({"kind": kind, "message": str(message)[:500]}) + "\n")
    sys.stderr.flush()
    sys.exit(3)

path, args = sys.argv[1], json.loads(sys.argv[2])
try:
    import decord
except Exception as exc:
    fail("import", exc)
try:
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
except Exception as exc:
    fail("open", exc)
if len(vr) != args["count"]:
    fail("count", "decord counts %d frames, the container holds %d" % (len(vr), args["count"]))
indices = args["indices"]
try:
    stamps = vr.get_frame_timestamp(indices)[:, 0].tolist()
except Exception as exc:
    fail("timestamps", exc)
header = None
for begin in range(0, len(indices), args["chunk"]):
    try:
        batch = vr.get_batch(indices[begin : begin + args["chunk"]]).asnumpy()
        vr.seek(0)  # lets decord free the frames its decoder ran ahead with
    except Exception as exc:
        fail("decode", exc)
    if header is None:
        header = {"timestamps": stamps, "shape": list(batch.shape[1:])}
        out.write((json.dumps(header) + "\n").encode())
    out.write(memoryview(batch).cast("B"))
out.flush()
"""


def _read_decord(index: _Index, targets: Sequence[int]) -> np.ndarray:
    """Decode ``targets`` with decord in a child process; raise :class:`_BackendFailed`."""
    info = index.info
    args = {"count": info.num_frames, "indices": [int(t) for t in targets], "chunk": 16}
    timeout = _decord_timeout(index, targets)
    if index.deadline is not None:  # the rest of Limits.max_decode_s; PyAV then refuses at once
        timeout = max(0.0, min(timeout, index.deadline - time.monotonic()))
    command = [sys.executable, "-c", _DECORD_WORKER, info.path, json.dumps(args)]
    killed = threading.Event()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, close_fds=True
        )

        def kill() -> None:
            killed.set()
            process.kill()

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        images = None
        try:
            images = _receive_frames(process.stdout, index, targets)
            if images is not None:
                process.wait()  # it is writing nothing more; the timer still guards it
        finally:
            timer.cancel()
            process.stdout.close()
            if process.poll() is None:
                process.kill()
            process.wait()
        if images is not None:
            return images  # every byte arrived and the header matched the probe
        if killed.is_set():
            raise _BackendFailed(f"it ran past its time-out of {timeout:.1f} s and was killed")
        raise _BackendFailed(_child_failure(process.returncode, errors))


def _decord_timeout(index: _Index, targets: Sequence[int]) -> float:
    """Seconds the decord child may take: a base plus a share per decoded megapixel."""
    work = frames_to_decode(decode_runs(targets, index.keyframes))
    megapixels = work * index.info.width * index.info.height / 1e6
    return DECORD_TIMEOUT_BASE_S + DECORD_SECONDS_PER_MEGAPIXEL * megapixels


def _receive_frames(pipe, index: _Index, targets: Sequence[int]) -> np.ndarray | None:
    """Read the child's header and raw frames; None when it stopped or disagrees."""
    line = pipe.readline()
    if not line:
        return None
    try:
        header = json.loads(line)
        shape, stamps = header["shape"], header["timestamps"]
    except (ValueError, KeyError, TypeError):
        raise _BackendFailed("the decord worker sent an unreadable header") from None
    info = index.info
    if shape != [info.height, info.width, 3]:
        raise _BackendFailed(
            f"decord gives {shape} frames, the probe expects "
            f"{[info.height, info.width, 3]} after a {info.rotation} degree rotation"
        )
    expected = index.timestamps[list(targets)]
    got = np.asarray(stamps, dtype=np.float64)
    tolerance = 0.5 * info.fps.denominator / info.fps.numerator
    if not np.all(np.abs(got - expected) <= tolerance):
        raise _BackendFailed("decord's frame timestamps disagree with the container's")
    images = np.empty((len(targets), info.height, info.width, 3), dtype=np.uint8)
    view, filled = memoryview(images).cast("B"), 0
    while filled < len(view):
        count = pipe.readinto(view[filled:])
        if not count:
            return None
        filled += count
    return images


def _child_failure(returncode: int, errors) -> str:
    """The child's own reason for failing (its last JSON line on stderr), or its exit."""
    if returncode == 0:
        return "the decord worker sent too few frames"
    errors.seek(0)
    tail = errors.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                return json.loads(line)["message"]
            except (ValueError, KeyError):
                break
    if returncode < 0:
        return f"the decord worker died from signal {-returncode}"
    return f"the decord worker exited with status {returncode}: {' '.join(tail[-2:])[:300]}"


def resize_frames(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 -> ``(T, *size, 3)`` uint8, aspect ratio not kept.

    Bicubic with antialiasing, rounded to whole pixel values: what a LLaVA image processor
    does, so an encoder given these frames resizes nothing and sees the same pixels.
    ``size`` is ``(height, width)``.
    """
    import torch
    import torch.nn.functional as F

    if images.shape[1:3] == tuple(size) or len(images) == 0:
        return np.ascontiguousarray(images)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
