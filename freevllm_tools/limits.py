"""Limits on what one video, and one question, may cost: checked before the heavy work.

A hostile or merely odd file must not make this package hash 100 GB, scan ten million
packets, let a decoder allocate a 16000x12000 picture from a 200-byte header, or decode for an
hour. :class:`Limits` names each bound; :func:`freevllm_tools.video.probe`,
:func:`~freevllm_tools.video.read_frames`, ``FreeVideoLLM`` and ``VideoLibrary`` take one
(``limits=``; ``None`` means the defaults below, :meth:`Limits.none` turns every bound off).

Where each one is enforced, in order (see ``docs/reliability.md`` for the tests):

========================  ===========================================================================
``max_file_bytes``        ``stat`` of the file, before it is opened or hashed
``max_pixels``            FFmpeg's own ``max_pixels`` option when the container is opened (its
                          stream probing and every decoder refuse bigger pictures before allocating
                          them), then the codec header, before any frame is decoded
``max_duration_s``        the container header, before the packet scan; then each packet's time
                          during the scan (a header that under-reports is caught part-way)
``max_frames``            the header's frame count, before the scan; then the packets counted
                          during the scan
``max_decoded_bytes``     frames x height x width x 3 of a ``read_frames`` call, before decoding
``max_decode_s``          wall-clock time of one ``probe`` or ``read_frames`` (scan and decode),
                          checked between packets and frames; the decord child's time-out
``max_question_chars``    the question, before any model runs
========================  ===========================================================================

Every refusal is a :class:`~freevllm_tools.errors.VideoError` (an
:class:`~freevllm_tools.errors.InputError` for the question) that names the file, the value,
the limit and the field to change.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InputError, VideoError

__all__ = ["Limits", "resolve_limits", "DEFAULT_LIMITS"]

_GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    """Bounds on one video and one question; ``None`` switches a bound off.

    The defaults let through what real users have (an 8K clip, a four-hour film, 240 fps
    slow motion) and refuse what only a broken or hostile file claims.
    """

    max_file_bytes: int | None = 4 * _GIB
    """Largest video file, in bytes (4 GiB)."""
    max_duration_s: float | None = 4 * 3600.0
    """Longest video, in seconds (four hours)."""
    max_pixels: int | None = 8192 * 4320
    """Largest frame, width x height in pixels (DCI 8K: 35,389,440)."""
    max_frames: int | None = 1_000_000
    """Most frames in the video's stream (four hours at 60 fps is 864,000)."""
    max_decoded_bytes: int | None = 8 * _GIB
    """Most bytes of RGB frames one ``read_frames`` call may return (frames x H x W x 3)."""
    max_decode_s: float | None = 300.0
    """Longest wall-clock time of one probe or one ``read_frames`` call, in seconds."""
    max_question_chars: int | None = 2000
    """Longest question, in characters."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not value > 0 or (isinstance(value, float) and math.isnan(value)):
                msg = f"Limits.{spec.name} must be a positive number or None (no limit), got {value!r}"
                raise InputError(msg)

    @classmethod
    def none(cls) -> Limits:
        """Every bound off (trusted input only)."""
        return cls(**{spec.name: None for spec in fields(cls)})

    def replace(self, **changes: Any) -> Limits:
        """A copy with some bounds changed, e.g. ``Limits().replace(max_duration_s=600)``."""
        return replace(self, **changes)

    # -- checks ------------------------------------------------------------------------------

    def check_file(self, path: str | os.PathLike[str], *, shown: str | None = None) -> None:
        """Refuse a file over ``max_file_bytes`` (one ``stat``; nothing is opened)."""
        if self.max_file_bytes is None:
            return
        try:
            size = os.stat(path).st_size
        except (OSError, TypeError, ValueError):
            return  # the caller's own checks report a bad, missing or unreadable path
        self.check_file_size(size, shown=shown or os.fspath(path))

    def check_file_size(self, size: int, *, shown: str) -> None:
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            _refuse(shown, f"the file is {size:,} bytes", f"{self.max_file_bytes:,} bytes", "max_file_bytes")

    def check_pixels(self, width: int, height: int, *, shown: str, source: str = "its frames are") -> None:
        """Refuse frames over ``max_pixels`` (``source`` says who claims the size)."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            _refuse(
                shown, f"{source} {width}x{height} = {width * height:,} pixels",
                f"{self.max_pixels:,} pixels a frame", "max_pixels",
            )

    def check_duration(self, seconds: float, *, shown: str, source: str = "it lasts") -> None:
        if self.max_duration_s is not None and not seconds <= self.max_duration_s:
            _refuse(shown, f"{source} {seconds:,.1f} s", f"{self.max_duration_s:,g} s", "max_duration_s")

    def check_frames(self, count: int, *, shown: str, source: str = "it holds") -> None:
        if self.max_frames is not None and count > self.max_frames:
            _refuse(shown, f"{source} {count:,} frames", f"{self.max_frames:,} frames", "max_frames")

    def check_decoded(self, frames: int, width: int, height: int, *, shown: str) -> None:
        """Refuse a read whose RGB frames would exceed ``max_decoded_bytes``."""
        nbytes = frames * width * height * 3
        if self.max_decoded_bytes is not None and nbytes > self.max_decoded_bytes:
            _refuse(
                shown, f"{frames} frames of {width}x{height} need {nbytes:,} bytes",
                f"{self.max_decoded_bytes:,} bytes", "max_decoded_bytes", fix="ask for fewer frames",
            )

    def check_info(self, info: Any, *, shown: str | None = None) -> None:
        """Check what a probe found (a ``VideoInfo`` or its JSON dict, e.g. from the cache)."""
        get = info.get if isinstance(info, dict) else lambda key, default=None: getattr(info, key, default)
        shown = shown or str(get("path", "the video"))
        self.check_file_size(int(get("size_bytes", 0) or 0), shown=shown)
        self.check_pixels(int(get("width", 0) or 0), int(get("height", 0) or 0), shown=shown)
        self.check_duration(float(get("duration", 0.0) or 0.0), shown=shown)
        self.check_frames(int(get("num_frames", 0) or 0), shown=shown)

    def check_question(self, question: object, *, what: str = "question") -> str:
        """The stripped question, or InputError (empty, not text, over ``max_question_chars``)."""
        from .security import check_question

        limit = sys.maxsize if self.max_question_chars is None else int(self.max_question_chars)
        return check_question(question, limit, what=what)

    # -- helpers for the decoders ---------------------------------------------------------------

    def deadline(self) -> float | None:
        """``time.monotonic()`` value by which a probe or read must finish (None: no bound)."""
        return None if self.max_decode_s is None else time.monotonic() + float(self.max_decode_s)

    def check_deadline(self, deadline: float | None, *, shown: str, doing: str) -> None:
        if deadline is not None and time.monotonic() > deadline:
            msg = (
                f"video {shown!r}: {doing} ran past the time limit of {self.max_decode_s:g} s "
                "(Limits.max_decode_s); the file may be damaged or very long: use a shorter clip, "
                "or raise the limit"
            )
            raise VideoError(msg)

    def ffmpeg_options(self) -> dict[str, str]:
        """Options for FFmpeg's stream probing and decoders: pictures over ``max_pixels`` are
        refused inside FFmpeg, before their buffers are allocated."""
        return {} if self.max_pixels is None else {"max_pixels": str(int(self.max_pixels))}


#: The defaults, shared.
DEFAULT_LIMITS = Limits()


def resolve_limits(limits: Limits | None) -> Limits:
    """``limits`` itself, or :data:`DEFAULT_LIMITS` for None; InputError for anything else."""
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, Limits):
        msg = f"limits must be a freevllm_tools.limits.Limits or None, got {type(limits).__name__}"
        raise InputError(msg)
    return limits


def _refuse(shown: str, found: str, limit: str, name: str, *, fix: str = "") -> None:
    fix = fix or "use a smaller file, or raise the limit"
    msg = f"video {shown!r}: {found}, over the limit of {limit} (Limits.{name}); {fix}"
    raise VideoError(msg)
