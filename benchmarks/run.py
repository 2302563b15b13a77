"""Run the benchmarks and write ``benchmarks.md`` + ``benchmarks.json``.

    python -m benchmarks.run                  # make bench: every table, full sizes -> docs/
    python -m benchmarks.run --quick          # make bench-quick (CI): reduced sizes, < 2 min -> bench_out/quick/
    python -m benchmarks.run --only decoding  # one table (merged into the existing output)

Tables, in order: ``tokens`` (1), ``decoding`` (2), ``indexing`` (3), ``perception`` (4),
``cache_search`` (5), ``gpu`` (6) and, where ``benchmarks/method_benefit.py`` exists,
``method_benefit``. Each table records the command, the machine and the date; figures are
medians of repeated runs and comparisons are ratios measured side by side in one run.
Generated videos are kept in ``bench_out/media/`` (gitignored) and reused.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .common import ROOT, Context, Result, load_average, machine_info, machine_line, now

#: (key, module) in the order the document lists them.
TABLES: list[tuple[str, str]] = [
    ("tokens", "benchmarks.tokens"),
    ("decoding", "benchmarks.decoding"),
    ("indexing", "benchmarks.indexing"),
    ("perception", "benchmarks.perception"),
    ("cache_search", "benchmarks.cache_search"),
    ("gpu", "benchmarks.gpu"),
    ("method_benefit", "benchmarks.method_benefit"),
]
#: Tables that may be absent (another issue delivers them); skipped, with a note, when missing.
OPTIONAL = {"method_benefit"}
NUMBERS = {"tokens": 1, "decoding": 2, "indexing": 3, "perception": 4, "cache_search": 5, "gpu": 6,
           "method_benefit": 7}
FLAGS = {"full": "", "quick": " --quick", "smoke": " --smoke"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes, under two minutes (CI)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, every table, for the test suite: checks the harness, figures meaningless")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/ for a full run, "
                        "bench_out/<level>/ otherwise)")
    parser.add_argument("--only", help="comma-separated table keys to run: " + ", ".join(k for k, _ in TABLES))
    parser.add_argument("--video-dir", type=Path, help="where generated videos are kept (default bench_out/media)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the document's header, e.g. what else loaded the machine")
    return parser.parse_args(argv)


class Skipped(Exception):
    """A table that cannot run yet (what it needs is not there); recorded, not a failure."""


#: Videos the method-benefit sweep runs on in a full run (its own command line's default).
BENEFIT_VIDEOS = 60


def _method_benefit(ctx: Context) -> Result:
    """Include ``benchmarks/method_benefit.py`` (issue 9), written and owned elsewhere.

    Preferred contract: a function ``benchmark(level: str, out_dir: Path) -> dict`` with
    ``markdown`` (and optionally ``data``, ``notes``, ``headline``). Until it exists, the
    module's ``run(num_videos, out)`` and ``markdown(report)`` are used in a full run (its plot,
    ``method_benefit.svg``, is copied next to the document); quick and smoke runs skip it.
    """
    module = importlib.import_module("benchmarks.method_benefit")
    entry = getattr(module, "benchmark", None)
    if callable(entry):
        got = entry(ctx.level, ctx.out_dir)
        return Result(got["markdown"], got.get("data", {}), list(got.get("notes", [])), list(got.get("headline", [])))
    if ctx.level != "full":
        return Result("_Runs in the full suite only (`make bench`)._", {"skipped": ctx.level}, [], [])
    from freevllm_tools.errors import ModelError

    folder = ctx.scratch / "method_benefit"
    try:
        report = module.run(BENEFIT_VIDEOS, folder)
    except ModelError as exc:  # its trained tiny models are not in the tree yet
        raise Skipped(str(exc)) from exc
    markdown = module.markdown(report).rstrip()
    plot = folder / "method_benefit.svg"
    if plot.exists() and ctx.out_dir is not None:
        shutil.copyfile(plot, ctx.out_dir / "method_benefit.svg")
        markdown += "\n\n![accuracy and needle recall against visual tokens, guided vs uniform](method_benefit.svg)"
    command = f"python benchmarks/method_benefit.py --videos {BENEFIT_VIDEOS}"
    return Result(markdown, report, [f"The sweep is `{command}`'s; this harness only includes it."], [])


def _run_table(key: str, module_name: str, ctx: Context) -> dict[str, Any]:
    module = None
    if key != "method_benefit":
        module = importlib.import_module(module_name)
    title = getattr(module, "TITLE", "The method's benefit: prompt-guided vs uniform selection at equal budgets")
    entry: dict[str, Any] = {"number": NUMBERS[key], "title": title, "level": ctx.level}
    flag = FLAGS[ctx.level]
    entry["command"] = f"python -m benchmarks.run{flag} --only {key}"
    entry["date"] = now()
    entry["load_before"] = load_average()
    ctx.log(f"{key}: start (load {entry['load_before']})")
    started = time.perf_counter()
    try:
        result = _method_benefit(ctx) if key == "method_benefit" else module.run(ctx)
        entry.update(status="ok", markdown=result.markdown, notes=result.notes,
                     headline=result.headline, data=result.data)
    except Skipped as exc:
        ctx.log(f"{key}: skipped: {exc}")
        entry.update(status="skipped", markdown=f"_Not run: {exc}_", notes=[], headline=[], data={"skipped": str(exc)})
    except Exception as exc:  # noqa: BLE001 - one broken table must not lose the others
        trace = traceback.format_exc()
        ctx.log(f"{key}: FAILED\n{trace}")
        entry.update(status="failed", markdown=f"**This table failed:** `{type(exc).__name__}: {exc}`",
                     notes=[], headline=[], data={"error": trace[-4000:]})
    entry["seconds"] = time.perf_counter() - started
    entry["load_after"] = load_average()
    ctx.log(f"{key}: {entry['status']} in {entry['seconds']:.1f} s (load {entry['load_after']})")
    return entry


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _shown(command: str) -> str:
    """A command as the document shows it: ``--note`` texts are listed under it, not in it."""
    words = shlex.split(command)
    kept = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word == "--note":
            skip = True
            continue
        if not word.startswith("--note="):
            kept.append(word)
    return shlex.join(kept)


def render(report: dict[str, Any]) -> str:
    """The Markdown document from the JSON report."""
    level = report["level"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.run` (`make bench`; `make bench-quick` runs reduced sizes). "
        "Do not edit by hand: rerun the command. Raw figures: `benchmarks.json` next to this file. "
        "Figures are medians of repeated runs; comparisons are ratios measured side by side in one run; "
        "no test asserts a time.",
        "",
    ]
    if level != "full":
        lines += [f"> **{level.upper()} RUN**: reduced sizes; the figures only show that the harness works.", ""]
    machine = report["machine"]
    lines.append(f"- **Machine**: {machine_line(machine)}.")
    for run in report["runs"]:
        lines.append(
            f"- **Run**: `{_shown(run['command'])}` — {run['date']}, {run['seconds']:.0f} s, tables: {', '.join(run['tables'])}; "
            f"load average (1, 5, 15 min) at start {run['load_before']}, at end {run['load_after']} "
            f"on {machine['cores']} cores."
        )
    lines += [f"- {note}" for note in report.get("notes", [])]
    heads = [h for key, _ in TABLES for h in report["tables"].get(key, {}).get("headline", [])]
    if heads:
        lines += ["", "## Headline figures", ""] + [f"- {h}" for h in heads]
    for key, _ in TABLES:
        table = report["tables"].get(key)
        if table is None:
            continue
        lines += [
            "",
            f"## {table['number']}. {table['title']}",
            "",
            f"_Command: `{table['command']}` · machine: {machine['cpu']}, {machine['cores']} cores · "
            f"date: {table['date']} · load before → after: {table['load_before']} → {table['load_after']} · "
            f"took {table['seconds']:.0f} s_",
            "",
            table["markdown"].rstrip(),
        ]
        if table.get("notes"):
            lines.append("")
            lines += [f"- {note}" for note in table["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    level = "quick" if args.quick else "smoke" if args.smoke else "full"
    out = args.out or (ROOT / "docs" if level == "full" else ROOT / "bench_out" / level)
    work = args.video_dir or ROOT / "bench_out" / "media"
    keys = [k for k, _ in TABLES]
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(wanted) - set(keys))
        if unknown:
            print(f"unknown table(s) {unknown}; expected some of {keys}", file=sys.stderr)
            return 2
        keys = [k for k in keys if k in wanted]
    present = {k for k in OPTIONAL if importlib.util.find_spec(f"benchmarks.{k}") is not None}
    keys = [k for k in keys if k not in OPTIONAL or k in present]

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "benchmarks.json", out / "benchmarks.md"
    previous: dict[str, Any] = {}
    if args.only and json_path.exists():
        try:
            previous = json.loads(json_path.read_text())
        except ValueError:
            previous = {}
        if previous.get("level") != level:
            previous = {}
    started = time.perf_counter()
    machine = machine_info()
    command = "python -m benchmarks.run" + (" " + shlex.join(argv) if argv else "")
    scratch = Path(tempfile.mkdtemp(prefix="freevllm-bench-"))
    ctx = Context(level=level, work_dir=work, scratch=scratch, argv=argv, out_dir=out)
    tables = dict(previous.get("tables", {}))
    try:
        for key in keys:
            tables[key] = _run_table(key, dict(TABLES)[key], ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run = {
        "command": command, "date": now(), "seconds": time.perf_counter() - started, "tables": keys,
        "load_before": machine["load_average"], "load_after": load_average(),
    }
    report = {
        "level": level,
        "machine": machine,
        "runs": [*previous.get("runs", []), run],
        "notes": list(args.note) or list(previous.get("notes", [])),
        "tables": {k: tables[k] for k, _ in TABLES if k in tables},
    }
    json_path.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    md_path.write_text(render(report))
    failed = [k for k in keys if tables[k]["status"] == "failed"]
    print(f"wrote {md_path} and {json_path} ({run['seconds']:.0f} s)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
