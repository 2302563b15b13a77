"""``FreeVideoLLM``: the stages wired together, video -> frames -> features -> plan -> answer.

A video is decoded once per question, and each sampled frame goes through each encoder (the
CLIP guide and the LLM's vision tower) at most once. The result carries its grounding: which
frames each pathway kept, at what time, and which region of each frame.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import perception
from .answerer import timing_context
from .config import PerceptionConfig
from .errors import ConfigError
from .limits import Limits, resolve_limits

if TYPE_CHECKING:
    from .answerer import Generation, LlavaAnswerer
    from .guide import ClipGuide
    from .video import Frames

__all__ = ["FreeVideoLLM", "AskResult", "PathwayProvenance", "VideoFeatures"]

Box4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class PathwayProvenance:
    """What one pathway kept: frames, their times, and the region of each frame."""

    name: str
    frame_indices: list[int]
    """Frame numbers in the video."""
    timestamps: list[float]
    """Presentation times of those frames, in seconds."""
    grid: tuple[int, int]
    """Token grid (rows, columns) of one frame after pooling, before the crop."""
    boxes: list[Box4 | None]
    """RoI per frame in grid cells, (top, left, bottom, right), half-open; None: no crop."""
    boxes_px: list[Box4 | None]
    """RoI per frame in pixels of the original frame, (x0, y0, x1, y1)."""
    num_tokens: int


@dataclass
class AskResult:
    """An answer and the evidence it rests on."""

    answer: str
    question: str
    video: str
    pathways: dict[str, PathwayProvenance]
    num_visual_tokens: int
    timings: dict[str, float]
    """Seconds per stage: decode, guide, vision, perception, prefill, generate (and total)."""
    cache_hit: bool
    models: dict[str, str]
    """Identity of the guide and of the language model."""
    config: str = ""
    frame_size: tuple[int, int] = (0, 0)
    """(width, height) of the video's frames as displayed."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def timestamps(self) -> list[float]:
        """Every distinct time the answer looked at closely (slow and middle pathways)."""
        times = {
            t for name in ("slow", "middle") if name in self.pathways for t in self.pathways[name].timestamps
        }
        return sorted(times)

    def grounding(self) -> str:
        """One line naming the key frames' times and regions, for an LLM or a log."""
        parts = []
        for name in ("slow", "middle"):
            p = self.pathways.get(name)
            if not p or not p.frame_indices:
                continue
            spots = []
            for t, box in zip(p.timestamps, p.boxes_px):
                spots.append(f"{t:.2f}s" + (f" region x{box[0]}-{box[2]} y{box[1]}-{box[3]}" if box else ""))
            parts.append(f"{name} frames at " + ", ".join(spots))
        return "; ".join(parts)

    def provenance_text(self) -> str:
        """Per pathway: its tokens, and each kept frame with its time and region in pixels."""
        lines = []
        for name, p in self.pathways.items():
            if not p.frame_indices:
                continue
            lines.append(f"  {name}: {len(p.frame_indices)} frame(s), {p.num_tokens} tokens")
            if name == "fast":
                lines.append(
                    f"    whole frames from {min(p.timestamps):.2f}s to {max(p.timestamps):.2f}s, "
                    f"each pooled to {p.grid[0]}x{p.grid[1]} tokens"
                )
                continue
            for index, t, box in zip(p.frame_indices, p.timestamps, p.boxes_px):
                where = f"region x {box[0]}-{box[2]}, y {box[1]}-{box[3]}" if box else "whole frame"
                lines.append(f"    frame {index} at {t:.2f}s, {where}")
        lines.append(f"  visual tokens: {self.num_visual_tokens}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        data = asdict(self)
        data["pathways"] = {k: asdict(v) for k, v in self.pathways.items()}
        return data


@dataclass
class VideoFeatures:
    """Everything about one video that does not depend on the question."""

    path: str
    indices: list[int]
    timestamps: list[float]
    frame_size: tuple[int, int]
    guide_pooled: torch.Tensor
    """(T, Dg) float32, L2-normalised."""
    guide_dense: torch.Tensor
    """(T, hg, wg, Dg) float32, L2-normalised."""
    frame_tokens: torch.Tensor
    """(T, h, w, D) the LLM-side projected tokens."""
    cache_hit: bool = False
    duration: float | None = None
    """Seconds, as the probe read them (None where unknown)."""

    def timing(self, plan: perception.Plan) -> str:
        """The prompt's sentence on when ``plan``'s key frames were taken (see
        :func:`~freevllm_tools.answerer.timing_context`)."""
        return timing_context([self.timestamps[i] for i in plan.key_frames], self.duration)


_STAGE_LABELS = {"decode": "decoding", "guide": "CLIP guide", "vision": "vision tower"}


class _Timer:
    """Seconds per stage; with ``progress``, a bar on stderr that names the running stage."""

    def __init__(self, progress: bool = False) -> None:
        self.timings: dict[str, float] = {}
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(_STAGE_LABELS), unit="stage", leave=False)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        label = _STAGE_LABELS.get(stage)
        if self._bar is not None and label:
            self._bar.set_description(label)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
            if self._bar is not None and label:
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class FreeVideoLLM:
    """Training-free video question answering: Free Video-LLM on a LLaVA-family model.

    Build it from loaded parts, or with :meth:`from_pretrained` from model names::

        qa = FreeVideoLLM.from_pretrained()                 # CLIP ViT-L-14-336 + LLaVA-v1.6-7B
        result = qa.ask("clip.mp4", "What happens at the end?")
        print(result.answer, result.grounding())
    """

    def __init__(
        self,
        guide: ClipGuide,
        answerer: LlavaAnswerer,
        config: PerceptionConfig | str = "paper",
        *,
        cache: Any | None = None,
        max_new_tokens: int = 128,
        limits: Limits | None = None,
    ) -> None:
        self._guide = guide
        self.answerer = answerer
        self.config = PerceptionConfig.from_preset(config) if isinstance(config, str) else config
        if not isinstance(self.config, PerceptionConfig):
            raise ConfigError(f"config must be a PerceptionConfig or a preset name, got {config!r}")
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.limits = resolve_limits(limits)
        """Bounds on a video and a question, checked before decoding or running a model."""

    @classmethod
    def from_pretrained(
        cls,
        guide: str = "ViT-L-14-336",
        llm: str = "llava-hf/llava-v1.6-vicuna-7b-hf",
        preset: PerceptionConfig | str = "paper",
        *,
        guide_pretrained: str | None = "openai",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        device_map: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        rope_scaling_factor: float | None = 2.0,
        limits: Limits | None = None,
    ) -> FreeVideoLLM:
        """Load the guide (open_clip) and the answerer (transformers) by name or local path.

        Defaults are the paper's pair. For a CPU, use a small LLaVA-family model, e.g.
        ``llm="llava-hf/llava-onevision-qwen2-0.5b-ov-hf"``.
        """
        from .answerer import LlavaAnswerer
        from .guide import ClipGuide

        clip = ClipGuide.from_pretrained(guide, guide_pretrained, device=device, dtype=dtype)
        answerer = LlavaAnswerer.from_pretrained(
            llm, device=device, dtype=dtype, device_map=device_map, rope_scaling_factor=rope_scaling_factor
        )
        cache = None
        if use_cache:
            from .cache import FeatureCache

            cache = FeatureCache(cache_dir)
        return cls(clip, answerer, preset, cache=cache, limits=limits)

    @property
    def guide(self) -> ClipGuide:
        """The CLIP guide that scores frames and regions against the question."""
        return self._guide

    @property
    def models(self) -> dict[str, str]:
        return {"guide": self._guide.identity, "llm": self.answerer.identity}

    # -- stages --------------------------------------------------------------------------

    def features(
        self, video: str | os.PathLike[str], *, progress: bool = False, timer: _Timer | None = None
    ) -> VideoFeatures:
        """The question-independent features of ``video``, from the cache where it holds them.

        Without a cache, or on a cold miss, the video is decoded once and its sampled frames go
        through each encoder once. With a cache, features it holds are reused; frames it holds
        (resized for each encoder) stand in for a decode when only an encoder must run again.
        """
        timer = timer or _Timer()
        self.limits.check_file(video)  # before the file is hashed or opened
        if self.cache is None:
            return self._encode(self._decode(video, timer), progress=progress, timer=timer)
        return self._cached_features(video, progress=progress, timer=timer)

    def _decode(self, video: str | os.PathLike[str], timer: _Timer) -> Frames:
        from .video import read_frames

        with timer("decode"):
            return read_frames(video, self.config.num_frames, limits=self.limits)

    def _encode(self, frames: Frames, *, progress: bool, timer: _Timer) -> VideoFeatures:
        with timer("guide"):
            guide = self._guide.encode_frames(frames.images, progress=progress)
        with timer("vision"):
            tokens = self.answerer.encode_frames(frames.images, progress=progress)
        return VideoFeatures(
            path=frames.info.path,
            indices=[int(i) for i in frames.indices],
            timestamps=[float(t) for t in frames.timestamps],
            frame_size=(frames.info.width, frames.info.height),
            guide_pooled=guide.pooled,
            guide_dense=guide.dense,
            frame_tokens=tokens,
            duration=frames.info.duration,
        )

    def _cache_names(self) -> dict[str, str]:
        from .cache import GUIDE_DENSE, GUIDE_POOLED, LLM_TOKENS, RESIZED_FRAMES, feature_name

        t = self.config.num_frames
        return {
            "pooled": feature_name(GUIDE_POOLED, self._guide.identity, frames=t),
            "dense": feature_name(GUIDE_DENSE, self._guide.identity, frames=t),
            "tokens": feature_name(LLM_TOKENS, self.answerer.identity, frames=t),
            "guide_frames": feature_name(RESIZED_FRAMES, "rgb8", frames=t, size=self._guide.image_size),
            "vision_frames": feature_name(RESIZED_FRAMES, "rgb8", frames=t, size=self.answerer.image_size),
        }

    def _cached_features(self, video: str | os.PathLike[str], *, progress: bool, timer: _Timer) -> VideoFeatures:
        from .cache import jsonable
        from .video import resize_frames

        cache = self.cache
        names = self._cache_names()
        with timer("cache"):
            key = cache.video_key(video)
            pooled, dense, tokens = (cache.get(key, names[k]) for k in ("pooled", "dense", "tokens"))
        if pooled is not None:  # features decoded under other limits are not served past these
            self.limits.check_info(pooled.meta.get("info") or {}, shown=os.fspath(video))
        path = os.path.realpath(video)
        if pooled is not None and dense is not None and tokens is not None:
            with timer("cache"):
                return VideoFeatures(
                    path=path,
                    indices=[int(i) for i in pooled.array("indices")],
                    timestamps=[float(t) for t in pooled.array("timestamps")],
                    frame_size=_frame_size(pooled.meta),
                    guide_pooled=pooled.tensor("pooled"),
                    guide_dense=dense.tensor("dense"),
                    frame_tokens=tokens.tensor("tokens", device=self.answerer.device),
                    cache_hit=True,
                    duration=_duration(pooled.meta),
                )

        decoded: list[Frames] = []

        def frames_for(which: str, size: tuple[int, int]) -> tuple[Any, Any]:
            """Frames resized for one encoder, with their metadata: cached, else decoded once."""
            entry = cache.get(key, names[which])
            if entry is not None:
                return entry.array("images"), entry
            if not decoded:
                decoded.append(self._decode(video, timer))
            frames = decoded[0]
            images = resize_frames(frames.images, size)
            meta = {"info": jsonable(frames.info), "partial": frames.partial}
            arrays = {"images": images, "indices": frames.indices, "timestamps": frames.timestamps}
            cache.put(key, names[which], arrays, meta=meta)
            return frames.images, None

        meta_source = pooled
        if pooled is None or dense is None:
            images, entry = frames_for("guide_frames", self._guide.image_size)
            with timer("guide"):
                guide = self._guide.encode_frames(images, progress=progress)
            source = decoded[0] if decoded else entry
            indices, timestamps, meta = _frame_meta(source)
            cache.put(
                key,
                names["pooled"],
                {"pooled": guide.pooled, "indices": indices, "timestamps": timestamps},
                meta=meta,
            )
            cache.put(key, names["dense"], {"dense": guide.dense})
            guide_pooled, guide_dense = guide.pooled, guide.dense
        else:
            indices, timestamps, meta = _frame_meta(meta_source)
            guide_pooled, guide_dense = pooled.tensor("pooled"), dense.tensor("dense")
        if tokens is None:
            images, _ = frames_for("vision_frames", self.answerer.image_size)
            with timer("vision"):
                frame_tokens = self.answerer.encode_frames(images, progress=progress)
            cache.put(key, names["tokens"], {"tokens": frame_tokens})
        else:
            frame_tokens = tokens.tensor("tokens", device=self.answerer.device)
        return VideoFeatures(
            path=path,
            indices=[int(i) for i in indices],
            timestamps=[float(t) for t in timestamps],
            frame_size=_frame_size(meta),
            guide_pooled=guide_pooled,
            guide_dense=guide_dense,
            frame_tokens=frame_tokens,
            cache_hit=False,
            duration=_duration(meta),
        )

    def plan(
        self, features: VideoFeatures, question: str, *, timer: _Timer | None = None
    ) -> perception.Plan:
        """Which frames and regions the question needs (no language model involved)."""
        timer = timer or _Timer()
        with timer("guide"):
            text = self._guide.encode_text([question])[0]
        with timer("perception"):
            return perception.plan(
                self.config,
                features.guide_pooled,
                features.guide_dense,
                text,
                grid=tuple(features.frame_tokens.shape[1:3]),
            )

    def _visual_tokens(
        self, features: VideoFeatures, question: str, timer: _Timer
    ) -> tuple[perception.Plan, torch.Tensor]:
        plan = self.plan(features, question, timer=timer)
        with timer("perception"):
            return plan, perception.gather(plan, features.frame_tokens)

    def _features(self, video: str | os.PathLike[str], progress: bool) -> tuple[VideoFeatures, _Timer]:
        timer = _Timer(progress)
        try:
            return self.features(video, progress=progress, timer=timer), timer
        finally:
            timer.close()

    # -- public API ----------------------------------------------------------------------

    def ask(
        self,
        video: str | os.PathLike[str],
        question: str,
        *,
        max_new_tokens: int | None = None,
        progress: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> AskResult:
        """Answer ``question`` about ``video``; the result names the frames and regions used.

        ``on_text`` receives the answer in pieces as the model writes it (for a terminal).
        """
        started = time.perf_counter()
        question = self.limits.check_question(question)
        features, timer = self._features(video, progress)
        result = self.answer(features, question, max_new_tokens=max_new_tokens, on_text=on_text)
        for stage, seconds in timer.timings.items():
            result.timings[stage] = result.timings.get(stage, 0.0) + seconds
        result.timings["total"] = time.perf_counter() - started
        return result

    def answer(
        self,
        features: VideoFeatures,
        question: str,
        *,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> AskResult:
        """Answer from features already at hand (see :meth:`features`).

        The guide reads ``question`` to choose frames and regions; the language model reads
        ``prompt`` when one is given (a question with a conversation's history, say).
        """
        started = time.perf_counter()
        question = self.limits.check_question(question)
        timer = _Timer()
        plan, tokens = self._visual_tokens(features, question, timer)
        text = self.limits.check_question(prompt) if prompt is not None else question
        limit = max_new_tokens or self.max_new_tokens
        context = features.timing(plan)
        if on_text is None:
            generation = self.answerer.answer(text, tokens, context=context, max_new_tokens=limit)
        else:
            finished: list[Generation] = []
            pieces = self.answerer.stream(
                text, tokens, context=context, max_new_tokens=limit, on_finish=finished.append
            )
            for piece in pieces:
                on_text(piece)
            generation = finished[0]
        timer.timings["prefill"] = generation.prefill_s
        timer.timings["generate"] = generation.generate_s
        timer.timings["total"] = time.perf_counter() - started
        return AskResult(
            answer=generation.text,
            question=question,
            video=features.path,
            pathways=provenance(plan, features),
            num_visual_tokens=plan.num_tokens,
            timings=timer.timings,
            cache_hit=features.cache_hit,
            models=self.models,
            config=_config_label(self.config),
            frame_size=features.frame_size,
        )

    def contact_sheet(self, result: AskResult, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Draw ``result``'s kept frames with their RoI boxes into a PNG at ``path``.

        The frames are decoded again (with this pipeline's sampling and limits): a picture
        needs pixels, which the feature cache does not keep at full size.
        """
        from .render import save_contact_sheet
        from .video import read_frames

        frames = read_frames(result.video, self.config.num_frames, limits=self.limits)
        images = {int(i): image for i, image in zip(frames.indices, frames.images)}
        return save_contact_sheet(result, images, path, **kwargs)

    async def aask(
        self, video: str | os.PathLike[str], question: str, *, max_new_tokens: int | None = None
    ) -> AskResult:
        """:meth:`ask` in a worker thread, so an event loop stays responsive."""
        return await asyncio.to_thread(self.ask, video, question, max_new_tokens=max_new_tokens)

    def stream(
        self,
        video: str | os.PathLike[str],
        question: str,
        *,
        max_new_tokens: int | None = None,
        progress: bool = False,
    ) -> Iterator[str]:
        """Yield the answer in pieces as the model writes it; joined, they equal ``ask``'s answer."""
        question = self.limits.check_question(question)
        features, timer = self._features(video, progress)
        plan, tokens = self._visual_tokens(features, question, timer)
        yield from self.answerer.stream(
            question, tokens, context=features.timing(plan), max_new_tokens=max_new_tokens or self.max_new_tokens
        )


def provenance(plan: perception.Plan, features: VideoFeatures) -> dict[str, PathwayProvenance]:
    """Translate a plan's frame positions and grid boxes to video frame numbers, times, pixels."""
    result = {}
    for name, p in plan.pathways.items():
        result[name] = PathwayProvenance(
            name=name,
            frame_indices=[features.indices[i] for i in p.frames],
            timestamps=[round(features.timestamps[i], 4) for i in p.frames],
            grid=tuple(p.grid),
            boxes=[None if b is None else (b.top, b.left, b.bottom, b.right) for b in p.boxes],
            boxes_px=[None if b is None else tuple(b.to_pixels(p.grid, features.frame_size)) for b in p.boxes],
            num_tokens=p.num_tokens,
        )
    return result


def _frame_meta(source: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Frame indices, timestamps and metadata from decoded ``Frames`` or a cache entry."""
    from .cache import jsonable

    if hasattr(source, "images"):
        return source.indices, source.timestamps, {"info": jsonable(source.info), "partial": source.partial}
    return source.array("indices"), source.array("timestamps"), dict(source.meta)


def _frame_size(meta: dict[str, Any]) -> tuple[int, int]:
    info = meta.get("info") or {}
    return int(info.get("width", 0)), int(info.get("height", 0))


def _duration(meta: dict[str, Any]) -> float | None:
    duration = (meta.get("info") or {}).get("duration")
    return float(duration) if duration else None


def _config_label(config: PerceptionConfig) -> str:
    try:
        return config.to_reference_string()
    except ConfigError:
        return repr(config)
