"""Shared pieces of the benchmark harness: sizes per level, timing medians, peak memory,
machine description, benchmark videos and Markdown tables.

Every table module exposes ``KEY``, ``TITLE`` and ``run(ctx) -> Result``; :mod:`benchmarks.run`
calls them, stamps each with the command, the machine and the date, and writes
``benchmarks.md`` and ``benchmarks.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Benchmark levels, largest first. ``full`` is ``make bench``; ``quick`` is ``make bench-quick``
#: (and CI); ``smoke`` is what the test suite runs: every table, tiny sizes, figures meaningless.
LEVELS = ("full", "quick", "smoke")


@dataclass
class Context:
    """What a table module gets: the level, where to keep generated media, a log."""

    level: str
    work_dir: Path
    """Generated videos (reused between runs while their parameters match)."""
    scratch: Path
    """A temporary folder for this run (libraries, caches), removed afterwards."""
    out_dir: Path | None = None
    """Where the document goes (a table may put a figure file next to it)."""
    argv: list[str] = field(default_factory=list)

    def pick(self, full: Any, quick: Any, smoke: Any) -> Any:
        """The value for this run's level."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.level]

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    """One table: Markdown for the document, raw figures for the JSON, notes under the table."""

    markdown: str
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    """One-line findings for the document's summary."""


_GUIDES: dict[str, Any] = {}


def vit_b32_guide() -> Any:
    """A full-size ViT-B-32 CLIP guide with random weights (seed 0), built once per run.

    ``open_clip.create_model("ViT-B-32", pretrained=None)`` wrapped by ClipGuide's constructor,
    with a fixed identity (so no digest of the 151M weights is computed): the cost of running
    it does not depend on the weights.
    """
    if "vit-b-32" not in _GUIDES:
        import logging

        import open_clip
        import torch

        from freevllm_tools.guide import ClipGuide

        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model("ViT-B-32", pretrained=None)
        _GUIDES["vit-b-32"] = ClipGuide(
            model, open_clip.get_tokenizer("ViT-B-32"), model_config=open_clip.get_model_config("ViT-B-32"),
            identity="ViT-B-32@random-seed0", name="ViT-B-32", device="cpu",
        )
    return _GUIDES["vit-b-32"]


# -- timing -----------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the samples themselves (seconds)."""
    values = [float(s) for s in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "all": values,
    }


