"""Table 1: visual tokens per preset, and what ``PerceptionConfig.for_budget`` gives a user budget.

Pure arithmetic from ``freevllm_tools.config`` (no model, no timing): the same counts the
pipeline plans with and the tests check (the paper preset is 2648 on a 24x24 grid).
"""

from __future__ import annotations

from freevllm_tools.config import PerceptionConfig

from .common import Context, Result, md_table

KEY = "tokens"
TITLE = "Visual tokens per preset and per user budget"

GRID = (24, 24)  # LLaVA-v1.6's CLIP ViT-L/14-336: 576 patch tokens a frame
ONEVISION_GRID = (27, 27)  # LLaVA-OneVision's SigLIP-384/14: 729 a frame (the CPU choice)
CONTEXT_7B = 4096 * 2  # Vicuna-7B's 4096 positions with dynamic RoPE x2
BUDGETS = (64, 128, 256, 512, 1024, 1536, 2048, 2648, 3680, 4096, 6144, 8192)


def _presets() -> list[tuple[str, str, PerceptionConfig]]:
    return [
        ("paper", "Free Video-LLM default (`paper`)", PerceptionConfig.paper()),
        ("slowfast-llava", "SlowFast-LLaVA default (`slowfast-llava`)", PerceptionConfig.slowfast_llava()),
        ("all-50", "all 576 tokens of 50 frames (`PerceptionConfig.uniform(50)`)", PerceptionConfig.uniform(50)),
        ("uniform-8", "plain LLaVA, 8 uniform frames (`uniform-8`)", PerceptionConfig.uniform(8)),
    ]


def _frames_kept(config: PerceptionConfig, num_frames: int) -> dict[str, int]:
    return {p.name: p.frames_kept(min(num_frames, config.num_frames)) for p in config.pathways}


def run(ctx: Context) -> Result:
    presets = []
    rows = []
    all_tokens = PerceptionConfig.uniform(50).num_visual_tokens(GRID, 50)
    for key, label, config in _presets():
        per = config.tokens_per_pathway(GRID, config.num_frames)
        total = sum(per.values())
        onevision = config.num_visual_tokens(ONEVISION_GRID, config.num_frames)
        kept = _frames_kept(config, config.num_frames)
        grids = {p.name: list(p.frame_grid(GRID)) for p in config.pathways}
        presets.append({
            "preset": key, "label": label, "num_frames": config.num_frames, "tokens": total,
            "per_pathway": per, "frames_kept": kept, "frame_grids": grids,
            "tokens_27x27": onevision, "fraction_of_all_50": total / all_tokens,
            "fits_7b_context": total < CONTEXT_7B,
        })

        def cell(name: str, per=per, kept=kept, grids=grids) -> str:
            return "—" if not kept[name] else f"{per[name]:,} ({kept[name]}×{grids[name][0]}×{grids[name][1]})"

        rows.append([
            label, config.num_frames, cell("slow"), cell("middle"), cell("fast"), f"**{total:,}**",
            f"{total / all_tokens:.1%}", f"{onevision:,}", "yes" if total < CONTEXT_7B else "**no**",
        ])
    preset_md = md_table(
        ["preset", "frames", "slow (frames×h×w)", "middle", "fast", "tokens (24×24)", "of 28,800",
         "tokens (27×27)", f"fits 7B context ({CONTEXT_7B:,})"],
        rows, align="lrrrrrrrc",
    )

    budget_rows = []
    budgets = []
    for budget in BUDGETS:
        config = PerceptionConfig.for_budget(budget, num_frames=50, grid=GRID)
        per = config.tokens_per_pathway(GRID, 50)
        total = sum(per.values())
        side = config.fast.output_grid[0] if config.fast.output_grid else 0
        budgets.append({
            "budget": budget, "tokens": total, "per_pathway": per,
            "slow_frames": config.slow.num_frames, "middle_frames": config.middle.num_frames,
            "fast_grid": [side, side], "used": total / budget,
        })
        budget_rows.append([
            f"{budget:,}", config.slow.num_frames, config.middle.num_frames, f"{side}×{side}",
            f"{per['slow']:,}", f"{per['middle']:,}", f"{per['fast']:,}", f"**{total:,}**", f"{total / budget:.0%}",
        ])
    budget_md = md_table(
        ["budget", "slow frames", "middle frames", "fast grid", "slow tokens", "middle tokens",
         "fast tokens", "total", "budget used"],
        budget_rows,
    )
    markdown = (
        "Tokens are counted on LLaVA-v1.6's 24×24 grid (CLIP ViT-L/14-336) for 50 sampled frames; "
        "the 27×27 column is the same preset on LLaVA-OneVision's SigLIP grid.\n\n"
        f"{preset_md}\n\n"
        "**`PerceptionConfig.for_budget(budget, num_frames=50)`** — the pathways for a fixed token "
        "budget (slow and middle frames are RoI-cropped 21×11 = 231 tokens each; fast frames "
        "adaptive-pooled to the grid shown):\n\n"
        f"{budget_md}"
    )
    paper = presets[0]
    notes = [
        "The paper preset is 3·231 + 5·231 + 50·16 = 2648 tokens: "
        f"{all_tokens / paper['tokens']:.1f}× fewer than all 28,800 tokens of 50 frames and "
        f"{presets[1]['tokens'] / paper['tokens']:.2f}× fewer than SlowFast-LLaVA's 3680.",
        "28,800 tokens do not fit the 7B model's context (4096 positions, 8192 with dynamic RoPE ×2): "
        "without token reduction 50 frames cannot be given to it at all.",
        "`for_budget` keeps the paper preset's split between pathways; below 231 + 50 tokens only the "
        "fast pathway remains, pooled as finely as the budget allows (at least 1 token a frame).",
    ]
    headline = [
        f"Visual tokens for 50 frames: **{paper['tokens']:,}** (paper preset) vs 3,680 (SlowFast-LLaVA) "
        f"vs {all_tokens:,} (all tokens) — {all_tokens / paper['tokens']:.1f}× fewer."
    ]
    return Result(markdown, {"grid": list(GRID), "presets": presets, "budgets": budgets}, notes, headline)
