"""What a library search and an indexing run give back: moments, video records, reports."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Moment", "VideoRecord", "AddReport", "IndexRepair", "format_moments"]


@dataclass(frozen=True)
class Moment:
    """A span of one video that matches a query.

    ``start``/``end`` bound the segments the matching sampled frames stand for: from halfway
    to the previous sampled frame (or 0) to halfway to the next one (or the video's end).
    """

    video_id: int
    """The video's id in the library (stable across restarts)."""
    path: str
    """The video file's real path."""
    start: float
    """Seconds."""
    end: float
    """Seconds."""
    score: float
    """Best frame score in the moment: cosine similarity of frame and query embeddings."""
    frame_indices: tuple[int, ...]
    """Frame numbers in the video of the matching sampled frames, in time order."""
    timestamps: tuple[float, ...]
    """Their presentation times, seconds."""
    frame_scores: tuple[float, ...]
    """Their scores."""
    frame_ids: tuple[int, ...] = ()
    """Their ids in the library's frame index."""

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def name(self) -> str:
        """The video's file name."""
        return os.path.basename(self.path)

    @property
    def best_timestamp(self) -> float:
        """Time of the best-scoring frame: where to jump to."""
        return self.timestamps[int(np.argmax(self.frame_scores))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists)."""
        data = asdict(self)
        for key in ("frame_indices", "timestamps", "frame_scores", "frame_ids"):
            data[key] = list(data[key])
        return data

    def __str__(self) -> str:
        return f"{self.name} {_clock(self.start)}-{_clock(self.end)} (score {self.score:.3f})"


@dataclass(frozen=True)
class VideoRecord:
    """One indexed video."""

    id: int
    path: str
    content_key: str
    """Content hash of the file (the feature cache's video key)."""
    duration: float
    """Seconds."""
    num_frames: int
    """Frames in the video."""
    fps: float
    width: int
    """As displayed."""
    height: int
    indexed_frames: int
    """Sampled frames in the index."""
    guide_identity: str
    partial: bool
    """Decoding stopped early: only the frames before a broken one are indexed."""
    added_at: float
    """Unix time the video was (last) indexed."""

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` as displayed."""
        return (self.width, self.height)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AddReport:
    """What :meth:`VideoLibrary.add` did, file by file."""

    added: list[str] = field(default_factory=list)
    """New videos indexed."""
    updated: list[str] = field(default_factory=list)
    """Videos whose file (or the guide, or the sampling) changed: re-indexed."""
    skipped: list[str] = field(default_factory=list)
    """Unchanged videos: nothing done."""
    moved: list[tuple[str, str]] = field(default_factory=list)
    """``(old path, new path)``: an indexed file found under a new name (its ids are kept)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of files that could not be indexed."""
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """``(path, message)``: indexed, with a caveat (e.g. decoding stopped early)."""
    frames_added: int = 0
    """Frames put in the index."""
    cache_hits: int = 0
    """Videos whose embeddings came from the feature cache or the library (no decode)."""

    @property
    def ok(self) -> bool:
        """No file failed."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [
            f"{len(self.added)} added",
            f"{len(self.updated)} updated",
            f"{len(self.skipped)} unchanged",
        ]
        if self.moved:
            parts.append(f"{len(self.moved)} moved")
        parts.append(f"{len(self.failed)} failed")
        lines = [", ".join(parts) + f" ({self.frames_added} frames indexed)"]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        lines += [f"  warning: {path}: {message}" for path, message in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class IndexRepair:
    """A repair of the frame index found necessary when the library was opened."""

    reason: str
    action: str
    """``"rebuilt"`` (from SQLite), ``"caught up"`` (missing vectors added, extra removed), or
    ``"database rebuilt"`` (a damaged database rebuilt from the journal)."""
    vectors: int
    """Vectors in the index afterwards (frames in the database, for a database repair)."""
    dropped: tuple[str, ...] = ()
    """Paths of videos a database repair could not restore: add them again to re-index them."""


def format_moments(moments: Sequence[Moment], *, as_json: bool = False) -> str:
    """Moments as a text table (video, start-end, score) or, with ``as_json``, a JSON list.

    The table is what a CLI prints and what a tool returns to an LLM: it carries the times.
    """
    if as_json:
        return json.dumps([m.to_dict() for m in moments], indent=2)
    if not moments:
        return "no matching moments"
    names = [m.name for m in moments]
    spans = [f"{_clock(m.start)}-{_clock(m.end)}" for m in moments]
    width_name = max(5, *(len(n) for n in names))
    width_span = max(10, *(len(s) for s in spans))
    lines = [f"{'#':>2}  {'video':<{width_name}}  {'start-end':<{width_span}}  score  id"]
    for rank, (moment, name, span) in enumerate(zip(moments, names, spans), 1):
        lines.append(
            f"{rank:>2}  {name:<{width_name}}  {span:<{width_span}}  {moment.score:.3f}  {moment.video_id}"
        )
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"
