"""The benchmark harness runs every table and reports what it measured.

``python -m benchmarks.run --smoke`` runs each table at tiny sizes (the figures mean nothing);
these tests check the report's structure and the facts that do not depend on speed — token
counts, that every decoder returns the same frames, that a warm ``ask`` decodes nothing. No
test asserts a time (DESIGN.md §4).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("tokens", "decoding", "indexing", "perception", "cache_search", "gpu", "method_benefit")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
         "--video-dir", str(out / "media"), "--only", ",".join(TABLES)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "benchmarks.json").read_text()), (out / "benchmarks.md").read_text(), str(out)


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_every_table_is_reported_with_command_machine_and_date(smoke):
    report, markdown, _out = smoke
    assert report["level"] == "smoke"
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    for number, key in enumerate(TABLES, start=1):
        table = report["tables"][key]
        assert table["status"] == "ok", table["data"].get("error")
        assert table["command"] == f"python -m benchmarks.run --smoke --only {key}"
        assert table["date"] and table["seconds"] >= 0
        assert f"## {number}. {table['title']}" in markdown
    assert markdown.count("_Command: `python -m benchmarks.run --smoke --only ") == len(TABLES)
    assert all(math.isfinite(x) for key in TABLES for x in _numbers(report["tables"][key]["data"]))
    assert "nan" not in markdown.lower().split() and " inf" not in markdown


def test_token_table_holds_the_papers_counts(smoke):
    data = smoke[0]["tables"]["tokens"]["data"]
    tokens = {p["preset"]: p["tokens"] for p in data["presets"]}
    assert tokens == {"paper": 2648, "slowfast-llava": 3680, "all-50": 28_800, "uniform-8": 4608}
    assert data["presets"][0]["per_pathway"] == {"slow": 693, "middle": 1155, "fast": 800}
    for row in data["budgets"]:
        assert 0 < row["tokens"] <= row["budget"]
    assert next(r for r in data["budgets"] if r["budget"] == 2648)["tokens"] == 2648


def test_method_benefit_compares_selections_at_equal_budgets(smoke):
    data = smoke[0]["tables"]["method_benefit"]["data"]
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["tiny"]["tokens"] == 424 and data["videos"] == 2
    for k in (1, 2, 4, 8):
        guided, uniform = rows[f"guided-{k}"], rows[f"uniform-{k}"]
        assert guided["tokens"] == uniform["tokens"] == 64 * k
        assert guided["needle_recall"] >= uniform["needle_recall"]
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["needle_recall"] <= 1 and row["questions"] > 0
    assert (Path(smoke[2]) / "method_benefit.svg").read_text().startswith("<svg")


def test_decoders_agree_and_figures_are_positive(smoke):
    data = smoke[0]["tables"]["decoding"]["data"]
    methods = {m["method"]: m for m in data["methods"]}
    assert set(methods) == {"decord-inprocess", "decord-sandbox", "pyav-seek", "pyav-all"}
    assert data["default_backend"] in ("decord", "pyav") and data["fastest"] in methods
    for row in methods.values():
        assert row["frames"] == data["num_frames"] == 50
        assert row["frames_per_s"] > 0 and row["seconds"]["median"] > 0
        assert row["peak_rss"] >= row["rss_before"] > 0
        assert row["max_mean_pixel_difference_vs_pyav_seek"] < 1.0  # the same frames came back


def test_indexing_reports_stages_overlap_and_library_add(smoke):
    (guide,) = smoke[0]["tables"]["indexing"]["data"]["guides"]  # the tiny guide only at this level
    seq = guide["sequential"]
    assert guide["frames"] == 2 * 8
    assert all(seq[k] > 0 for k in ("decode", "resize", "guide", "total", "frames_per_s"))
    assert guide["overlapped"]["frames_per_s"] > 0 and guide["overlap_gain"] > 0
    assert guide["library_add"]["frames"] == guide["frames"] and guide["library_add"]["frames_per_s"] > 0


def test_perception_overhead_is_measured_on_the_paper_preset(smoke):
    data = smoke[0]["tables"]["perception"]["data"]
    assert data["num_tokens"] == 2648
    for key in ("perceive", "plan", "gather", "copy_all_frames", "text:tiny guide", "warm_ask_no_generation", "warm_ask_1_token"):
        assert data["timings"][key]["median"] > 0


def test_warm_ask_decodes_nothing_and_search_reports_recall(smoke):
    data = smoke[0]["tables"]["cache_search"]["data"]
    medians = data["ask"]["medians"]
    assert medians["cold"]["decode"] > 0 and medians["cold"]["vision"] > 0
    for warm in ("warm", "new_question"):
        assert medians[warm]["decode"] == 0 and medians[warm]["vision"] == 0
        assert medians[warm]["total"] > 0
    sizes = data["search"]["sizes"]
    assert [s["n"] for s in sizes] == [1000, 3000]
    for size in sizes:
        assert size["flat"]["latency"]["median"] > 0 and size["flat"]["memory"] > 0
        for ef in (128, 512):
            entry = size["hnsw"][f"ef_search_{ef}"]
            assert 0 <= entry["recall_at_10_random"] <= 1 and 0 <= entry["recall_at_10_near-duplicate"] <= 1
            assert 0 <= entry["source_found_near-duplicate"] <= 1
            assert entry["latency"]["median"] > 0
        assert size["flat"]["source_found_near-duplicate"] == 1.0  # exact search finds the source frame


def test_gpu_table_runs_the_prefill_script(smoke):
    import torch

    table = smoke[0]["tables"]["gpu"]
    assert table["data"]["returncode"] == 0
    if not torch.cuda.is_available():
        assert "No GPU was lent to this run" in table["markdown"]
        assert "no CUDA GPU" in table["data"]["output"]
