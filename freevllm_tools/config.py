"""Perception configuration: which frames and which tokens each pathway keeps.

Pure Python (no torch): the token arithmetic here is what the pipeline plans with and what
the benchmarks report. The paper's default (Free Video-LLM, arXiv 2410.10441) is
``PerceptionConfig.paper()``; the reference implementation's one-string form,
``slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4``,
is accepted by :meth:`PerceptionConfig.from_reference_string`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import ConfigError

__all__ = [
    "Pathway",
    "PerceptionConfig",
    "POOLINGS",
    "pooled_grid",
    "roi_box_size",
    "middle_indices",
    "sample_frame_indices",
    "list_presets",
]

Grid = tuple[int, int]
Selection = Literal["guided", "uniform"]

#: Pooling names, with the reference's spelling for the string form.
POOLINGS: dict[str, str] = {
    "max_pool_1d": "spatial_1d_max_pool",
    "avg_pool_1d": "spatial_1d_avg_pool",
    "max_pool_2d": "spatial_2d_max_pool",
    "avg_pool_2d": "spatial_2d_avg_pool",
    "none": "concat",
    "adaptive_avg": "adaptive_2d_pool",
}
_REFERENCE_POOLINGS = {v: k for k, v in POOLINGS.items()}


def pooled_grid(grid: Grid, pooling: str, output_grid: Grid | None = None) -> Grid:
    """The (rows, columns) a frame's token grid has after ``pooling``.

    1-D pools merge horizontal neighbours within a row (24x24 -> 24x12); an odd width keeps
    its last column alone (27x27 -> 27x14). 2-D pools halve both sides, rounding up.
    ``adaptive_avg`` gives ``output_grid``, never larger than the input grid.
    """
    h, w = grid
    if h < 1 or w < 1:
        raise ConfigError(f"token grid must be at least 1x1, got {h}x{w}")
    if pooling in ("max_pool_1d", "avg_pool_1d"):
        return h, -(-w // 2)
    if pooling in ("max_pool_2d", "avg_pool_2d"):
        return -(-h // 2), -(-w // 2)
    if pooling == "none":
        return h, w
    if pooling == "adaptive_avg":
        if output_grid is None:
            raise ConfigError("pooling 'adaptive_avg' needs an output_grid, e.g. (4, 4)")
        return min(output_grid[0], h), min(output_grid[1], w)
    raise ConfigError(f"unknown pooling {pooling!r}; expected one of {sorted(POOLINGS)}")


def roi_box_size(grid: Grid, ratio: float) -> Grid:
    """Rows and columns of the RoI box on ``grid`` for ``ratio`` (DESIGN.md §1).

    ``round(h*sqrt(r)) x round(w*sqrt(r))``, at least 1x1 and at most the grid:
    24x12 with r = 0.8 gives 21x11 = 231 tokens.
    """
    h, w = grid
    if ratio >= 1.0:
        return h, w
    s = math.sqrt(ratio)
    return max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))


def sample_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames, each the middle of one of equal segments.

    ``seg = (N - 1) / T; idx_i = (round(seg*i) + round(seg*(i+1))) // 2``. A video with
    fewer frames than asked gives each of its frames once.
    """
    if num_video_frames < 1:
        return []
    if num_frames < 1:
        raise ConfigError(f"num_frames must be at least 1, got {num_frames}")
    if num_video_frames <= num_frames:
        return list(range(num_video_frames))
    seg = (num_video_frames - 1) / num_frames
    return [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(num_frames)]


def middle_indices(num_frames: int, count: int) -> list[int]:
    """The middle pathway's evenly spaced positions: ``int(linspace(0, T, count+1))[:-1]``.

    (0, 10, 20, 30, 40) for T = 50, count = 5. With fewer frames than ``count`` the rule
    repeats frames; repeats are dropped, so a 3-frame video gives (0, 1, 2).
    """
    if count < 1 or num_frames < 1:
        return []
    positions = [int(num_frames * i / count) for i in range(count)]
    return sorted(set(positions))


