"""Table 6: GPU pre-fill latency and output tokens/s of LLaVA-NeXT-7B, via ``benchmarks/gpu_prefill.py``.

The measuring script is ``gpu_prefill.py`` (the answerer issue's); this module only runs it in a
child process and reports what it wrote. Without a CUDA GPU the script says so and exits 0, and
the table records that note. In ``full`` and ``quick`` runs its ``--tiny`` CPU smoke test runs
as well, so that the script cannot rot unnoticed; those tiny figures say nothing about the 7B.
"""

from __future__ import annotations

import json
import subprocess
import sys

from .common import ROOT, Context, Result, md_table

KEY = "gpu"
TITLE = "GPU: pre-fill latency and output tokens/s (LLaVA-NeXT-7B, random weights)"

SCRIPT = "benchmarks/gpu_prefill.py"
TINY_ARGS = ["--tiny", "--repeats", "1", "--new-tokens", "4", "--visual-tokens", "331", "460"]


def _run(args: list[str], timeout: float) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, SCRIPT, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def _rows(report: dict) -> list[list[str]]:
    rows = []
    for row in report["results"]:
        within = "yes" if row["within_context"] else f"no (> {report['context']:,})"
        rows.append([
            f"{row['visual_tokens']:,}", f"{row['num_prompt_tokens']:,}", f"{row['prefill_s_median']:.3f}",
            f"{row['tokens_per_s_median']:.1f}", within,
        ])
    return rows


def run(ctx: Context) -> Result:
    out = ctx.scratch / "gpu_prefill.json"
    code, text = _run(["--out", str(out)], timeout=ctx.pick(1800, 900, 300))
    data: dict = {"script": SCRIPT, "command": f"python {SCRIPT} --out prefill.json",
                  "returncode": code, "output": text[-4000:]}
    notes: list[str] = []
    headline: list[str] = []
    if code != 0:
        raise RuntimeError(f"{SCRIPT} failed with status {code}: {text[-800:]}")
    if out.exists():
        report = json.loads(out.read_text())
        data["report"] = report
        paper = report["paper"]
        table = md_table(
            ["visual tokens", "prompt tokens", "pre-fill (s, median)", "output tokens/s (median)", "within context"],
            [*_rows(report), [f"paper, {paper['visual_tokens']:,}", "", f"{paper['prefill_s']:.3f}",
                              f"{paper['tokens_per_s']:.1f}", ""]],
            align="rrrrc",
        )
        markdown = f"Device: {report['device']}, {report['dtype']}, {report['model']}.\n\n{table}"
        first = report["results"][0]
        headline.append(
            f"GPU ({report['device']}): pre-fill {first['prefill_s_median']:.3f} s and "
            f"{first['tokens_per_s_median']:.1f} tokens/s with {first['visual_tokens']:,} visual tokens "
            f"(paper: {paper['prefill_s']} s, {paper['tokens_per_s']} tokens/s)."
        )
    else:
        data["gpu"] = None
        markdown = (
            f"**No GPU was lent to this run**: `python {SCRIPT}` printed \n\n> {text.splitlines()[-1] if text else ''}\n\n"
            "and measured nothing. The script is ready: on a CUDA machine, "
            f"`python {SCRIPT} --out prefill.json` builds the 7B architecture (`LlavaNextConfig()` defaults, "
            "random weights, bf16) and times pre-fill and greedy decoding for 2648, 3680 and 28,800 visual "
            "tokens against the paper's 0.578 s and 20.4 tokens/s; `make bench` on that machine fills this table."
        )
        headline.append("GPU pre-fill / tokens/s: no GPU was lent to this run (script ready: `benchmarks/gpu_prefill.py`).")
    if ctx.level != "smoke":
        tiny_out = ctx.scratch / "gpu_prefill_tiny.json"
        code, text = _run([*TINY_ARGS, "--out", str(tiny_out)], timeout=600)
        if code != 0 or not tiny_out.exists():
            raise RuntimeError(f"{SCRIPT} {' '.join(TINY_ARGS)} failed with status {code}: {text[-800:]}")
        tiny = json.loads(tiny_out.read_text())
        data["tiny_smoke"] = {"command": f"python {SCRIPT} {' '.join(TINY_ARGS)}", "report": tiny}
        lengths = ", ".join(
            f"{r['visual_tokens']} tokens: {r['prefill_s_median'] * 1e3:.0f} ms" for r in tiny["results"]
        )
        notes.append(
            f"Smoke test of the script on this CPU (`python {SCRIPT} {' '.join(TINY_ARGS)}`, a tiny random "
            f"LLaVA-NeXT, not comparable with the paper): ran, pre-fill {lengths}."
        )
    return Result(markdown, data, notes, headline)
