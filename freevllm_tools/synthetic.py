"""A synthetic video world with ground truth: coloured shapes that come and go.

Each video shows a few coloured shapes (every object in a video has its own colour and its
own shape, so "the circle" and "the red object" each name one object) over a textured
background that drifts slowly. Each object is visible during one time window at a place (a
2x2 block of the 8x8 patch grid, see :data:`CELLS`); the *target* may be visible only briefly
(a "needle"). The ground
truth says what (colour, shape), where (a pixel box per frame) and when (a frame range and
seconds).

Everything is deterministic from a seed and fast (a 60-frame 64x64 video renders in a few
milliseconds), so the tiny models in ``freevllm_tools/assets`` can be trained on this world
and tested on held-out seeds: seeds below :data:`HELDOUT_SEED` are for training, seeds at
or above it are held out.

>>> video = make_video(1_000_003)
>>> frames = video.render()            # (T, H, W, 3) uint8
>>> qa = video.questions()[0]          # QA(question=..., answer=..., kind=..., target=...)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import Pathway, PerceptionConfig
from .errors import InputError, ModelError

__all__ = [
    "COLOURS",
    "HELDOUT_SEED",
    "QA",
    "SHAPES",
    "TINY_ANSWERER_DIR",
    "TINY_GRID",
    "TINY_GUIDE_DIR",
    "VOCABULARY",
    "SceneObject",
    "SyntheticVideo",
    "answer_words",
    "grade",
    "guide_texts",
    "guided_config",
    "make_video",
    "make_videos",
    "random_guide_text",
    "render_scene",
    "shape_mask",
    "tiny_answerer",
    "tiny_config",
    "tiny_guide",
    "tiny_pipeline",
    "uniform_config",
]

#: Colour names and their RGB values: saturated hues that stay apart after yuv420p.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "purple": (165, 40, 215),
}

#: Shape names; every shape is drawn inside a ``size x size`` square.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")

#: Seeds at or above this are held out of training.
HELDOUT_SEED = 1_000_000

#: Video defaults: 60 frames at 12 fps (5 s), 64x64 pixels.
DEFAULT_NUM_FRAMES = 60
DEFAULT_FPS = 12
DEFAULT_SIZE = 64

#: Early/late: an "early" window ends by this fraction of the video, a "late" one starts after
#: ``1 - EARLY_FRACTION``.
EARLY_FRACTION = 0.45


# -- objects and videos ----------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, when it is visible, and where (drifting linearly)."""

    colour: str
    shape: str
    start: int
    """First frame where it is visible."""
    end: int
    """One past its last visible frame (half-open window)."""
    size: int
    """Side of its square footprint, pixels."""
    x: float
    """Left edge at frame ``start``, pixels."""
    y: float
    """Top edge at frame ``start``, pixels."""
    vx: float = 0.0
    """Drift per frame, pixels."""
    vy: float = 0.0

    @property
    def name(self) -> str:
        """``"red square"``."""
        return f"{self.colour} {self.shape}"

    def visible(self, frame: int) -> bool:
        """Whether the object is on screen in frame ``frame``."""
        return self.start <= frame < self.end

    def origin(self, frame: int) -> tuple[int, int]:
        """Top-left corner ``(x, y)`` in pixels at ``frame`` (defined for any frame)."""
        dt = frame - self.start
        return round(self.x + self.vx * dt), round(self.y + self.vy * dt)

    def box(self, frame: int) -> tuple[int, int, int, int]:
        """Footprint ``(x0, y0, x1, y1)`` in pixels, half-open, at ``frame``."""
        x0, y0 = self.origin(frame)
        return x0, y0, x0 + self.size, y0 + self.size

    def centre(self, frame: int) -> tuple[float, float]:
        """Centre ``(x, y)`` in pixels at ``frame``."""
        x0, y0 = self.origin(frame)
        return x0 + self.size / 2.0, y0 + self.size / 2.0

    def when(self, num_frames: int) -> str | None:
        """``"early"``, ``"late"``, or None when the window is around the middle."""
        if self.end <= EARLY_FRACTION * num_frames:
            return "early"
        if self.start >= (1.0 - EARLY_FRACTION) * num_frames:
            return "late"
        return None