@dataclass(frozen=True)
class Pathway:
    """One pathway: which frames it keeps and how it reduces each frame's tokens."""

    name: str
    """``slow``, ``middle`` or ``fast`` (free text for custom configurations)."""
    num_frames: int
    """Frames kept; fewer when the video has fewer. 0 switches the pathway off."""
    selection: Selection
    """``guided``: the best-scoring frames for the question, kept in time order (all frames
    when ``num_frames`` covers them); ``uniform``: evenly spaced frames."""
    pooling: str = "max_pool_1d"
    """One of :data:`POOLINGS`."""
    output_grid: Grid | None = None
    """Grid after ``adaptive_avg`` pooling, e.g. (4, 4)."""
    roi_ratio: float = 1.0
    """Fraction of the pooled grid the RoI box keeps; 1.0 keeps everything (no crop)."""

    def __post_init__(self) -> None:
        if self.num_frames < 0:
            raise ConfigError(f"pathway {self.name!r}: num_frames must be >= 0, got {self.num_frames}")
        if self.selection not in ("guided", "uniform"):
            raise ConfigError(
                f"pathway {self.name!r}: selection must be 'guided' or 'uniform', got {self.selection!r}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"pathway {self.name!r}: unknown pooling {self.pooling!r}; expected one of {sorted(POOLINGS)}"
            )
        if self.pooling == "adaptive_avg":
            if self.output_grid is None or min(self.output_grid) < 1:
                raise ConfigError(
                    f"pathway {self.name!r}: adaptive_avg needs an output_grid of positive sizes, "
                    f"got {self.output_grid}"
                )
        if not (0.0 < self.roi_ratio <= 1.0):
            raise ConfigError(
                f"pathway {self.name!r}: roi_ratio must lie in (0, 1], got {self.roi_ratio}"
            )

    @property
    def crops(self) -> bool:
        """Whether this pathway crops a region of interest."""
        return self.roi_ratio < 1.0

    def frame_grid(self, grid: Grid) -> Grid:
        """The grid of one kept frame after pooling and RoI cropping."""
        pooled = pooled_grid(grid, self.pooling, self.output_grid)
        return roi_box_size(pooled, self.roi_ratio) if self.crops else pooled

    def frames_kept(self, num_frames: int) -> int:
        """How many frames this pathway keeps out of ``num_frames`` sampled ones."""
        if self.selection == "uniform":
            return len(middle_indices(num_frames, self.num_frames))
        return min(self.num_frames, num_frames)

    def num_tokens(self, grid: Grid, num_frames: int) -> int:
        """Visual tokens this pathway contributes for ``num_frames`` sampled frames."""
        h, w = self.frame_grid(grid)
        return self.frames_kept(num_frames) * h * w


_REFERENCE_RE = re.compile(
    r"^slow_(\d+)frms_(\w+?)_roi(\d+)"
    r"-middle_(\d+)frms_(\w+?)_(\d+)x(\d+)"
    r"-fast_(\d+)frms_(\d+)x(\d+)$"
)


