"""Perception: which frames and which tokens of them reach the language model.

Pure tensor operations (no model, no I/O) implementing Free Video-LLM's token reduction
(DESIGN.md §1): prompt-guided temporal frame selection, per-frame pooling and a
prompt-guided region-of-interest (RoI) crop, for three pathways concatenated as
``slow | middle | fast``.

The work is split in two so that provenance is explicit:

* :func:`plan` decides, from the *guide* features (CLIP pooled + dense embeddings and the
  question's text embedding), which frames each pathway keeps and which box of each kept
  frame's pooled grid it crops. A :class:`Plan` is small, inspectable and renderable.
* :func:`gather` applies a plan to the *LLM-side* frame tokens ``(T, h, w, D)`` and returns
  the visual sequence ``(N, D)`` on their device and dtype.

:func:`perceive` does both.

Difference from the reference (``contrastive/FreeVideoLLM``): the reference lays the 288
tokens of a 1-D-pooled 24x24 frame out as 12 rows x 24 columns when it computes the RoI box,
which puts two pooled rows side by side. Here the pooled grid keeps its true geometry,
24 rows x 12 columns (the pairs are horizontal neighbours within a row); the token count
(21 x 11 = 231 a frame at ratio 0.8) is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import Grid, Pathway, PerceptionConfig, middle_indices, pooled_grid, roi_box_size
from .errors import ConfigError, InputError, ModelError

__all__ = [
    "Box",
    "PathwayPlan",
    "Plan",
    "Perception",
    "frame_scores",
    "select_top_frames",
    "select_frames",
    "pool_tokens",
    "token_scores",
    "roi_box",
    "roi_boxes",
    "crop",
    "plan",
    "gather",
    "perceive",
]


# -- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A region of interest in grid cells, half-open: rows ``top:bottom``, columns ``left:right``.

    The grid is the *pooled* grid of the pathway the box belongs to (``PathwayPlan.grid``).
    """

    top: int
    left: int
    bottom: int
    right: int

    def __post_init__(self) -> None:
        if self.top < 0 or self.left < 0 or self.bottom <= self.top or self.right <= self.left:
            msg = (
                f"invalid box (top={self.top}, left={self.left}, bottom={self.bottom}, "
                f"right={self.right}): expected 0 <= top < bottom and 0 <= left < right"
            )
            raise InputError(msg)

    @property
    def height(self) -> int:
        """Rows of the box."""
        return self.bottom - self.top

    @property
    def width(self) -> int:
        """Columns of the box."""
        return self.right - self.left

    @property
    def num_cells(self) -> int:
        """Tokens the box keeps: ``height * width``."""
        return self.height * self.width

    def fits(self, grid: Grid) -> bool:
        """Whether the box lies inside a ``(rows, columns)`` grid."""
        return self.bottom <= grid[0] and self.right <= grid[1]

    def to_pixels(self, grid: Grid, frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The box in the original frame's pixels, ``(x0, y0, x1, y1)`` half-open.

        ``grid`` is the ``(rows, columns)`` grid the box lives on (the pathway's pooled grid);
        ``frame_size`` is the frame's ``(width, height)``. The pixel box covers every cell of
        the box: edges are rounded outwards.
        """
        rows, cols = grid
        width, height = frame_size
        if rows < 1 or cols < 1 or width < 1 or height < 1:
            msg = f"to_pixels needs a positive grid and frame size, got grid={grid}, frame_size={frame_size}"
            raise InputError(msg)
        if not self.fits(grid):
            msg = f"box {self} does not lie inside the {rows}x{cols} grid it was given"
            raise InputError(msg)
        x0 = self.left * width // cols
        y0 = self.top * height // rows
        x1 = -(-self.right * width // cols)
        y1 = -(-self.bottom * height // rows)
        return x0, y0, x1, y1

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)``."""
        return self.top, self.left, self.bottom, self.right


@dataclass
class PathwayPlan:
    """What one pathway keeps: its frames, its pooled grid and one box per frame."""

    name: str
    frames: list[int]
    """Positions in the sampled frames, in time order."""
    grid: Grid
    """Pooled grid of one frame, before the crop."""
    boxes: list[Box | None]
    """One RoI box per kept frame (on ``grid``), or ``None`` where the pathway keeps the
    whole pooled grid."""
    num_tokens: int
    """Visual tokens this pathway contributes."""
    pooling: str = "none"
    """How each frame's tokens are pooled (one of ``config.POOLINGS``)."""
    output_grid: Grid | None = None
    """Target grid of ``adaptive_avg`` pooling."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for provenance and logs)."""
        return {
            "name": self.name,
            "frames": list(self.frames),
            "grid": list(self.grid),
            "boxes": [None if b is None else list(b.as_tuple()) for b in self.boxes],
            "num_tokens": self.num_tokens,
            "pooling": self.pooling,
            "output_grid": None if self.output_grid is None else list(self.output_grid),
        }


@dataclass
class Plan:
    """Every pathway's frames and boxes, in concatenation order (slow | middle | fast)."""

    pathways: dict[str, PathwayPlan]
    frame_scores: torch.Tensor
    """(T,) float32 on the CPU: cosine of each frame's pooled guide embedding with the text."""
    num_tokens: int
    """Total visual tokens (the sum over pathways)."""
    grid: Grid | None = None
    """The LLM-side token grid of one frame the plan was made for."""
    num_frames: int | None = None
    """T, the number of sampled frames the plan was made for."""

    @property
    def key_frames(self) -> list[int]:
        """Frame positions of the most detailed pathway that keeps any (slow, else middle,
        else fast): the frames the prompt's timing sentence names."""
        return next((list(p.frames) for p in self.pathways.values() if p.frames), [])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for provenance and logs)."""
        return {
            "pathways": {name: p.to_dict() for name, p in self.pathways.items()},
            "frame_scores": [float(s) for s in self.frame_scores.tolist()],
            "num_tokens": self.num_tokens,
            "grid": None if self.grid is None else list(self.grid),
            "num_frames": self.num_frames,
        }


@dataclass
class Perception:
    """The visual sequence for the language model and the plan that chose it."""

    tokens: torch.Tensor
    """(N, D) on the frame tokens' device and dtype, slow | middle | fast."""
    plan: Plan

    @property
    def pathways(self) -> dict[str, PathwayPlan]:
        """The plan's pathways, in concatenation order."""
        return self.plan.pathways

    @property
    def num_tokens(self) -> int:
        """N, the number of visual tokens."""
        return self.plan.num_tokens

    @property
    def frame_scores(self) -> torch.Tensor:
        """(T,) frame relevance scores (CPU float32)."""
        return self.plan.frame_scores


# -- scores and selection ----------------------------------------------------------------


def _text_vector(text_embedding: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    if text_embedding.dim() == 2 and text_embedding.shape[0] == 1:
        text_embedding = text_embedding[0]
    if text_embedding.dim() != 1 or text_embedding.shape[0] != dim:
        msg = (
            f"text embedding has shape {tuple(text_embedding.shape)}; expected ({dim},) or (1, {dim}) "
            f"to match the {what}"
        )
        raise ModelError(msg)
    return text_embedding.float()


def frame_scores(text_embedding: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the text with each frame's pooled embedding.

    ``text_embedding`` (D,) or (1, D); ``pooled`` (T, D). Returns (T,) float32 on
    ``pooled``'s device.
    """
    if pooled.dim() != 2:
        msg = f"pooled frame embeddings have shape {tuple(pooled.shape)}; expected (T, D)"
        raise ModelError(msg)
    text = _text_vector(text_embedding, pooled.shape[1], f"pooled embeddings {tuple(pooled.shape)}")
    text = text.to(pooled.device)
    return F.cosine_similarity(pooled.float(), text.unsqueeze(0), dim=-1)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` (1-D) best first; ties go to the earlier index; NaN ranks last."""
    clean = torch.nan_to_num(scores.float(), nan=float("-inf"))
    return torch.sort(clean, descending=True, stable=True).indices


def select_top_frames(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` best-scoring frames, returned in time order.

    Ties go to the earlier frame. ``k >= T`` gives every frame; ``k == 0`` none.
    """
    if scores.dim() != 1:
        msg = f"frame scores have shape {tuple(scores.shape)}; expected (T,)"
        raise ModelError(msg)
    if k < 0:
        msg = f"cannot select {k} frames; expected k >= 0"
        raise InputError(msg)
    total = scores.shape[0]
    if k >= total:
        return list(range(total))
    return sorted(_rank(scores)[:k].tolist())


def select_frames(pathway: Pathway, scores: torch.Tensor) -> list[int]:
    """The frames ``pathway`` keeps out of ``T = len(scores)``, in time order.

    ``guided``: the ``num_frames`` best-scoring frames (all of them when ``num_frames >= T``);
    ``uniform``: :func:`freevllm_tools.config.middle_indices`.
    """
    if pathway.num_frames == 0:
        return []
    if pathway.selection == "uniform":
        return middle_indices(scores.shape[0], pathway.num_frames)
    return select_top_frames(scores, pathway.num_frames)


# -- pooling -----------------------------------------------------------------------------


def _pad_odd(tokens: torch.Tensor, dim: int) -> torch.Tensor:
    """Repeat the last slice along ``dim`` when its size is odd (a pair of x with itself
    pools to x, for max and mean alike)."""
    if tokens.shape[dim] % 2 == 0:
        return tokens
    last = tokens.narrow(dim, tokens.shape[dim] - 1, 1)
    return torch.cat([tokens, last], dim=dim)


def pool_tokens(tokens: torch.Tensor, pooling: str, output_grid: Grid | None = None) -> torch.Tensor:
    """Pool each frame's token grid: ``(T, h, w, D) -> (T, h', w', D)``.

    * ``max_pool_1d`` / ``avg_pool_1d``: horizontal neighbours within a row, pairs (0, 1),
      (2, 3), ...; for even ``w`` this equals the reference's kernel-2 stride-2 pool over the
      flattened row-major token axis (24x24 -> 24x12). An odd ``w`` keeps its last column
      alone (27 -> 14).
    * ``max_pool_2d`` / ``avg_pool_2d``: 2x2 blocks, an odd side's last row/column alone
      (ceil).
    * ``adaptive_avg``: ``torch.nn.functional.adaptive_avg_pool2d`` to ``output_grid``
      (clamped to the input grid).
    * ``none``: unchanged.

    The result's grid is :func:`freevllm_tools.config.pooled_grid`. Runs in the tokens'
    device and dtype.
    """
    if tokens.dim() != 4:
        msg = f"tokens have shape {tuple(tokens.shape)}; expected (T, h, w, D)"
        raise ModelError(msg)
    t, h, w, d = tokens.shape
    target = pooled_grid((h, w), pooling, output_grid)  # validates pooling and output_grid
    if pooling == "none":
        return tokens
    if pooling in ("max_pool_1d", "avg_pool_1d"):
        x = _pad_odd(tokens, 2)
        x = x.reshape(t, h, x.shape[2] // 2, 2, d)
        return x.amax(dim=3) if pooling == "max_pool_1d" else x.mean(dim=3)
    if pooling in ("max_pool_2d", "avg_pool_2d"):
        x = _pad_odd(_pad_odd(tokens, 1), 2)
        x = x.reshape(t, x.shape[1] // 2, 2, x.shape[2] // 2, 2, d)
        return x.amax(dim=(2, 4)) if pooling == "max_pool_2d" else x.mean(dim=(2, 4))
    # adaptive_avg: a (T, D, h, w) view of (T, h, w, D) is channels-last, pooled without a copy
    pooled = F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), target)
    return pooled.permute(0, 2, 3, 1)


def token_scores(text_embedding: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the text with every token: ``(T, h, w, D) -> (T, h, w)`` float32."""
    if dense.dim() != 4:
        msg = f"dense tokens have shape {tuple(dense.shape)}; expected (T, h, w, D)"
        raise ModelError(msg)
    text = _text_vector(text_embedding, dense.shape[-1], f"dense tokens {tuple(dense.shape)}")
    return F.cosine_similarity(dense.float(), text.to(dense.device), dim=-1)


# -- region of interest ------------------------------------------------------------------


def roi_boxes(scores: torch.Tensor, ratio: float) -> list[Box]:
    """One RoI box per frame for scores ``(T, h, w)``; see :func:`roi_box`."""
    if scores.dim() != 3:
        msg = f"token scores have shape {tuple(scores.shape)}; expected (T, h, w)"
        raise ModelError(msg)
    t, h, w = scores.shape
    if not 0.0 < ratio <= 1.0:
        msg = f"RoI ratio must lie in (0, 1], got {ratio}"
        raise ConfigError(msg)
    box_h, box_w = roi_box_size((h, w), ratio)
    if t == 0:
        return []
    if (box_h, box_w) == (h, w):
        return [Box(0, 0, h, w)] * t
    # the top int(h*w*r) tokens (at least one); stable sort: ties go to the earlier token
    k = max(1, int(h * w * ratio))
    flat = torch.nan_to_num(scores.reshape(t, h * w).float(), nan=float("-inf"))
    top = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    # integer means, truncated as the reference's ``.to(torch.int32)`` (indices are >= 0,
    # so truncation is floor); exact integer sums avoid float32 rounding at .999...
    x_sums = (top % w).sum(dim=1).tolist()
    y_sums = (top // w).sum(dim=1).tolist()
    boxes = []
    for x_sum, y_sum in zip(x_sums, y_sums):
        left = min(max(x_sum // k - box_w // 2, 0), w - box_w)
        top_row = min(max(y_sum // k - box_h // 2, 0), h - box_h)
        boxes.append(Box(top_row, left, top_row + box_h, left + box_w))
    return boxes


def roi_box(scores: torch.Tensor, ratio: float) -> Box:
    """The RoI box of one frame's token scores ``(h, w)`` at ``ratio`` (DESIGN.md §1).

    Take the top ``int(h*w*ratio)`` tokens (ties: earlier row-major token first); the centre
    is the truncated integer mean of their column (x) and row (y); the box is
    ``config.roi_box_size((h, w), ratio)``, with ``left = x_mean - box_w // 2`` and
    ``top = y_mean - box_h // 2``, shifted to lie inside the grid.
    """
    if scores.dim() != 2:
        msg = f"token scores have shape {tuple(scores.shape)}; expected (h, w)"
        raise ModelError(msg)
    return roi_boxes(scores.unsqueeze(0), ratio)[0]


def crop(tokens: torch.Tensor, box: Box) -> torch.Tensor:
    """The tokens inside ``box``, row-major: ``(h, w, D) -> (box.height * box.width, D)``."""
    if tokens.dim() != 3:
        msg = f"tokens have shape {tuple(tokens.shape)}; expected (h, w, D)"
        raise ModelError(msg)
    h, w, d = tokens.shape
    if not box.fits((h, w)):
        msg = f"box {box} does not lie inside the {h}x{w} token grid"
        raise ModelError(msg)
    return tokens[box.top : box.bottom, box.left : box.right].reshape(-1, d)


# -- plan, gather, perceive --------------------------------------------------------------


def _check_grid(grid: Sequence[int]) -> Grid:
    if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
        msg = f"token grid must be two positive integers (rows, columns), got {grid!r}"
        raise ConfigError(msg)
    return int(grid[0]), int(grid[1])


def _dense_on_grid(dense: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Guide dense tokens ``(k, hg, wg, D)`` brought to ``grid``: bilinear interpolation of
    the features, then L2 re-normalisation. Unchanged when the grids agree."""
    if tuple(dense.shape[1:3]) == grid:
        return dense
    downsizing = dense.shape[1] > grid[0] or dense.shape[2] > grid[1]
    resized = F.interpolate(
        dense.permute(0, 3, 1, 2),
        size=grid,
        mode="bilinear",
        align_corners=False,
        antialias=downsizing,
    )
    return F.normalize(resized.permute(0, 2, 3, 1), dim=-1)


def plan(
    config: PerceptionConfig,
    guide_pooled: torch.Tensor,
    guide_dense: torch.Tensor | None,
    text_embedding: torch.Tensor,
    grid: Grid,
) -> Plan:
    """Choose every pathway's frames and RoI boxes from the guide features.

    ``guide_pooled`` (T, Dg) and ``guide_dense`` (T, hg, wg, Dg) are the CLIP guide's
    embeddings of the T sampled frames, ``text_embedding`` (Dg,) the question's; ``grid``
    is the LLM-side ``(h, w)`` token grid of one frame. For a cropping pathway the kept
    frames' dense guide tokens are brought to ``grid`` (bilinear, re-normalised) when the
    grids differ, pooled the same way as the pathway's tokens, scored against the text,
    and each frame's box computed by :func:`roi_box`. ``guide_dense`` may be ``None`` when
    no pathway crops. Scores are computed in float32 on the guide tensors' device.
    """
    grid = _check_grid(grid)
    if guide_pooled.dim() != 2:
        msg = f"guide pooled embeddings have shape {tuple(guide_pooled.shape)}; expected (T, D)"
        raise ModelError(msg)
    num_frames, dim = guide_pooled.shape
    if num_frames < 1:
        msg = "no frames: guide pooled embeddings have shape (0, D); at least one frame is needed"
        raise ModelError(msg)
    if guide_dense is not None:
        if guide_dense.dim() != 4:
            msg = f"guide dense tokens have shape {tuple(guide_dense.shape)}; expected (T, h, w, D)"
            raise ModelError(msg)
        if guide_dense.shape[0] != num_frames or guide_dense.shape[3] != dim:
            msg = (
                f"guide dense tokens {tuple(guide_dense.shape)} do not match guide pooled "
                f"embeddings {tuple(guide_pooled.shape)}: expected ({num_frames}, h, w, {dim})"
            )
            raise ModelError(msg)
    scores = frame_scores(text_embedding, guide_pooled)

    pathways: dict[str, PathwayPlan] = {}
    for pathway in config.pathways:
        frames = select_frames(pathway, scores)
        pooled = pooled_grid(grid, pathway.pooling, pathway.output_grid)
        boxes: list[Box | None]
        if pathway.crops and frames:
            if guide_dense is None:
                msg = (
                    f"pathway {pathway.name!r} crops a region of interest (roi_ratio="
                    f"{pathway.roi_ratio}) and needs the guide's dense tokens; got None"
                )
                raise ModelError(msg)
            dense = _dense_on_grid(guide_dense[frames].float(), grid)
            dense = pool_tokens(dense, pathway.pooling, pathway.output_grid)
            boxes = list(roi_boxes(token_scores(text_embedding, dense), pathway.roi_ratio))
            per_frame = boxes[0].num_cells if boxes else 0
        else:
            boxes = [None] * len(frames)
            per_frame = pooled[0] * pooled[1]
        pathways[pathway.name] = PathwayPlan(
            name=pathway.name,
            frames=frames,
            grid=pooled,
            boxes=boxes,
            num_tokens=len(frames) * per_frame,
            pooling=pathway.pooling,
            output_grid=pathway.output_grid,
        )
    total = sum(p.num_tokens for p in pathways.values())
    return Plan(
        pathways=pathways,
        frame_scores=scores.detach().cpu(),
        num_tokens=total,
        grid=grid,
        num_frames=num_frames,
    )


def gather(plan: Plan, frame_tokens: torch.Tensor) -> torch.Tensor:
    """Apply a plan to the LLM-side tokens: ``(T, h, w, D) -> (N, D)``.

    Order: slow | middle | fast; within a pathway its frames in time order; within a frame
    the pooled tokens inside its box, row-major. Runs on ``frame_tokens``' device and dtype.
    """
    if frame_tokens.dim() != 4:
        msg = f"frame tokens have shape {tuple(frame_tokens.shape)}; expected (T, h, w, D)"
        raise ModelError(msg)
    t, h, w, d = frame_tokens.shape
    if plan.num_frames is not None and plan.num_frames != t:
        msg = (
            f"the plan was made for {plan.num_frames} frames but frame tokens "
            f"{tuple(frame_tokens.shape)} have {t}"
        )
        raise ModelError(msg)
    if plan.grid is not None and tuple(plan.grid) != (h, w):
        msg = (
            f"the plan was made for a {plan.grid[0]}x{plan.grid[1]} token grid but frame tokens "
            f"{tuple(frame_tokens.shape)} have {h}x{w}"
        )
        raise ModelError(msg)
    pieces: list[torch.Tensor] = []
    for p in plan.pathways.values():
        if not p.frames:
            continue
        if max(p.frames) >= t or min(p.frames) < 0:
            msg = f"pathway {p.name!r} keeps frames {p.frames}, outside the {t} frames given"
            raise ModelError(msg)
        if len(p.boxes) != len(p.frames):
            msg = f"pathway {p.name!r} has {len(p.boxes)} boxes for {len(p.frames)} frames"
            raise ModelError(msg)
        # A pathway that keeps every frame (the fast one) pools them in place: no copy.
        chosen = frame_tokens if p.frames == list(range(t)) else frame_tokens[p.frames]
        pooled = pool_tokens(chosen, p.pooling, p.output_grid)
        if tuple(pooled.shape[1:3]) != tuple(p.grid):
            msg = (
                f"pathway {p.name!r}: pooled frame tokens are {tuple(pooled.shape[1:3])}, "
                f"the plan expects {tuple(p.grid)}"
            )
            raise ModelError(msg)
        for frame_pooled, box in zip(pooled, p.boxes):
            pieces.append(frame_pooled.reshape(-1, d) if box is None else crop(frame_pooled, box))
    tokens = torch.cat(pieces, dim=0) if pieces else frame_tokens.new_empty((0, d))
    if tokens.shape[0] != plan.num_tokens:
        msg = f"gathered {tokens.shape[0]} visual tokens but the plan counts {plan.num_tokens}"
        raise ModelError(msg)
    return tokens


def perceive(
    config: PerceptionConfig,
    frame_tokens: torch.Tensor,
    guide_pooled: torch.Tensor,
    guide_dense: torch.Tensor | None,
    text_embedding: torch.Tensor,
) -> Perception:
    """Plan from the guide features and gather from the LLM-side tokens.

    ``frame_tokens`` (T, h, w, D) are the answerer's projected tokens of the T sampled
    frames; the guide tensors are moved to their device (scores in float32). Returns
    :class:`Perception` with ``tokens`` (N, D), ``N == config.num_visual_tokens((h, w), T)``
    for ``T <= config.num_frames``.
    """
    if frame_tokens.dim() != 4:
        msg = f"frame tokens have shape {tuple(frame_tokens.shape)}; expected (T, h, w, D)"
        raise ModelError(msg)
    t, h, w, _ = frame_tokens.shape
    if guide_pooled.dim() >= 1 and guide_pooled.shape[0] != t:
        msg = (
            f"guide pooled embeddings {tuple(guide_pooled.shape)} cover {guide_pooled.shape[0]} "
            f"frames but frame tokens {tuple(frame_tokens.shape)} cover {t}; both must come from "
            "the same sampled frames"
        )
        raise ModelError(msg)
    if guide_dense is not None and guide_dense.dim() >= 1 and guide_dense.shape[0] != t:
        msg = (
            f"guide dense tokens {tuple(guide_dense.shape)} cover {guide_dense.shape[0]} frames "
            f"but frame tokens {tuple(frame_tokens.shape)} cover {t}; both must come from the "
            "same sampled frames"
        )
        raise ModelError(msg)
    device = frame_tokens.device
    the_plan = plan(
        config,
        guide_pooled.to(device=device, dtype=torch.float32),
        None if guide_dense is None else guide_dense.to(device=device, dtype=torch.float32),
        text_embedding.to(device=device, dtype=torch.float32),
        (h, w),
    )
    return Perception(tokens=gather(the_plan, frame_tokens), plan=the_plan)
