"""What prompt-guided selection buys over uniform sampling, at equal visual-token budgets.

On held-out synthetic videos (``freevllm_tools.synthetic``) whose target object is visible only
briefly (about 5-10% of the video: a needle), the tiny trained models answer questions about
that object — is it there, its colour, its shape, early or late — under several perception
configurations, and the script records for each:

* **answer accuracy**: share of questions answered right (``synthetic.grade``);
* **needle recall**: share of questions for which at least one frame kept in detail (slow or
  middle pathway, i.e. not only the 2x2 / 4x4 fast thumbnails) shows the needle.

Pairs compared at the same budget:

* ``guided-k`` vs ``uniform-k``: k frames with all their 64 tokens, chosen by the guide's
  frame scores for the question, or evenly spaced (64k tokens each);
* the paper's three-pathway split (Free Video-LLM: guided slow frames with RoI crops, uniform
  middle frames, a fast pathway over all frames) vs the same split with the slow frames evenly
  spaced instead (``... slow=uniform``): the tiny preset (the paper scaled to the 8x8 grid,
  424 tokens), ``PerceptionConfig.for_budget`` at 256 and 512 tokens, and the paper preset
  itself (1024 tokens on an 8x8 grid).

Each video is written as an H.264 file and goes through the pipeline's own stages
(``FreeVideoLLM.features`` -> ``plan`` -> ``perception.gather`` -> ``LlavaAnswerer.answer``).
Writes ``method_benefit.json``, ``method_benefit.md`` (a table) and ``method_benefit.svg``
(accuracy and recall against tokens) into ``--out``.

    .venv/bin/python benchmarks/method_benefit.py [--videos 40] [--out bench_out/method_benefit]

``make bench`` runs it with 60 videos as table 7 of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Context, Result
from freevllm_tools import perception
from freevllm_tools import synthetic as S
from freevllm_tools.config import PerceptionConfig
from freevllm_tools.pipeline import FreeVideoLLM

KEY = "method_benefit"
TITLE = "The method's benefit: prompt-guided vs uniform selection at equal budgets"
SEED0 = S.HELDOUT_SEED + 20_000
TARGET_KINDS = ("presence", "colour", "shape", "when")


def configurations() -> list[dict[str, Any]]:
    """Rows of the sweep: label, family, selection, config."""
    grid = S.TINY_GRID
    rows: list[dict[str, Any]] = []
    for k in (1, 2, 4, 8):
        rows.append({"label": f"guided-{k}", "family": f"{k} full frames", "selection": "guided", "config": S.guided_config(k)})
        rows.append({"label": f"uniform-{k}", "family": f"{k} full frames", "selection": "uniform", "config": S.uniform_config(k)})
    split = [
        ("budget-256", "paper split, 256", PerceptionConfig.for_budget(256, 50, grid)),
        ("tiny", "paper scaled to 8x8 (fast 2x2)", S.tiny_config()),
        ("budget-512", "paper split, 512", PerceptionConfig.for_budget(512, 50, grid)),
        ("paper", "paper preset (fast 4x4)", PerceptionConfig.paper()),
    ]
    for label, family, config in split:
        rows.append({"label": label, "family": family, "selection": "guided", "config": config})
        if config.slow.num_frames:
            unguided = replace(config, slow=replace(config.slow, selection="uniform"))
            rows.append({"label": f"{label} slow=uniform", "family": family, "selection": "uniform", "config": unguided})
    for row in rows:
        row["tokens"] = row["config"].num_visual_tokens(grid, 50)
    return rows


def run(ctx: Context) -> Result:
    """The sweep as table 7 of ``docs/benchmarks.md``, its plot next to the document."""
    num_videos = ctx.pick(60, 6, 2)
    report = sweep(num_videos, ctx.scratch / KEY)
    table = markdown(report).rstrip()
    if ctx.out_dir is not None:
        (ctx.out_dir / f"{KEY}.svg").write_text(svg(report), "utf-8")
        table += f"\n\n![accuracy and needle recall against visual tokens, guided vs uniform]({KEY}.svg)"
    best = max((r for r in report["rows"] if r["selection"] == "guided"), key=lambda r: r["accuracy"])
    tiny = {r["label"]: r for r in report["rows"]}
    headline = [
        f"Held-out needle questions: the tiny preset answers {tiny['tiny']['accuracy']:.0%} right "
        f"against {tiny['tiny slow=uniform']['accuracy']:.0%} with its slow frames evenly spaced; "
        f"best guided row `{best['label']}` {best['accuracy']:.0%}."
    ]
    return Result(table, report, [], headline)


def sweep(num_videos: int, out: Path, max_new_tokens: int = 16) -> dict[str, Any]:
    """Run every configuration on ``num_videos`` held-out needle videos; write JSON, Markdown
    and the plot into ``out``; return the report."""
    guide = S.tiny_guide()
    answerer = S.tiny_answerer()
    rows = configurations()
    pipelines = [FreeVideoLLM(guide, answerer, row["config"]) for row in rows]
    results = {row["label"]: {"correct": [], "recall": [], "by_kind": {}} for row in rows}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for n in range(num_videos):
            video = S.make_video(SEED0 + n, brief=True)
            path = video.write(Path(folder) / f"{video.seed}.mp4")
            features = pipelines[0].features(path)
            needle = video.visible_frames(video.target_object)[np.asarray(features.indices)]
            questions = [qa for qa in video.questions() if qa.kind in TARGET_KINDS and qa.target]
            for row, pipeline in zip(rows, pipelines):
                record = results[row["label"]]
                for qa in questions:
                    plan = pipeline.plan(features, qa.question)
                    tokens = perception.gather(plan, features.frame_tokens)
                    context = features.timing(plan)
                    text = answerer.answer(qa.question, tokens, context=context, max_new_tokens=max_new_tokens).text
                    right = S.grade(qa, text)
                    detailed = {f for name, p in plan.pathways.items() if name != "fast" for f in p.frames}
                    record["correct"].append(right)
                    record["recall"].append(bool(any(needle[f] for f in detailed)))
                    record["by_kind"].setdefault(qa.kind, []).append(right)
    seconds = time.perf_counter() - started
    table = []
    for row in rows:
        record = results[row["label"]]
        table.append(
            {
                "label": row["label"],
                "family": row["family"],
                "selection": row["selection"],
                "tokens": row["tokens"],
                "accuracy": round(float(np.mean(record["correct"])), 3),
                "needle_recall": round(float(np.mean(record["recall"])), 3),
                "by_kind": {k: round(float(np.mean(v)), 3) for k, v in sorted(record["by_kind"].items())},
                "questions": len(record["correct"]),
            }
        )
    report = {
        "videos": num_videos,
        "seeds": [SEED0, SEED0 + num_videos],
        "grid": list(S.TINY_GRID),
        "sampled_frames": 50,
        "models": {"guide": guide.identity, "answerer": answerer.identity},
        "seconds": round(seconds, 1),
        "rows": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "method_benefit.json").write_text(json.dumps(report, indent=2), "utf-8")
    (out / "method_benefit.md").write_text(markdown(report), "utf-8")
    (out / "method_benefit.svg").write_text(svg(report), "utf-8")
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        (f"Held-out synthetic videos with a brief target (needle): {report['videos']} videos, "
        f"{report['rows'][0]['questions']} questions about the needle per row, 50 sampled frames, "
        f"{report['grid'][0]}x{report['grid'][1]} token grid."),
        "",
        "| configuration | selection | visual tokens | accuracy | needle recall | presence | colour | shape | when |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        kinds = [row["by_kind"].get(k, float("nan")) for k in TARGET_KINDS]
        lines.append(
            f"| {row['label']} | {row['selection']} | {row['tokens']} | {row['accuracy']:.3f} | "
            f"{row['needle_recall']:.3f} | " + " | ".join(f"{v:.3f}" for v in kinds) + " |"
        )
    lines.append("")
    lines.append(f"Models: guide `{report['models']['guide']}`, answerer `{report['models']['answerer']}`.")
    return "\n".join(lines) + "\n"


def svg(report: dict[str, Any], width: int = 640, height: int = 300) -> str:
    """Accuracy (solid) and needle recall (dashed) against visual tokens, guided vs uniform,
    for the guided-k / uniform-k pairs; the three-pathway rows as single points."""
    left, right, top, bottom = 50, 170, 20, 40
    rows = report["rows"]
    max_tokens = max(r["tokens"] for r in rows)

    def x(tokens: float) -> float:
        return left + (width - left - right) * np.log2(tokens / 32) / np.log2(max_tokens / 32)

    def y(value: float) -> float:
        return top + (height - top - bottom) * (1 - value)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for t in sorted({r["tokens"] for r in rows}):
        parts.append(f'<text x="{x(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{t}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">visual tokens (log scale)</text>')
    colours = {"guided": "#d62728", "uniform": "#1f77b4"}
    for selection, colour in colours.items():
        pairs = sorted((r["tokens"], r) for r in rows if r["label"].startswith(f"{selection}-"))
        for key, dash in (("accuracy", ""), ("needle_recall", ' stroke-dasharray="4 3"')):
            points = " ".join(f"{x(t):.1f},{y(r[key]):.1f}" for t, r in pairs)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for r in rows:
            if not r["label"].startswith(("guided-", "uniform-")) and r["selection"] == selection:
                parts.append(f'<circle cx="{x(r["tokens"]):.1f}" cy="{y(r["accuracy"]):.1f}" r="4" fill="{colour}"/>')
    legend = [
        ("guided-k accuracy", colours["guided"], ""),
        ("guided-k needle recall", colours["guided"], ' stroke-dasharray="4 3"'),
        ("uniform-k accuracy", colours["uniform"], ""),
        ("uniform-k needle recall", colours["uniform"], ' stroke-dasharray="4 3"'),
    ]
    for i, (text, colour, dash) in enumerate(legend):
        ly = top + 14 * i + 6
        parts.append(f'<line x1="{width - right + 10}" x2="{width - right + 34}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}">{text}</text>')
    ly = top + 14 * len(legend) + 6
    parts.append(f'<circle cx="{width - right + 22}" cy="{ly}" r="4" fill="#555"/>')
    parts.append(f'<text x="{width - right + 38}" y="{ly + 4}">3-pathway split accuracy</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "method_benefit"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    report = sweep(args.videos, Path(args.out))
    print(markdown(report))
    print(f"{report['seconds']} s; written to {args.out}")


if __name__ == "__main__":
    main()