@dataclass(frozen=True)
class PerceptionConfig:
    """How many frames to sample and what each pathway keeps of them.

    The pathways' visual tokens are concatenated in the order slow | middle | fast.
    """

    num_frames: int = 50
    """Frames sampled from the video (fewer when it is shorter)."""
    slow: Pathway = field(
        default_factory=lambda: Pathway("slow", 3, "guided", "max_pool_1d", roi_ratio=0.8)
    )
    middle: Pathway = field(
        default_factory=lambda: Pathway("middle", 5, "uniform", "max_pool_1d", roi_ratio=0.8)
    )
    fast: Pathway = field(
        default_factory=lambda: Pathway("fast", 50, "guided", "adaptive_avg", output_grid=(4, 4))
    )

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be at least 1, got {self.num_frames}")
        if not any(p.num_frames for p in self.pathways):
            raise ConfigError("every pathway is switched off (0 frames): no visual token would remain")

    # -- presets -------------------------------------------------------------------------

    @classmethod
    def paper(cls) -> PerceptionConfig:
        """The reference default of Free Video-LLM: 2648 visual tokens for 50 frames at 24x24."""
        return cls()

    @classmethod
    def slowfast_llava(cls) -> PerceptionConfig:
        """SlowFast-LLaVA's default (no guidance, no RoI): 10 slow frames at 24x12 plus
        50 fast frames at 4x4, 3680 tokens."""
        return cls(
            num_frames=50,
            slow=Pathway("slow", 10, "uniform", "max_pool_1d"),
            middle=Pathway("middle", 0, "uniform", "max_pool_1d"),
            fast=Pathway("fast", 50, "guided", "adaptive_avg", output_grid=(4, 4)),
        )

    @classmethod
    def uniform(cls, num_frames: int = 8) -> PerceptionConfig:
        """Plain image-LLM video input: ``num_frames`` uniform frames with all their tokens."""
        return cls(
            num_frames=num_frames,
            slow=Pathway("slow", 0, "guided", "max_pool_1d"),
            middle=Pathway("middle", num_frames, "uniform", "none"),
            fast=Pathway("fast", 0, "guided", "adaptive_avg", output_grid=(4, 4)),
        )

    @classmethod
    def from_preset(cls, name: str) -> PerceptionConfig:
        """A preset by name (see :func:`list_presets`), or a reference string."""
        key = name.strip()
        if key in _PRESETS:
            return _PRESETS[key]()
        if key.startswith("slow_"):
            return cls.from_reference_string(key)
        raise ConfigError(
            f"unknown preset {name!r}; expected one of {list_presets()} "
            "or a reference string such as "
            "'slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4'"
        )

    # -- the reference's string form -----------------------------------------------------

    @classmethod
    def from_reference_string(cls, text: str, num_frames: int = 50) -> PerceptionConfig:
        """Parse the reference implementation's configuration string.

        ``num_frames`` is the number of frames sampled (the reference's ``NUM_FRAMES``, 50).

        The RoI ratio (``roiN`` = N/10) applies to the slow and middle pathways, as in the
        reference. The middle pathway's ``HxW`` states its pooled grid; it is derived from
        the vision tower's grid here, so any value is accepted.
        """
        match = _REFERENCE_RE.match(text.strip())
        if not match:
            raise ConfigError(
                f"cannot parse reference string {text!r}; expected the form "
                "'slow_<N>frms_<pooling>_roi<R>-middle_<N>frms_<pooling>_<H>x<W>-fast_<N>frms_<H>x<W>'"
            )
        (slow_n, slow_pool, roi, mid_n, mid_pool, _mh, _mw, fast_n, fast_h, fast_w) = match.groups()
        ratio = int(roi) / 10.0
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"reference string {text!r}: roi{roi} is outside roi1..roi10")
        pools = []
        for pool in (slow_pool, mid_pool):
            if pool not in _REFERENCE_POOLINGS:
                raise ConfigError(
                    f"reference string {text!r}: unknown pooling {pool!r}; "
                    f"expected one of {sorted(_REFERENCE_POOLINGS)}"
                )
            pools.append(_REFERENCE_POOLINGS[pool])
        fast_frames = int(fast_n)
        return cls(
            num_frames=num_frames,
            slow=Pathway("slow", int(slow_n), "guided", pools[0], roi_ratio=ratio),
            middle=Pathway("middle", int(mid_n), "uniform", pools[1], roi_ratio=ratio),
            fast=Pathway(
                "fast", fast_frames, "guided", "adaptive_avg", output_grid=(int(fast_h), int(fast_w))
            ),
        )

    def to_reference_string(self, grid: Grid = (24, 24)) -> str:
        """This configuration in the reference's string form (the inverse of the parser)."""
        slow, middle, fast = self.slow, self.middle, self.fast
        ratio10 = round(slow.roi_ratio * 10)
        representable = (
            slow.selection == "guided"
            and middle.selection == "uniform"
            and fast.selection == "guided"
            and fast.pooling == "adaptive_avg"
            and slow.roi_ratio == middle.roi_ratio
            and abs(slow.roi_ratio * 10 - ratio10) < 1e-9
            and slow.pooling != "adaptive_avg"
            and middle.pooling != "adaptive_avg"
        )
        if not representable:
            raise ConfigError(
                "this configuration has no reference-string form (the reference fixes guided slow, "
                "uniform middle, adaptive fast and one RoI ratio in tenths)"
            )
        mh, mw = pooled_grid(grid, middle.pooling)
        fh, fw = fast.output_grid or (4, 4)
        return (
            f"slow_{slow.num_frames}frms_{POOLINGS[slow.pooling]}_roi{ratio10}"
            f"-middle_{middle.num_frames}frms_{POOLINGS[middle.pooling]}_{mh}x{mw}"
            f"-fast_{fast.num_frames}frms_{fh}x{fw}"
        )

    # -- arithmetic ----------------------------------------------------------------------

    @property
    def pathways(self) -> tuple[Pathway, Pathway, Pathway]:
        """The pathways in the order their tokens are concatenated."""
        return (self.slow, self.middle, self.fast)

    def tokens_per_pathway(self, grid: Grid = (24, 24), num_frames: int | None = None) -> dict[str, int]:
        """Visual tokens per pathway for a ``grid`` of patch tokens and ``num_frames`` frames."""
        t = self.num_frames if num_frames is None else min(num_frames, self.num_frames)
        if t < 0:
            raise ConfigError(f"num_frames must be >= 0, got {num_frames}")
        return {p.name: p.num_tokens(grid, t) for p in self.pathways}

    def num_visual_tokens(self, grid: Grid = (24, 24), num_frames: int | None = None) -> int:
        """Total visual tokens handed to the language model.

        ``PerceptionConfig.paper().num_visual_tokens(grid=(24, 24), num_frames=50) == 2648``.
        """
        return sum(self.tokens_per_pathway(grid, num_frames).values())

    @classmethod
    def for_budget(
        cls, max_tokens: int, num_frames: int = 50, grid: Grid = (24, 24)
    ) -> PerceptionConfig:
        """A configuration that spends at most ``max_tokens`` visual tokens.

        It keeps the paper preset's split between the slow, middle and fast pathways as far
        as whole frames allow: 2648 tokens give back the paper preset. One token per sampled
        frame is reserved for the fast pathway; budgets too small for a slow or middle frame
        leave the fast pathway alone, pooled as finely as the budget allows.
        """
        if num_frames < 1:
            raise ConfigError(f"num_frames must be at least 1, got {num_frames}")
        if max_tokens < num_frames:
            raise ConfigError(
                f"a budget of {max_tokens} visual tokens is below one token per frame for "
                f"{num_frames} frames; raise the budget or sample fewer frames"
            )
        paper = replace(cls.paper(), num_frames=num_frames)
        shares = paper.tokens_per_pathway(grid, num_frames)
        total = sum(shares.values())
        slow_cost = math.prod(paper.slow.frame_grid(grid))
        middle_cost = math.prod(paper.middle.frame_grid(grid))
        slow_n = min(num_frames, max_tokens * shares["slow"] // total // slow_cost)
        middle_n = min(num_frames, max_tokens * shares["middle"] // total // middle_cost)
        while slow_n * slow_cost + middle_n * middle_cost > max_tokens - num_frames:
            if middle_n >= slow_n and middle_n > 0:
                middle_n -= 1
            else:
                slow_n -= 1
        remaining = max_tokens - slow_n * slow_cost - middle_n * middle_cost
        side = max(1, math.isqrt(remaining // num_frames))
        side = min(side, *grid)
        return replace(
            paper,
            slow=replace(paper.slow, num_frames=slow_n),
            middle=replace(paper.middle, num_frames=middle_n),
            fast=replace(paper.fast, num_frames=num_frames, output_grid=(side, side)),
        )


_PRESETS = {
    "paper": PerceptionConfig.paper,
    "slowfast-llava": PerceptionConfig.slowfast_llava,
    "uniform-8": lambda: PerceptionConfig.uniform(8),
}


def list_presets() -> list[str]:
    """Names accepted by :meth:`PerceptionConfig.from_preset`."""
    return sorted(_PRESETS)
