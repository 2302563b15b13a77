"""LangChain and LlamaIndex integrations, and the framework-neutral pieces they share.

- :mod:`freevllm_tools.integrations.langchain` (needs ``langchain-core``): ``FreeVideoQATool``,
  ``FreeVideoSearchTool``, ``FreeVideoRetriever``, ``FreeVideoToolkit``.
- :mod:`freevllm_tools.integrations.llama_index` (needs ``llama-index-core``): ``FreeVideoToolSpec``,
  ``FreeVideoRetriever``.

This module imports neither framework. It holds what both need: :class:`VideoResolver`, which turns
an untrusted ``video`` argument (a library video id or a path) into a checked real path, and the text
an LLM reads for an answer or a moment. A tool's structured output (LangChain's artifact,
LlamaIndex's raw output) does not reach the model, so the text carries the answer *and* the times
and regions it rests on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import InputError
from ..security import (
    DEFAULT_MAX_FILE_BYTES,
    MAX_QUESTION_CHARS,
    MAX_RESULTS,
    PathPolicy,
    check_count,
    check_duration,
    check_question,
)

if TYPE_CHECKING:
    from ..library import Moment, VideoLibrary
    from ..pipeline import AskResult, FreeVideoLLM

__all__ = [
    "VideoResolver",
    "ResolvedVideo",
    "DEFAULT_MAX_DURATION_S",
    "answer_text",
    "moment_id",
    "moment_label",
    "moments_text",
    "moment_text",
    "moment_metadata",
    "describe_moment",
    "render_thumbnail",
    "moment_thumbnail",
    "check_question",
    "check_count",
    "MAX_QUESTION_CHARS",
    "MAX_RESULTS",
]

#: Probed durations a resolver remembers before it starts over.
_MAX_REMEMBERED = 4096

#: Longest video a tool accepts unless told otherwise: two hours.
DEFAULT_MAX_DURATION_S = 2 * 3600.0

QA_DESCRIPTION = (
    "Answer a question about what is seen in a video. `video` is a library video id (from "
    "video_search) or the path of a video file inside the allowed folders, e.g. 'clips/cooking.mp4'. "
    "`question` asks about the visible content, e.g. 'What is the person holding at the end?'. "
    "Returns the answer followed by the times (in seconds) of the key frames it rests on and the "
    "region of each frame that was looked at. Ask one question per call."
)
SEARCH_DESCRIPTION = (
    "Find the moments in the video library that best match a description of what is seen, e.g. "
    "'a dog catching a frisbee'. Returns up to `k` moments, best first, each with its video id, "
    "video name, start and end time in seconds and a match score. Pass a video id to video_qa to "
    "ask about a moment."
)


# -- resolving the `video` argument ----------------------------------------------------------------


class ResolvedVideo(NamedTuple):
    """A ``video`` argument after the checks."""

    path: str
    """Real path of the video file."""
    label: str
    """How to name it to an LLM: the argument as given, or ``name (id ...)`` for a library id."""
    video_id: str | None
    """The library video id, when the argument was one."""


class VideoResolver:
    """Turns an untrusted ``video`` argument into the real path of a video file, or refuses.

    - A **library video id** (its number, e.g. ``"3"``) gives the path the library recorded. Those paths
      were added by the application, not by the caller, so they need not lie inside
      ``allowed_roots``; they still must be regular video files within the size limit.
    - Anything else is a **path**, checked by :class:`~freevllm_tools.security.PathPolicy`
      against the allowed roots: ``allowed_roots`` when given; else the folders that hold the
      library's videos (re-read on each call, so videos added later count); else, without a
      library, the current directory when the resolver is made.

    ``max_duration_s`` is checked with :func:`freevllm_tools.video.probe` after the path
    checks (the probe is remembered per file size and modification time, so a second question
    about a video does not read it again).
    """

    def __init__(
        self,
        allowed_roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        library: VideoLibrary | None = None,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_duration_s: float | None = DEFAULT_MAX_DURATION_S,
    ) -> None:
        self.library = library
        self.max_file_bytes = max_file_bytes
        self.max_duration_s = max_duration_s
        self._fixed: PathPolicy | None = None
        if allowed_roots is not None or library is None:
            self._fixed = PathPolicy.from_roots(allowed_roots, max_file_bytes=max_file_bytes)
        self._library_policy: tuple[tuple[str, ...], PathPolicy] | None = None
        self._durations: dict[tuple[str, int, int], float] = {}
        self._lock = threading.Lock()

    def policy(self) -> PathPolicy:
        """The path policy in force now."""
        if self._fixed is not None:
            return self._fixed
        folders = tuple(sorted({os.path.dirname(record.path) for record in self.library.videos()}))
        folders = tuple(f for f in folders if os.path.isdir(f))
        with self._lock:
            if self._library_policy is None or self._library_policy[0] != folders:
                self._library_policy = (folders, PathPolicy(folders, max_file_bytes=self.max_file_bytes))
            return self._library_policy[1]

    def library_record(self, video: str) -> Any | None:
        """The library's record of video id ``video`` (ASCII digits, e.g. ``"3"``), or None when
        ``video`` is not an id; InputError for an id the library does not hold."""
        if self.library is None or not (video.isascii() and video.isdigit()):
            return None
        record = self.library.video(int(video)) if len(video) <= 18 else None
        if record is None:
            msg = f"no video with id {video[:20]} in the library; use video_search to find video ids"
            raise InputError(msg)
        return record

    def resolve(self, video: object) -> ResolvedVideo:
        """The checked real path for a library video id or a path; FreeVideoError otherwise."""
        policy = self.policy()
        if isinstance(video, (str, int)) and not isinstance(video, bool):
            video_id = str(video).strip()
            record = self.library_record(video_id)
            if record is not None:
                real = policy.check_file(os.path.realpath(record.path), shown=f"video {video_id}")
                check_duration(record.duration, self.max_duration_s, shown=f"video {video_id}")
                return ResolvedVideo(real, f"{os.path.basename(real)} (id {video_id})", video_id)
        real = policy.resolve(video)
        shown = str(video).strip()[:200]
        self._check_duration(real, shown)
        return ResolvedVideo(real, shown, None)

    def _check_duration(self, real: str, shown: str) -> None:
        if self.max_duration_s is None:
            return
        info = os.stat(real)
        key = (real, info.st_size, info.st_mtime_ns)
        with self._lock:
            duration = self._durations.get(key)
        if duration is None:
            from ..video import probe

            duration = float(probe(real).duration)
            with self._lock:
                if len(self._durations) >= _MAX_REMEMBERED:
                    self._durations.clear()
                self._durations[key] = duration
        check_duration(duration, self.max_duration_s, shown=repr(shown[:200]))


# -- text an LLM reads -------------------------------------------------------------------------------


def answer_text(result: AskResult, video: str | None = None) -> str:
    """The answer, then the frames and regions it rests on, as one block of text.

    ``Answer: ...`` / ``Based on: slow frames at 1.20s region x.. y.., ...`` / ``Video: ...``.
    """
    grounding = result.grounding() or "no key frames recorded"
    name = video or os.path.basename(result.video)
    return (
        f"Answer: {result.answer.strip()}\n"
        f"Based on: {grounding}\n"
        f"Video: {name} ({result.num_visual_tokens} visual tokens)"
    )


def moment_id(moment: Moment) -> str:
    """A stable id for a retrieved moment: ``<video id>@<start>-<end>``."""
    return f"{moment.video_id}@{moment.start:.3f}-{moment.end:.3f}"


def moment_label(moment: Moment) -> str:
    """``'cooking.mp4' (id 3) 12.00s-15.50s``."""
    return f"{moment.name!r} (id {moment.video_id}) {moment.start:.2f}s-{moment.end:.2f}s"


def moments_text(moments: Sequence[Moment], query: str) -> str:
    """A numbered list of moments for an LLM, best first."""
    if not moments:
        return f"No moment in the library matches {query!r}."
    lines = [f"{len(moments)} moment(s) matching {query!r}, best first:"]
    for rank, moment in enumerate(moments, 1):
        lines.append(f"{rank}. {moment_label(moment)}, score {moment.score:.3f}")
    return "\n".join(lines)


def moment_text(moment: Moment, description: str | None = None) -> str:
    """A retrieved document's text: the video, the time span and, when asked, what happens."""
    text = f"Video {moment_label(moment)}, match score {moment.score:.3f}."
    if description:
        text += f"\nWhat happens: {description.strip()}"
    return text