@dataclass(frozen=True)
class QA:
    """A question about a video, its canonical answer word and the reply the answerer learns."""

    question: str
    answer: str
    """One word: ``yes``/``no``, a colour, a shape, ``early``/``late``."""
    kind: str
    """``presence``, ``colour``, ``shape`` or ``when``."""
    target: str | None
    """Name of the object asked about (``"red square"``), None for an absent one."""
    reply: str
    """What the answerer should write after its "In the video," prime."""
    asks: tuple[str, str] | None = None
    """The (colour, shape) a yes/no question names."""


@dataclass(frozen=True)
class SyntheticVideo:
    """One video of the world, with its ground truth. Build it with :func:`make_video`."""

    seed: int
    num_frames: int
    fps: int
    size: int
    """Frames are ``size x size``."""
    objects: tuple[SceneObject, ...]
    target: int
    """Index in ``objects`` of the object the video is about (may be brief)."""
    background_seed: int
    drift: tuple[float, float]
    """Background drift per frame, pixels (x, y)."""

    @property
    def target_object(self) -> SceneObject:
        return self.objects[self.target]

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_frames / self.fps

    def timestamp(self, frame: int) -> float:
        """Presentation time of ``frame`` in seconds."""
        return frame / self.fps

    def seconds(self, obj: SceneObject) -> tuple[float, float]:
        """When ``obj`` is visible, ``(start, end)`` in seconds."""
        return obj.start / self.fps, obj.end / self.fps

    def find(self, name: str) -> SceneObject | None:
        """The object called ``name`` ("red square"), or None."""
        for obj in self.objects:
            if obj.name == name:
                return obj
        return None

    def visible_frames(self, obj: SceneObject | str) -> np.ndarray:
        """(num_frames,) bool: where ``obj`` (or the object of that name) is visible."""
        if isinstance(obj, str):
            found = self.find(obj)
            if found is None:
                return np.zeros(self.num_frames, dtype=bool)
            obj = found
        frames = np.arange(self.num_frames)
        return (frames >= obj.start) & (frames < obj.end)

    # -- pixels ------------------------------------------------------------------------------

    def render(self, frames: np.ndarray | list[int] | None = None) -> np.ndarray:
        """The frames as ``(T, H, W, 3)`` uint8 RGB (all frames, or those listed)."""
        indices = range(self.num_frames) if frames is None else [int(i) for i in frames]
        texture = _texture(self.background_seed, self.size)
        out = np.empty((len(indices), self.size, self.size, 3), dtype=np.uint8)
        for k, i in enumerate(indices):
            objects = [o for o in self.objects if o.visible(i)]
            out[k] = render_scene(texture, self._offset(i), objects, i, self.size)
        return out

    def masks(self, frame: int) -> dict[str, np.ndarray]:
        """Per visible object name, its ``(H, W)`` float coverage (0..1) in ``frame``."""
        result = {}
        for obj in self.objects:
            if obj.visible(frame):
                result[obj.name] = _place(shape_mask(obj.shape, obj.size), obj.origin(frame), self.size)
        return result

    def _offset(self, frame: int) -> tuple[int, int]:
        margin = self.size // 2
        dx, dy = self.drift
        ox = round(margin + dx * frame) % margin
        oy = round(margin + dy * frame) % margin
        return ox, oy

    def write(self, path: str | Path, *, crf: int = 12) -> Path:
        """Write the video to ``path`` (``.mp4``: H.264, yuv420p) with PyAV; returns the path."""
        import av

        path = Path(path)
        frames = self.render()
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.width = stream.height = self.size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = Fraction(1, self.fps)
            stream.options = {"crf": str(crf)}
            for i, picture in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return path

    # -- language ----------------------------------------------------------------------------

    def captions(self, frame: int) -> list[str]:
        """Names of the objects visible in ``frame`` ("a red square")."""
        return [f"a {o.name}" for o in self.objects if o.visible(frame)]

    def questions(self) -> list[QA]:
        """Questions about this video, one per kind where the video allows it.

        ``presence`` (a present object, and an absent one that swaps a present object's
        colour and shape, so that only the binding tells them apart), ``colour`` and
        ``shape`` of the target, ``when`` (early or late) of the target when its window
        lies clearly in one half.
        """
        rng = np.random.default_rng([self.seed, 7])
        target = self.target_object
        out = [
            presence_qa(target.colour, target.shape, self.objects),
            presence_qa(*_absent_pair(self.objects, rng), self.objects),
            colour_qa(target),
            shape_qa(target),
        ]
        when = target.when(self.num_frames)
        if when is not None:
            out.append(when_qa(target, when))
        return out


