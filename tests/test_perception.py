"""Perception operations against hand-made tensors whose right answer is known."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from freevllm_tools.config import Pathway, PerceptionConfig, middle_indices, pooled_grid
from freevllm_tools.errors import ConfigError, InputError, ModelError
from freevllm_tools.perception import (
    Box,
    PathwayPlan,
    Plan,
    crop,
    frame_scores,
    gather,
    perceive,
    plan,
    pool_tokens,
    roi_box,
    select_top_frames,
    token_scores,
)

DG = 8  # guide embedding width


def unit(i: int, dim: int = DG) -> torch.Tensor:
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


def guide_with_frames(t: int, liked: dict[int, float], grid=(24, 24)):
    """Pooled guide embeddings where frame f has cosine ``liked[f]`` with the text (e0) and
    every other frame is orthogonal to it; dense tokens all orthogonal (uniform token scores)."""
    pooled = torch.zeros(t, DG)
    pooled[:, 1] = 1.0
    for f, cos in liked.items():
        pooled[f] = cos * unit(0) + math.sqrt(1 - cos**2) * unit(1)
    dense = unit(2).expand(t, *grid, DG).clone()
    return pooled, dense, unit(0)


def grid_values(t: int, h: int, w: int) -> torch.Tensor:
    """(t, h, w, 3) tokens whose value is (frame, row, col)."""
    f = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    r = torch.arange(h).view(1, h, 1).expand(t, h, w)
    c = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([f, r, c], dim=-1).float()


# -- token counts --------------------------------------------------------------------------


def test_paper_config_gives_2648_tokens_for_50_frames():
    config = PerceptionConfig.paper()
    torch.manual_seed(0)
    frame_tokens = torch.randn(50, 24, 24, 4)
    pooled, dense = torch.randn(50, DG), torch.randn(50, 24, 24, DG)
    result = perceive(config, frame_tokens, pooled, dense, torch.randn(DG))
    assert result.tokens.shape == (2648, 4)
    assert result.num_tokens == 2648 == config.num_visual_tokens((24, 24), 50)
    counts = {name: p.num_tokens for name, p in result.pathways.items()}
    assert counts == {"slow": 693, "middle": 1155, "fast": 800}
    assert list(result.pathways) == ["slow", "middle", "fast"]
    assert result.pathways["middle"].frames == [0, 10, 20, 30, 40]
    assert result.pathways["fast"].frames == list(range(50))
    assert result.pathways["slow"].grid == (24, 12)
    assert all(b is not None and (b.height, b.width) == (21, 11) for b in result.pathways["slow"].boxes)
    assert result.pathways["fast"].boxes == [None] * 50
    assert result.frame_scores.shape == (50,)


@pytest.mark.parametrize(("t", "expected"), [(3, 3 * 231 + 3 * 231 + 3 * 16), (1, 231 + 231 + 16)])
def test_short_videos_count_as_config_arithmetic(t, expected):
    config = PerceptionConfig.paper()
    frame_tokens = torch.randn(t, 24, 24, 4)
    result = perceive(config, frame_tokens, torch.randn(t, DG), torch.randn(t, 24, 24, DG), torch.randn(DG))
    assert result.tokens.shape[0] == expected == config.num_visual_tokens((24, 24), t)
    assert {n: p.num_tokens for n, p in result.pathways.items()} == config.tokens_per_pathway((24, 24), t)
    assert result.pathways["slow"].frames == list(range(t))
    assert result.pathways["middle"].frames == middle_indices(t, 5) == list(range(t))


def test_switched_off_pathway_is_present_and_empty_and_needs_no_dense_guide():
    config = PerceptionConfig.slowfast_llava()
    t = 50
    result = perceive(config, torch.randn(t, 24, 24, 4), torch.randn(t, DG), None, torch.randn(DG))
    assert result.num_tokens == 3680 == config.num_visual_tokens((24, 24), t)
    middle = result.pathways["middle"]
    assert (middle.frames, middle.boxes, middle.num_tokens) == ([], [], 0)
    assert result.pathways["slow"].frames == middle_indices(50, 10)


def test_cropping_pathway_without_dense_guide_is_a_clear_error():
    with pytest.raises(ModelError, match="dense"):
        perceive(
            PerceptionConfig.paper(), torch.randn(4, 24, 24, 4), torch.randn(4, DG), None, torch.randn(DG)
        )


# -- temporal selection --------------------------------------------------------------------


def test_frames_matching_the_text_are_the_slow_frames_in_time_order():
    # frame 40 matches best, then 7, then 21: the slow pathway must return them sorted by time
    pooled, dense, text = guide_with_frames(50, {40: 0.9, 7: 0.8, 21: 0.7, 33: 0.3})
    the_plan = plan(PerceptionConfig.paper(), pooled, dense, text, (24, 24))
    assert the_plan.pathways["slow"].frames == [7, 21, 40]
    assert the_plan.frame_scores[40] == pytest.approx(0.9)
    assert int(the_plan.frame_scores.argmax()) == 40


def test_fast_pathway_with_fewer_frames_than_sampled_takes_the_top_frames():
    config = replace(
        PerceptionConfig.paper(), fast=Pathway("fast", 4, "guided", "adaptive_avg", output_grid=(4, 4))
    )
    pooled, dense, text = guide_with_frames(20, {17: 0.9, 3: 0.8, 11: 0.7, 5: 0.6, 8: 0.1})
    result = perceive(config, torch.randn(20, 24, 24, 4), pooled, dense, text)
    assert result.pathways["fast"].frames == [3, 5, 11, 17]
    assert result.pathways["fast"].num_tokens == 4 * 16
    assert result.num_tokens == config.num_visual_tokens((24, 24), 20)


def test_select_top_frames_ties_and_limits():
    assert select_top_frames(torch.zeros(10), 3) == [0, 1, 2]
    assert select_top_frames(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2) == [1, 2]
    assert select_top_frames(torch.tensor([0.1, 0.5, 0.3]), 5) == [0, 1, 2]
    assert select_top_frames(torch.tensor([0.1, 0.5, 0.3]), 0) == []
    assert select_top_frames(torch.tensor([0.1, float("nan"), 0.3]), 2) == [0, 2]
    with pytest.raises(InputError):
        select_top_frames(torch.zeros(3), -1)


def test_equal_frame_scores_choose_the_earliest_frames():
    pooled = unit(1).expand(12, DG).clone()  # every frame scores the same
    the_plan = plan(PerceptionConfig.paper(), pooled, torch.randn(12, 24, 24, DG), unit(0), (24, 24))
    assert the_plan.pathways["slow"].frames == [0, 1, 2]


def test_frame_scores_are_cosines():
    pooled = torch.stack([unit(0) * 3, unit(1), unit(0) + unit(1)])
    scores = frame_scores(unit(0).unsqueeze(0) * 2, pooled)
    assert torch.allclose(scores, torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]))
    with pytest.raises(ModelError, match=r"\(5,\)"):
        frame_scores(torch.zeros(5), pooled)


# -- pooling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "reference"), [("max_pool_1d", F.max_pool1d), ("avg_pool_1d", F.avg_pool1d)]
)
@pytest.mark.parametrize("grid", [(24, 24), (6, 4)])
def test_1d_pool_equals_reference_pool_over_flattened_tokens(pooling, reference, grid):
    h, w = grid
    tokens = torch.randn(3, h, w, 5)
    ours = pool_tokens(tokens, pooling)
    flat = tokens.reshape(3, h * w, 5).transpose(1, 2)  # (T, D, N) as the reference lays it out
    ref = reference(flat, kernel_size=2, stride=2).transpose(1, 2)  # (T, N/2, D)
    assert ours.shape == (3, h, w // 2, 5)
    assert torch.allclose(ours.reshape(3, -1, 5), ref)


def test_1d_pool_with_odd_width_keeps_last_column_alone():
    tokens = grid_values(2, 27, 27)
    pooled = pool_tokens(tokens, "max_pool_1d")
    assert pooled.shape[1:3] == (27, 14) == pooled_grid((27, 27), "max_pool_1d")
    assert torch.equal(
        pooled[..., 2], torch.tensor([1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 26.0]).expand(2, 27, 14)
    )
    averaged = pool_tokens(tokens, "avg_pool_1d")
    assert torch.equal(averaged[0, 0, :, 2], torch.tensor([0.5 + 2 * j for j in range(13)] + [26.0]))


@pytest.mark.parametrize(
    ("pooling", "reference"), [("max_pool_2d", F.max_pool2d), ("avg_pool_2d", F.avg_pool2d)]
)
def test_2d_pool_ceil(pooling, reference):
    tokens = torch.randn(2, 5, 7, 3)
    ours = pool_tokens(tokens, pooling)
    ref = reference(tokens.permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1)
    assert ours.shape[1:3] == (3, 4) == pooled_grid((5, 7), pooling)
    assert torch.allclose(ours, ref)
    assert torch.allclose(ours[:, 2, 3], tokens[:, 4, 6])  # the lone corner cell


@pytest.mark.parametrize("grid", [(24, 24), (27, 27)])
def test_adaptive_pool_to_4x4(grid):
    tokens = grid_values(2, *grid)
    pooled = pool_tokens(tokens, "adaptive_avg", (4, 4))
    assert pooled.shape == (2, 4, 4, 3)
    ref = F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), (4, 4)).permute(0, 2, 3, 1)
    assert torch.allclose(pooled, ref)
    if grid == (24, 24):  # 6x6 blocks: mean row of block i is 6i + 2.5
        assert torch.allclose(pooled[1, 2, 3], torch.tensor([1.0, 14.5, 20.5]))
    else:  # 27 -> 4: bins [0,7) [6,14) [13,21) [20,27)
        assert torch.allclose(pooled[0, 1, 3], torch.tensor([0.0, 9.5, 23.0]))


def test_adaptive_pool_on_uneven_grid_uses_adaptive_bins():
    tokens = grid_values(1, 7, 5)
    pooled = pool_tokens(tokens, "adaptive_avg", (4, 4))
    # rows 7 -> 4: [0,2) [1,4) [3,6) [5,7); cols 5 -> 4: [0,2) [1,3) [2,4) [3,5)
    assert torch.allclose(pooled[0, :, 0, 1], torch.tensor([0.5, 2.0, 4.0, 5.5]))
    assert torch.allclose(pooled[0, 0, :, 2], torch.tensor([0.5, 1.5, 2.5, 3.5]))
    small = pool_tokens(grid_values(1, 3, 2), "adaptive_avg", (4, 4))
    assert small.shape[1:3] == (3, 2) == pooled_grid((3, 2), "adaptive_avg", (4, 4))


@pytest.mark.parametrize(
    "pooling", ["max_pool_1d", "avg_pool_1d", "max_pool_2d", "avg_pool_2d", "none", "adaptive_avg"]
)
@pytest.mark.parametrize("grid", [(24, 24), (27, 27), (7, 5), (1, 1)])
def test_pooled_shape_matches_config(pooling, grid):
    out = pool_tokens(torch.randn(2, *grid, 3).bfloat16(), pooling, (4, 4))
    assert out.shape[1:3] == pooled_grid(grid, pooling, (4, 4))
    assert out.dtype == torch.bfloat16


def test_pool_rejects_bad_input():
    with pytest.raises(ModelError, match=r"\(24, 24, 3\)"):
        pool_tokens(torch.randn(24, 24, 3), "max_pool_1d")
    with pytest.raises(ConfigError):
        pool_tokens(torch.randn(1, 4, 4, 3), "bogus")


# -- RoI box -------------------------------------------------------------------------------


def test_roi_box_on_centred_target():
    scores = torch.zeros(10, 10)
    scores[4:7, 3:6] = 1.0  # 9 target tokens; int(100 * 0.09) = 9, box 3x3
    box = roi_box(scores, 0.09)
    assert box == Box(4, 3, 7, 6)


def test_roi_box_in_top_left_corner_is_shifted_inside_and_covers_target():
    scores = torch.zeros(8, 8)
    scores[:4, :4] = torch.arange(16.0).view(4, 4) + 1  # k = 16, box 4x4, mean 1.5 -> 1 -> top = -1
    assert roi_box(scores, 0.25) == Box(0, 0, 4, 4)


@pytest.mark.parametrize("transpose", [False, True])
def test_roi_box_at_bottom_or_right_edge_is_shifted_inside(transpose):
    scores = torch.zeros(16, 16)
    scores[12:, :] = 1.0 + torch.rand(4, 16)  # k = 64 = the bottom strip; box 8x8
    # y mean 13.5 -> 13 -> rows 9..17, shifted to 8..16; x mean 7.5 -> 7 -> columns 3..11
    expected = Box(8, 3, 16, 11)
    if transpose:
        scores, expected = scores.T.contiguous(), Box(3, 8, 11, 16)
    box = roi_box(scores, 0.25)
    assert box == expected
    assert box.fits((16, 16))


def test_roi_box_truncates_the_mean_like_the_reference():
    scores = torch.zeros(5, 5)
    scores[2, 1] = scores[3, 1] = scores[3, 2] = 1.0  # k = int(25 * 0.13) = 3, box 2x2
    # y mean 8/3 = 2.67 -> 2 (rounding would give 3); x mean 4/3 -> 1
    assert roi_box(scores, 0.13) == Box(1, 0, 3, 2)


def test_roi_box_paper_geometry_bottom_right_target():
    rows = torch.arange(24.0).view(24, 1)
    cols = torch.arange(12.0).view(1, 12)
    scores = -((23 - rows) ** 2 + (11 - cols) ** 2) + 1e-3 * (rows * 12 + cols)
    box = roi_box(scores, 0.8)  # top 230 tokens: x mean 5.66 -> 5, y mean 13.89 -> 13
    assert (box.height, box.width) == (21, 11)
    assert box == Box(3, 0, 24, 11)


def test_roi_box_ties_are_deterministic_and_ratio_one_keeps_all():
    assert roi_box(torch.zeros(4, 4), 0.25) == Box(0, 0, 2, 2)  # first 4 tokens: row 0
    assert roi_box(torch.randn(6, 3), 1.0) == Box(0, 0, 6, 3)


def test_token_scores_are_cosines():
    dense = torch.stack([unit(0) * 2, unit(1), -unit(0), unit(0) + unit(1)]).view(1, 2, 2, DG)
    assert torch.allclose(
        token_scores(unit(0), dense), torch.tensor([[[1.0, 0.0], [-1.0, 1 / math.sqrt(2)]]])
    )


# -- crop and gather ------------------------------------------------------------------------


def test_crop_is_row_major():
    tokens = grid_values(1, 4, 5)[0]
    out = crop(tokens, Box(1, 2, 3, 4))
    assert out[:, 1:].tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]
    with pytest.raises(ModelError):
        crop(tokens, Box(0, 0, 5, 1))


def test_gather_places_exactly_the_planned_tokens():
    t, h, w = 6, 6, 8
    tokens = grid_values(t, h, w)
    the_plan = Plan(
        pathways={
            "slow": PathwayPlan("slow", [2, 5], (6, 4), [Box(1, 2, 3, 4), Box(0, 0, 2, 1)], 6, "max_pool_1d"),
            "middle": PathwayPlan("middle", [], (6, 4), [], 0, "max_pool_1d"),
            "fast": PathwayPlan("fast", [0, 3], (2, 2), [None, None], 8, "adaptive_avg", (2, 2)),
        },
        frame_scores=torch.zeros(t),
        num_tokens=14,
        grid=(h, w),
        num_frames=t,
    )
    out = gather(the_plan, tokens)
    # 1-D max pool: pooled column j holds original columns 2j, 2j+1 -> value 2j+1
    slow = [[2, 1, 5], [2, 1, 7], [2, 2, 5], [2, 2, 7], [5, 0, 1], [5, 1, 1]]
    # adaptive 6x8 -> 2x2: 3x4 blocks, mean row 1 / 4, mean col 1.5 / 5.5
    fast = [[f, r, c] for f in (0, 3) for r in (1.0, 4.0) for c in (1.5, 5.5)]
    assert out.tolist() == slow + fast


def test_key_frames_are_the_most_detailed_pathways_frames():
    def the_plan(slow, middle, fast):
        pathways = {
            name: PathwayPlan(name, frames, (2, 2), [None] * len(frames), 4 * len(frames), "none")
            for name, frames in (("slow", slow), ("middle", middle), ("fast", fast))
        }
        return Plan(pathways=pathways, frame_scores=torch.zeros(8), num_tokens=0)

    assert the_plan([2, 5], [0, 4], list(range(8))).key_frames == [2, 5]
    assert the_plan([], [0, 4], list(range(8))).key_frames == [0, 4]
    assert the_plan([], [], [1, 3]).key_frames == [1, 3]
    assert the_plan([], [], []).key_frames == []


def test_gather_checks_shapes():
    config = PerceptionConfig.paper()
    the_plan = plan(config, torch.randn(5, DG), torch.randn(5, 24, 24, DG), torch.randn(DG), (24, 24))
    with pytest.raises(ModelError, match="5 frames"):
        gather(the_plan, torch.randn(4, 24, 24, 3))
    with pytest.raises(ModelError, match="12x12"):
        gather(the_plan, torch.randn(5, 12, 12, 3))


def test_perceive_crops_the_region_matching_the_text():
    # two frames; frame 1 matches the text; its dense guide tokens match in a block at rows
    # 10..16 (7 rows), pooled columns 8..11 of the 24x12 pooled grid
    config = replace(
        PerceptionConfig.paper(),
        slow=Pathway("slow", 1, "guided", "max_pool_1d", roi_ratio=0.1),
        middle=Pathway("middle", 0, "uniform", "max_pool_1d"),
        fast=Pathway("fast", 0, "guided", "adaptive_avg", output_grid=(4, 4)),
    )
    t = 2
    pooled, dense, text = guide_with_frames(t, {1: 0.9})
    dense[1, 10:17, 16:24] = unit(0)  # 7 rows x 4 pooled cols = 28 = int(288 * 0.1) tokens
    frame_tokens = grid_values(t, 24, 24)
    result = perceive(config, frame_tokens, pooled, dense, text)
    slow = result.pathways["slow"]
    assert slow.frames == [1]
    # box round(24 * 0.316) = 8 rows x round(12 * 0.316) = 4 cols; centre (y 13, x 9.5 -> 9)
    assert slow.boxes == [Box(9, 7, 17, 11)]
    assert result.num_tokens == 32 == config.num_visual_tokens((24, 24), t)
    expected = [[1, r, 2 * c + 1] for r in range(9, 17) for c in range(7, 11)]
    assert result.tokens.tolist() == expected


def test_guide_grid_different_from_llm_grid_still_lands_on_target():
    config = replace(
        PerceptionConfig.paper(),
        slow=Pathway("slow", 1, "guided", "max_pool_1d", roi_ratio=0.25),
        middle=Pathway("middle", 0, "uniform", "max_pool_1d"),
        fast=Pathway("fast", 0, "guided", "adaptive_avg", output_grid=(4, 4)),
    )
    pooled, _, text = guide_with_frames(2, {0: 0.9})
    coarse = unit(1).expand(2, 6, 6, DG).clone()
    coarse[:, 0:3, 3:6] = unit(0)  # top-right quarter of a 6x6 guide grid
    fine = unit(1).expand(2, 12, 12, DG).clone()
    fine[:, 0:6, 6:12] = unit(0)  # the same picture at the LLM's 12x12
    frame_tokens = torch.randn(2, 12, 12, 3)
    from_coarse = perceive(config, frame_tokens, pooled, coarse, text)
    from_fine = perceive(config, frame_tokens, pooled, fine, text)
    # pooled 12x6, box 6x3; the 18 target cells are rows 0..5, pooled columns 3..5
    assert from_coarse.pathways["slow"].boxes == [Box(0, 3, 6, 6)]
    assert from_fine.pathways["slow"].boxes == [Box(0, 3, 6, 6)]
    assert torch.equal(from_coarse.tokens, from_fine.tokens)


def test_perceive_keeps_dtype_and_checks_frame_counts():
    config = PerceptionConfig.paper()
    frame_tokens = torch.randn(4, 24, 24, 4, dtype=torch.bfloat16)
    result = perceive(config, frame_tokens, torch.randn(4, DG), torch.randn(4, 24, 24, DG), torch.randn(DG))
    assert result.tokens.dtype == torch.bfloat16
    assert result.frame_scores.dtype == torch.float32
    with pytest.raises(ModelError, match=r"\(3, 8\).*\(4, 24, 24, 4\)"):
        perceive(config, frame_tokens, torch.randn(3, DG), torch.randn(3, 24, 24, DG), torch.randn(DG))
    with pytest.raises(ModelError, match=r"\(4, 24, 24, 6\)"):
        plan(config, torch.randn(4, DG), torch.randn(4, 24, 24, 6), torch.randn(DG), (24, 24))
    with pytest.raises(ConfigError):
        plan(config, torch.randn(4, DG), torch.randn(4, 24, 24, DG), torch.randn(DG), (0, 24))


# -- boxes in pixels -------------------------------------------------------------------------


def test_box_to_pixels_covers_its_cells():
    box = Box(1, 2, 3, 4)
    assert (box.height, box.width, box.num_cells) == (2, 2, 4)
    # on the pooled 24x12 grid of a 640x480 frame: a cell is 53.33 px wide, 20 px high
    assert box.to_pixels((24, 12), (640, 480)) == (106, 20, 214, 60)
    assert Box(0, 0, 21, 11).to_pixels((24, 12), (336, 336)) == (0, 0, 308, 294)
    assert Box(0, 0, 24, 12).to_pixels((24, 12), (641, 479)) == (0, 0, 641, 479)
    with pytest.raises(InputError):
        Box(0, 0, 25, 12).to_pixels((24, 12), (640, 480))
    with pytest.raises(InputError):
        Box(3, 0, 3, 1)


def test_plan_to_dict_is_plain_data():
    the_plan = plan(
        PerceptionConfig.paper(), torch.randn(3, DG), torch.randn(3, 24, 24, DG), torch.randn(DG), (24, 24)
    )
    data = the_plan.to_dict()
    assert data["num_tokens"] == the_plan.num_tokens
    assert data["pathways"]["slow"]["boxes"][0] == list(the_plan.pathways["slow"].boxes[0].as_tuple())
    assert len(data["frame_scores"]) == 3


def test_guide_tokens_brought_to_the_llm_grid_are_renormalised():
    from freevllm_tools.perception import _dense_on_grid

    coarse = F.normalize(torch.randn(2, 6, 6, DG), dim=-1)
    fine = _dense_on_grid(coarse, (12, 12))
    assert fine.shape == (2, 12, 12, DG)
    assert torch.allclose(fine.norm(dim=-1), torch.ones(2, 12, 12), atol=1e-5)
    assert _dense_on_grid(coarse, (6, 6)) is coarse
    assert _dense_on_grid(coarse, (3, 3)).shape == (2, 3, 3, DG)