def moment_metadata(moment: Moment, thumbnail: str | None = None) -> dict[str, Any]:
    """JSON-serialisable metadata for a retrieved moment: ``source`` (the file), ``video_id``,
    ``start``, ``end``, ``score``, ``best_timestamp``, ``frame_indices``, ``timestamps``,
    ``frame_scores`` and, when drawn, ``thumbnail_path``."""
    data = moment.to_dict()
    metadata: dict[str, Any] = {
        "source": data.pop("path"),
        "video_id": data.pop("video_id"),
        "name": moment.name,
        "start": float(moment.start),
        "end": float(moment.end),
        "score": float(moment.score),
        "best_timestamp": float(moment.best_timestamp),
    }
    data.pop("frame_ids", None)
    metadata.update(data)
    if thumbnail is not None:
        metadata["thumbnail_path"] = thumbnail
    return metadata


# -- describing and drawing a moment ------------------------------------------------------------------

DESCRIBE_PROMPT = "Describe briefly what happens in these frames."


def describe_moment(qa: FreeVideoLLM, moment: Moment, *, max_new_tokens: int = 48) -> str:
    """A short description, written by the answerer, of the frames inside the moment's span.

    Uses the pipeline's stages on the frames it samples from the video that fall inside
    ``[start, end]`` (the one nearest the middle when none does), so the description is about
    the moment, not the whole video.
    """
    import dataclasses

    import torch

    from .. import perception

    features = qa.features(moment.path)
    times = torch.tensor(features.timestamps, dtype=torch.float64)
    inside = ((times >= moment.start) & (times <= moment.end)).nonzero().flatten().tolist()
    if not inside:
        middle = (moment.start + moment.end) / 2
        inside = [int(torch.argmin((times - middle).abs()))]
    subset = dataclasses.replace(
        features,
        indices=[features.indices[i] for i in inside],
        timestamps=[features.timestamps[i] for i in inside],
        guide_pooled=features.guide_pooled[inside],
        guide_dense=features.guide_dense[inside],
        frame_tokens=features.frame_tokens[inside],
    )
    plan = qa.plan(subset, DESCRIBE_PROMPT)
    tokens = perception.gather(plan, subset.frame_tokens)
    return qa.answerer.answer(DESCRIBE_PROMPT, tokens, max_new_tokens=max_new_tokens).text.strip()


def render_thumbnail(
    moment: Moment, out_dir: str | os.PathLike[str], *, num_frames: int = 50, width: int = 256
) -> str:
    """Write a PNG of the moment's best frame into ``out_dir`` (once) and return its path.

    Decodes ``num_frames`` frames by the library's sampling rule and keeps the one nearest the
    moment's best timestamp (the same frame when ``num_frames`` matches the library's sampling).
    """
    from PIL import Image

    from ..video import read_frames

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = float(moment.best_timestamp)
    path = out / f"video{moment.video_id}_{best:.3f}s.png"
    if path.exists():
        return str(path)
    frames = read_frames(moment.path, num_frames)
    position = int(abs(frames.timestamps - best).argmin())
    image = Image.fromarray(frames.images[position])
    image.thumbnail((width, width))
    tmp = out / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return str(path)


def moment_thumbnail(library: VideoLibrary, moment: Moment, out_dir: str | os.PathLike[str]) -> str:
    """:func:`render_thumbnail` with the library's own sampling, so the best frame is exact."""
    record = library.video(moment.video_id)
    num_frames = library.frames_for(record.duration) if record is not None else 50
    return render_thumbnail(moment, out_dir, num_frames=num_frames)