def presence_qa(colour: str, shape: str, objects: tuple[SceneObject, ...]) -> QA:
    """"Is there a red square in the video?", about a video with ``objects``.

    The reply names what the key frames show, then answers: "the key frames show a red
    circle, so no." Answered in one word, the yes/no asks the language model to bind colour to
    shape among the visual tokens and compare both with the question in one step, which the
    tiny answerer never learnt; naming an object is a lookup it does learn (as for colour and
    shape questions), and the yes/no then compares words. This reply assumes the key frames
    show the object that shares most with the question (:func:`closest_object`); training
    writes it with the object its planned frames really show (:func:`presence_reply`).
    """
    present = any(o.colour == colour and o.shape == shape for o in objects)
    return QA(
        question=f"Is there a {colour} {shape} in the video?",
        answer="yes" if present else "no",
        kind="presence",
        target=f"{colour} {shape}" if present else None,
        reply=presence_reply(present, closest_object(colour, shape, objects)),
        asks=(colour, shape),
    )


def closest_object(colour: str, shape: str, objects) -> SceneObject | None:
    """The object of ``objects`` sharing most of (colour, shape), the first on a tie; None if
    there are none."""
    return max(objects, key=lambda o: (o.colour == colour) + (o.shape == shape), default=None)


def presence_reply(present: bool, shown: SceneObject | None) -> str:
    """A yes/no question's reply when the key frames show ``shown`` (None: nothing)."""
    answer = "yes" if present else "no"
    seen = f"a {shown.name}" if shown is not None else "nothing"
    return f"the key frames show {seen}, so {answer}."


def colour_qa(obj: SceneObject) -> QA:
    """"What color is the square?" """
    return QA(
        question=f"What color is the {obj.shape}?",
        answer=obj.colour,
        kind="colour",
        target=obj.name,
        reply=f"it is {obj.colour}.",
    )


def shape_qa(obj: SceneObject) -> QA:
    """"What shape is the red object?" """
    return QA(
        question=f"What shape is the {obj.colour} object?",
        answer=obj.shape,
        kind="shape",
        target=obj.name,
        reply=f"it is a {obj.shape}.",
    )


def when_qa(obj: SceneObject, when: str) -> QA:
    """"Does the red square appear early or late in the video?" """
    return QA(
        question=f"Does the {obj.name} appear early or late in the video?",
        answer=when,
        kind="when",
        target=obj.name,
        reply=f"it appears {when}.",
    )


def _absent_pair(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in objects}
    if len(objects) >= 2:
        # a hard negative: a present colour with another present object's shape
        i, j = rng.choice(len(objects), size=2, replace=False)
        return objects[i].colour, objects[j].shape
    while True:
        pair = (COLOURS_LIST[rng.integers(len(COLOURS_LIST))], SHAPES[rng.integers(len(SHAPES))])
        if pair not in present:
            return pair


COLOURS_LIST: tuple[str, ...] = tuple(COLOURS)


# -- generation ------------------------------------------------------------------------------


