"""PerceptionConfig: the paper's arithmetic, the reference string, budgets and bad settings."""

from __future__ import annotations

import pytest

from freevllm_tools import ConfigError, FreeVideoError, Pathway, PerceptionConfig
from freevllm_tools.config import (
    list_presets,
    middle_indices,
    pooled_grid,
    roi_box_size,
    sample_frame_indices,
)

PAPER_STRING = "slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4"


def test_paper_token_count_is_2648():
    config = PerceptionConfig.paper()
    assert config.num_visual_tokens(grid=(24, 24), num_frames=50) == 2648
    assert config.tokens_per_pathway((24, 24), 50) == {"slow": 693, "middle": 1155, "fast": 800}


def test_other_presets_match_their_papers():
    assert PerceptionConfig.slowfast_llava().num_visual_tokens((24, 24), 50) == 3680
    assert PerceptionConfig.uniform(8).num_visual_tokens((24, 24), 8) == 8 * 576
    assert set(list_presets()) >= {"paper", "slowfast-llava", "uniform-8"}
    assert PerceptionConfig.from_preset("paper") == PerceptionConfig.paper()


@pytest.mark.parametrize(
    ("num_frames", "expected"),
    [
        # slow keeps min(3, T) frames, middle the distinct linspace positions, fast all T.
        (3, 3 * 231 + 3 * 231 + 3 * 16),
        (1, 231 + 231 + 16),
        (5, 3 * 231 + 5 * 231 + 5 * 16),
    ],
)
def test_short_videos_follow_the_rules(num_frames, expected):
    assert PerceptionConfig.paper().num_visual_tokens((24, 24), num_frames) == expected


def test_reference_string_round_trip():
    config = PerceptionConfig.from_reference_string(PAPER_STRING)
    assert config == PerceptionConfig.paper()
    assert config.to_reference_string() == PAPER_STRING
    assert PerceptionConfig.from_preset(PAPER_STRING) == config


def test_reference_string_variants():
    config = PerceptionConfig.from_reference_string(
        "slow_4frms_spatial_1d_avg_pool_roi6-middle_2frms_spatial_1d_max_pool_24x12-fast_20frms_2x2"
    )
    assert (config.slow.num_frames, config.slow.pooling, config.slow.roi_ratio) == (4, "avg_pool_1d", 0.6)
    assert config.middle.roi_ratio == 0.6
    assert config.fast.num_frames == 20 and config.fast.output_grid == (2, 2)
    assert config.num_frames == 50  # the reference samples 50 frames; fast keeps the best 20
    # roi10 switches the crop off.
    no_crop = PerceptionConfig.from_reference_string(PAPER_STRING.replace("roi8", "roi10"))
    assert not no_crop.slow.crops
    assert no_crop.tokens_per_pathway((24, 24), 50)["slow"] == 3 * 288


@pytest.mark.parametrize(
    "text",
    [
        "",
        "paper-ish",
        "slow_3frms_spatial_1d_max_pool_roi8-middle_5frms",
        "slow_3frms_spatial_9d_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4",
        "slow_3frms_spatial_1d_max_pool_roi0-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4",
        "slow_3frms_spatial_1d_max_pool_roi12-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4",
    ],
)
def test_unparseable_strings_raise_config_error(text):
    with pytest.raises(ConfigError) as info:
        PerceptionConfig.from_reference_string(text)
    assert isinstance(info.value, FreeVideoError)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="paper"):
        PerceptionConfig.from_preset("fastest")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": -1, "selection": "guided"},
        {"num_frames": 3, "selection": "random"},
        {"num_frames": 3, "selection": "guided", "roi_ratio": 0.0},
        {"num_frames": 3, "selection": "guided", "roi_ratio": 1.5},
        {"num_frames": 3, "selection": "guided", "pooling": "median"},
        {"num_frames": 3, "selection": "guided", "pooling": "adaptive_avg"},
    ],
)
def test_invalid_pathways_raise(kwargs):
    with pytest.raises(ConfigError):
        Pathway("slow", **kwargs)


def test_invalid_configs_raise():
    with pytest.raises(ConfigError, match="num_frames"):
        PerceptionConfig(num_frames=0)
    off = Pathway("x", 0, "guided")
    with pytest.raises(ConfigError, match="switched off"):
        PerceptionConfig(slow=off, middle=off, fast=off)


def test_geometry_helpers():
    assert pooled_grid((24, 24), "max_pool_1d") == (24, 12)
    assert pooled_grid((27, 27), "max_pool_1d") == (27, 14)
    assert pooled_grid((24, 24), "max_pool_2d") == (12, 12)
    assert pooled_grid((24, 24), "adaptive_avg", (4, 4)) == (4, 4)
    assert pooled_grid((3, 3), "adaptive_avg", (4, 4)) == (3, 3)
    assert roi_box_size((24, 12), 0.8) == (21, 11)
    assert roi_box_size((1, 1), 0.1) == (1, 1)
    assert roi_box_size((24, 12), 1.0) == (24, 12)


def test_frame_index_rules():
    # seg = 309/50; each index is the middle of its segment.
    indices = sample_frame_indices(310, 50)
    seg = 309 / 50
    assert indices == [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(50)]
    assert indices[0] == 3 and indices[-1] == 306
    assert sample_frame_indices(10, 50) == list(range(10))
    assert sample_frame_indices(0, 50) == []
    assert middle_indices(50, 5) == [0, 10, 20, 30, 40]
    assert middle_indices(3, 5) == [0, 1, 2]
    assert middle_indices(1, 5) == [0]
    assert middle_indices(50, 0) == []


def test_budget_of_2648_gives_the_paper_preset():
    assert PerceptionConfig.for_budget(2648) == PerceptionConfig.paper()


@pytest.mark.parametrize("budget", [50, 51, 120, 500, 1000, 1500, 2000, 2647, 3000, 5000, 20000])
def test_budgets_are_never_exceeded(budget):
    config = PerceptionConfig.for_budget(budget)
    used = config.num_visual_tokens((24, 24), 50)
    assert 50 <= used <= budget
    assert config.fast.frames_kept(50) == 50  # every frame keeps at least one token


def test_budget_balance_grows_with_the_budget():
    small, large = PerceptionConfig.for_budget(1500), PerceptionConfig.for_budget(6000)
    assert small.slow.num_frames <= 3 <= large.slow.num_frames
    assert small.middle.num_frames <= 5 <= large.middle.num_frames
    assert large.middle.num_frames > large.slow.num_frames  # the paper's middle share is larger


def test_tiny_budgets_degrade_to_the_fast_pathway():
    config = PerceptionConfig.for_budget(200)
    assert config.slow.num_frames == 0 and config.middle.num_frames == 0
    assert config.num_visual_tokens((24, 24), 50) == 200  # 50 frames at 2x2
    with pytest.raises(ConfigError, match="below one token per frame"):
        PerceptionConfig.for_budget(49)