def time_call(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> tuple[dict[str, Any], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; (summary, last value)."""
    value = None
    for _ in range(warmup):
        value = fn()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        value = fn()
        samples.append(time.perf_counter() - start)
    return summarize(samples), value


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident memory, bytes: of this process (``RUSAGE_SELF``) or of the largest of its
    waited-for children (``RUSAGE_CHILDREN``).

    For this process it is ``VmHWM`` from /proc (the high-water mark of this program's own
    memory). ``getrusage`` is not used for it: Linux carries the high-water mark across
    ``exec``, so a child started from a big parent would report the parent's size. A child's
    figure (``RUSAGE_CHILDREN``) has that caveat: it is at least what its parent held when
    it started the child.
    """
    if who == resource.RUSAGE_SELF:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    peak = resource.getrusage(who).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class ChildRun:
    """A finished child process: its JSON answer, exit status, wall time."""

    result: dict[str, Any] | None
    returncode: int
    wall_s: float
    stderr: str


def run_child(args: Sequence[str], *, timeout: float = 900.0, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``python args...`` from the repository root in a fresh process.

    The child prints one JSON object as its last stdout line (with its own peak memory, from
    :func:`peak_rss_bytes`): each measurement starts from a clean interpreter, and no earlier
    run's memory counts against it.
    """
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, env=env,
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stdout = -9, ""
        stderr = f"timed out after {timeout:.0f} s: {exc.stderr or ''}"
    wall = time.perf_counter() - start
    result = None
    lines = stdout.strip().splitlines()
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
    return ChildRun(result, returncode, wall, str(stderr)[-3000:])


# -- machine ------------------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - absent or unreadable: just say so
        return None


def machine_info() -> dict[str, Any]:
    """What ran the benchmarks: CPU, cores, memory, load, library versions, GPU."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": cores,
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            name: _version(name)
            for name in ("av", "decord", "faiss-cpu", "open_clip_torch", "transformers", "numpy")
        },
        "load_average": load_average(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line: ``Intel Xeon, 2 cores, 23.5 GiB, torch 2.x (2 threads), no GPU``."""
    gpu = info.get("gpu") or "no GPU"
    return (
        f"{info['cpu']} ({info['arch']}), {info['cores']} cores, {info['memory_gib']} GiB RAM, "
        f"{info['os']}, Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), {gpu}"
    )


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# -- media -----------------------------------------------------------------------------------------


def make_video(
    path: Path,
    *,
    seconds: float,
    size: tuple[int, int] = (1280, 720),
    fps: int = 24,
    seed: int = 0,
    gop: int = 250,
) -> tuple[Path, dict[str, Any]]:
    """An H.264 test video, generated once and reused while its parameters match.

    Low-complexity content that still has texture and motion: a gradient with fixed fine
    grain, scrolling sideways, and a bright block crossing it; encoded with libx264
    ``ultrafast``, CRF 23, a keyframe every ``gop`` frames (x264's default 250), yuv420p.
    Written to a temporary name and renamed, so a killed run leaves no half file. Returns the
    path and how it was made (with the seconds generation took when it was made now).
    """
    import av

    width, height = size
    params = {
        "seconds": seconds, "size": [width, height], "fps": fps, "seed": seed, "gop": gop,
        "codec": "libx264", "preset": "ultrafast", "crf": 23, "version": 1,
    }
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        try:
            stored = json.loads(sidecar.read_text())
            if stored.get("params") == params:
                return path, {**stored, "reused": True}
        except ValueError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = round(seconds * fps)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    shift = int(rng.integers(0, 256))
    base = ((xx * 255 // width + yy * 64 // height + shift) % 200 + rng.integers(0, 40, (height, width)))
    base = base.astype(np.uint8)
    chroma = np.full((height // 2, width // 2), 128 + int(rng.integers(-40, 40)), np.uint8)
    block_h, block_w = max(2, height // 4) & ~1, max(2, width // 8) & ~1
    started = time.perf_counter()
    partial = path.with_name(path.name + ".partial.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {"preset": "ultrafast", "crf": "23", "g": str(gop)}
        plane = np.empty((height * 3 // 2, width), np.uint8)
        plane[height : height + height // 4] = chroma.reshape(height // 4, width)
        plane[height + height // 4 :] = chroma.reshape(height // 4, width)
        for i in range(frames):
            luma = plane[:height]
            luma[:] = np.roll(base, 4 * i, axis=1)
            x0 = (7 * i) % max(1, width - block_w)
            y0 = (height - block_h) // 2
            luma[y0 : y0 + block_h, x0 : x0 + block_w] = 235
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(partial, path)
    made = {"params": params, "frames": frames, "bytes": path.stat().st_size,
            "made_in_s": time.perf_counter() - started}
    sidecar.write_text(json.dumps(made, indent=2))
    return path, {**made, "reused": False}


# -- Markdown ----------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column: l, r or c (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    """Seconds with a sensible precision (ms below one second)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 120.0:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def fmt_mib(nbytes: float) -> str:
    if nbytes >= 10 * 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:,.0f} MiB"


def fmt_x(value: float) -> str:
    """A ratio as ``1.23×`` (``<0.01×`` when tiny)."""
    return "<0.01×" if value < 0.01 else f"{value:.2f}×"


def ratio(a: float, b: float) -> float:
    """``a / b``, or ``inf`` when ``b`` is zero."""
    return float("inf") if b == 0 else a / b