def make_video(
    seed: int,
    *,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    num_objects: int | None = None,
    brief: bool | None = None,
    when: str | None = None,
    target: tuple[str, str] | None = None,
) -> SyntheticVideo:
    """A video of the world, deterministic from ``seed``.

    ``num_objects`` (default 3 or 4) objects with distinct colours and distinct shapes; the
    first is the target. ``brief``: the target is visible for only a few frames (about
    5-10% of the video) — a needle; default: half the seeds. ``when``: ``"early"`` or
    ``"late"`` puts the target's window in that part of the video; default: early, late or
    anywhere, by the seed. ``target``: the target's ``(colour, shape)``, e.g. ``("red",
    "square")`` (default: by the seed). Objects visible at the same time do not overlap.
    """
    if size < 32 or size % 2:
        raise InputError(f"size must be an even number of pixels >= 32, got {size}")
    if num_frames < 8:
        raise InputError(f"num_frames must be at least 8, got {num_frames}")
    rng = np.random.default_rng([int(seed), 2410])
    n = int(num_objects if num_objects is not None else rng.integers(3, 5))
    if not 1 <= n <= len(SHAPES):
        raise InputError(f"num_objects must lie in 1..{len(SHAPES)}, got {n}")
    colours = rng.choice(len(COLOURS_LIST), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    if target is not None:
        colour, shape = target
        if colour not in COLOURS or shape not in SHAPES:
            raise InputError(f"target must be (colour, shape) from {COLOURS_LIST} x {SHAPES}, got {target!r}")
        colours = _put_first(colours, COLOURS_LIST.index(colour))
        shapes = _put_first(shapes, SHAPES.index(shape))
    if brief is None:
        brief = bool(rng.random() < 0.5)
    if when is None:
        when = ("early", "late", None)[int(rng.integers(3))]
    if when not in ("early", "late", None):
        raise InputError(f"when must be 'early', 'late' or None, got {when!r}")

    objects: list[SceneObject] = []
    for k in range(n):
        for _attempt in range(200):
            window = _window(rng, num_frames, brief=brief if k == 0 else False, when=when if k == 0 else None)
            obj = _place_object(rng, COLOURS_LIST[colours[k]], SHAPES[shapes[k]], window, size, num_frames)
            if all(not _collide(obj, other, num_frames) for other in objects):
                objects.append(obj)
                break
        else:  # pragma: no cover - 200 failures in a 64x64 frame with <= 4 objects is unseen
            raise RuntimeError(f"could not place {n} objects for seed {seed}")
    drift_angle = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(0.15, 0.45)
    return SyntheticVideo(
        seed=int(seed),
        num_frames=num_frames,
        fps=fps,
        size=size,
        objects=tuple(objects),
        target=0,
        background_seed=int(rng.integers(2**31)),
        drift=(speed * math.cos(drift_angle), speed * math.sin(drift_angle)),
    )


def _put_first(choice: np.ndarray, value: int) -> np.ndarray:
    """``choice`` with ``value`` first (swapped in if it was elsewhere, else replacing the first)."""
    out = choice.copy()
    where = np.flatnonzero(out == value)
    if where.size:
        out[where[0]] = out[0]
    out[0] = value
    return out


def make_videos(seeds: range | list[int], **kwargs) -> list[SyntheticVideo]:
    """:func:`make_video` for each seed."""
    return [make_video(s, **kwargs) for s in seeds]


def _window(rng: np.random.Generator, num_frames: int, *, brief: bool, when: str | None) -> tuple[int, int]:
    if brief:
        length = int(rng.integers(max(2, num_frames // 20), max(3, num_frames // 10) + 1))
    else:
        length = int(rng.integers(num_frames // 5, int(num_frames * 0.4) + 1))
    if when == "early":
        lo, hi = 0, int(EARLY_FRACTION * num_frames) - length
    elif when == "late":
        lo, hi = math.ceil((1 - EARLY_FRACTION) * num_frames), num_frames - length
    else:
        lo, hi = 0, num_frames - length
    start = int(rng.integers(lo, max(lo, hi) + 1))
    return start, min(num_frames, start + length)


#: Objects sit on the tiny models' 8x8 patch grid (``size // CELLS`` pixels a cell), 2x2 cells
#: each, still while visible (the background drifts): every patch an object covers then shows
#: one quarter of its outline, so a patch token can tell a square from a circle. Off-grid,
#: drifting objects of 12-17 px left single patches ambiguous (a linear probe read the shape
#: from a patch token 31-43% of the time, chance 25%) and the tiny answerer could not bind
#: colours to shapes.
CELLS = 8


def _place_object(
    rng: np.random.Generator, colour: str, shape: str, window: tuple[int, int], size: int, num_frames: int
) -> SceneObject:
    cell = size // CELLS
    side = 2 * cell
    x, y = (int(v) * cell for v in rng.integers(0, CELLS - 1, size=2))
    return SceneObject(colour=colour, shape=shape, start=window[0], end=window[1], size=side, x=float(x), y=float(y))


def _place_drifting_object(
    rng: np.random.Generator, colour: str, shape: str, window: tuple[int, int], size: int, num_frames: int
) -> SceneObject:
    """An off-grid object of 19-27% of the frame that drifts (the first version of the world)."""
    side = int(rng.integers(round(size * 0.19), round(size * 0.27) + 1))
    start, end = window
    span = max(1, end - start - 1)
    vx, vy = rng.uniform(-0.4, 0.4, size=2)
    # keep the whole trajectory inside the frame
    lo_x, hi_x = max(0.0, -vx * span), min(size - side, size - side - vx * span)
    lo_y, hi_y = max(0.0, -vy * span), min(size - side, size - side - vy * span)
    if hi_x < lo_x:
        vx, lo_x, hi_x = 0.0, 0.0, float(size - side)
    if hi_y < lo_y:
        vy, lo_y, hi_y = 0.0, 0.0, float(size - side)
    return SceneObject(
        colour=colour,
        shape=shape,
        start=start,
        end=end,
        size=side,
        x=float(rng.uniform(lo_x, hi_x)),
        y=float(rng.uniform(lo_y, hi_y)),
        vx=float(vx),
        vy=float(vy),
    )


def _collide(a: SceneObject, b: SceneObject, num_frames: int) -> bool:
    lo, hi = max(a.start, b.start), min(a.end, b.end)
    for f in range(lo, hi):
        ax0, ay0, ax1, ay1 = a.box(f)
        bx0, by0, bx1, by1 = b.box(f)
        if ax0 < bx1 + 2 and bx0 < ax1 + 2 and ay0 < by1 + 2 and by0 < ay1 + 2:
            return True
    return False


# -- rendering -------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Anti-aliased ``(size, size)`` float32 coverage of ``shape`` (4x supersampled)."""
    ss = 4
    n = size * ss
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # -1..1
    x, y = np.meshgrid(c, c)
    if shape == "square":
        inside = (np.abs(x) <= 0.86) & (np.abs(y) <= 0.86)
    elif shape == "circle":
        inside = x**2 + y**2 <= 0.97
    elif shape == "triangle":
        # apex up: y from -0.9 (top) to 0.85 (bottom); half-width grows with y
        inside = (y >= -0.9) & (y <= 0.85) & (np.abs(x) <= (y + 0.9) / 1.75 * 0.98)
    elif shape == "cross":
        inside = ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3)) & (np.abs(x) <= 0.95) & (np.abs(y) <= 0.95)
    else:
        raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)


@lru_cache(maxsize=256)
def _texture(seed: int, size: int) -> np.ndarray:
    """A ``(1.5*size, 1.5*size, 3)`` float32 background: muted smooth noise and stripes."""
    rng = np.random.default_rng([seed, 5])
    big = size + size // 2
    coarse = rng.uniform(0, 1, size=(6, 6))
    fine = rng.uniform(0, 1, size=(big // 3, big // 3))
    lum = 0.6 * _upsample(coarse, big) + 0.25 * _upsample(fine, big)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5, 14)
    stripes = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    lum = lum + rng.uniform(0.05, 0.2) * stripes
    lum = (lum - lum.min()) / max(1e-6, lum.max() - lum.min())
    low, high = rng.uniform(50, 100), rng.uniform(150, 205)
    grey = low + (high - low) * lum
    tint = rng.uniform(-1, 1, size=3)
    tint = tint / max(1e-6, np.abs(tint).max()) * rng.uniform(4, 18)
    return np.clip(grey[..., None] + tint[None, None, :], 0, 255).astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small 2-D grid to ``(size, size)``."""
    n = grid.shape[0]
    pos = np.linspace(0, n - 1, size)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (pos - i0).astype(np.float32)
    rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def _place(mask: np.ndarray, origin: tuple[int, int], size: int) -> np.ndarray:
    """``mask`` pasted at ``origin`` (x, y) into a ``(size, size)`` canvas, clipped."""
    canvas = np.zeros((size, size), dtype=np.float32)
    x0, y0 = origin
    h, w = mask.shape
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(size, x0 + w), min(size, y0 + h)
    if cx1 > cx0 and cy1 > cy0:
        canvas[cy0:cy1, cx0:cx1] = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return canvas


def render_scene(
    texture: np.ndarray,
    offset: tuple[int, int],
    objects: list[SceneObject],
    frame: int,
    size: int,
) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 frame: the texture window at ``offset`` with ``objects``
    drawn at their places in ``frame``."""
    ox, oy = offset
    image = texture[oy : oy + size, ox : ox + size].copy()
    for obj in objects:
        x0, y0 = obj.origin(frame)
        mask = shape_mask(obj.shape, obj.size)
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(size, x0 + obj.size), min(size, y0 + obj.size)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        alpha = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        region = image[cy0:cy1, cx0:cx1]
        image[cy0:cy1, cx0:cx1] = region * (1 - alpha) + colour * alpha
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# -- language for the guide ------------------------------------------------------------------

#: Templates for text that names an object by colour and shape, by shape only, by colour only.
FULL_TEMPLATES = (
    "a {c} {s}",
    "the {c} {s}",
    "{c} {s}",
    "a photo of a {c} {s}",
    "Is there a {c} {s} in the video?",
    "Does the {c} {s} appear early or late in the video?",
    "When does the {c} {s} appear?",
    "Where is the {c} {s}?",
)
SHAPE_TEMPLATES = ("a {s}", "the {s}", "What color is the {s}?", "What colour is the {s}?")
COLOUR_TEMPLATES = ("a {c} object", "the {c} shape", "What shape is the {c} object?", "something {c}")


def guide_texts() -> list[tuple[str | None, str | None]]:
    """Every query the guide learns: (colour, shape) with either part possibly None."""
    full = [(c, s) for c in COLOURS_LIST for s in SHAPES]
    return full + [(None, s) for s in SHAPES] + [(c, None) for c in COLOURS_LIST]


def random_guide_text(colour: str | None, shape: str | None, rng: np.random.Generator) -> str:
    """A text naming the query, in a random template."""
    if colour and shape:
        template = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
    elif shape:
        template = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]
    else:
        template = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
    return template.format(c=colour, s=shape)


# -- grading ---------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def answer_words(text: str) -> list[str]:
    """Lower-case words of an answer."""
    return _WORD.findall(text.lower())


def grade(qa: QA, text: str) -> bool:
    """Whether the answer ``text`` gives ``qa``'s answer and no other answer of its kind.

    ``presence``: "no"/"not" present iff the answer is no (and "yes" otherwise);
    ``colour``/``shape``/``when``: the set of colour/shape/time words is exactly the answer.
    """
    words = answer_words(text)
    if qa.kind == "presence":
        negative = any(w in ("no", "not") for w in words)
        positive = "yes" in words
        return (negative and not positive) if qa.answer == "no" else (positive and not negative)
    vocab = {"colour": COLOURS_LIST, "shape": SHAPES, "when": ("early", "late")}[qa.kind]
    return {w for w in words if w in vocab} == {qa.answer}


#: Words of every question and reply of the world (for a word-level tokenizer).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(
            answer_words(
                " ".join(
                    [
                        "is there a in the video does appear early or late what color colour shape object",
                        "yes there is no not it is a appears when where something photo of so",
                        "the key frames show nothing",
                        " ".join(COLOURS_LIST),
                        " ".join(SHAPES),
                    ]
                )
            )
        )
    )
)


# -- perception configurations for the tiny models -------------------------------------------

#: The tiny models' token grid: 64x64 frames in 8x8-pixel patches.
TINY_GRID: tuple[int, int] = (8, 8)


def tiny_config() -> PerceptionConfig:
    """The paper preset scaled to the tiny 8x8 grid: 50 frames; slow 3 guided frames and middle
    5 uniform frames, 1-D max-pooled (8x4) and RoI-cropped at r = 0.8 (7x4 = 28 tokens a frame);
    fast 50 frames at 2x2. 424 visual tokens against 3200 for all tokens of 50 frames (13%; the
    paper keeps 2648 of 28,800, 9%). The paper's own fast 4x4 would pool an 8x8 grid only 4x
    (1024 tokens, 32%)."""
    paper = PerceptionConfig.paper()
    return PerceptionConfig(
        num_frames=paper.num_frames,
        slow=paper.slow,
        middle=paper.middle,
        fast=Pathway("fast", paper.fast.num_frames, "guided", "adaptive_avg", output_grid=(2, 2)),
    )


def guided_config(num_frames: int, *, sampled: int = 50) -> PerceptionConfig:
    """Prompt-guided temporal selection alone: the ``num_frames`` best-scoring of ``sampled``
    frames, in time order, with all their tokens (the counterpart of :func:`uniform_config`)."""
    return PerceptionConfig(
        num_frames=sampled,
        slow=Pathway("slow", num_frames, "guided", "none"),
        middle=Pathway("middle", 0, "uniform", "none"),
        fast=Pathway("fast", 0, "guided", "adaptive_avg", output_grid=(1, 1)),
    )


def uniform_config(num_frames: int, *, sampled: int = 50) -> PerceptionConfig:
    """Uniform sampling: ``num_frames`` evenly spaced of ``sampled`` frames, all their tokens."""
    return PerceptionConfig(
        num_frames=sampled,
        slow=Pathway("slow", 0, "guided", "none"),
        middle=Pathway("middle", num_frames, "uniform", "none"),
        fast=Pathway("fast", 0, "guided", "adaptive_avg", output_grid=(1, 1)),
    )


# -- the tiny trained models -----------------------------------------------------------------

#: The tiny models trained on this world (``scripts/train_tiny_guide.py``,
#: ``scripts/train_tiny_answerer.py``), shipped with the package.
TINY_GUIDE_DIR = Path(__file__).resolve().parent / "assets" / "tiny_guide"
TINY_ANSWERER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_answerer"


def _asset(path: Path, script: str) -> str:
    if not path.is_dir():
        msg = (
            f"the tiny model {path.name!r} is not at {path}; it ships with freevllm-tools' "
            f"source tree — regenerate it with `python {script}`"
        )
        raise ModelError(msg)
    return str(path)


def tiny_guide(device: str | None = "cpu"):
    """The tiny CLIP guide trained on this world (64x64 frames, 8x8 patches), loaded through
    :meth:`ClipGuide.from_pretrained` like any open_clip directory."""
    from .guide import ClipGuide

    return ClipGuide.from_pretrained(_asset(TINY_GUIDE_DIR, "scripts/train_tiny_guide.py"), device=device)


def tiny_answerer(device: str | None = "cpu"):
    """The tiny LLaVA-NeXT answerer trained on this world, loaded through
    :meth:`LlavaAnswerer.from_pretrained` like any transformers directory."""
    from .answerer import LlavaAnswerer

    path = _asset(TINY_ANSWERER_DIR, "scripts/train_tiny_answerer.py")
    return LlavaAnswerer.from_pretrained(path, device=device)


def tiny_pipeline(config: PerceptionConfig | str | None = None, *, cache=None, device: str | None = "cpu"):
    """A :class:`~freevllm_tools.pipeline.FreeVideoLLM` on the tiny models, with
    :func:`tiny_config` unless ``config`` is given: runs offline in about a second a question."""
    from .pipeline import FreeVideoLLM

    return FreeVideoLLM(
        guide=tiny_guide(device),
        answerer=tiny_answerer(device),
        config=config if config is not None else tiny_config(),
        cache=cache,
        max_new_tokens=16,
    )
