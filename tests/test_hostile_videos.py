"""Hostile and odd video files through ``probe``, ``read_frames``, ``ask`` and ``VideoLibrary.add``,
and the limits (``freevllm_tools.limits.Limits``) that bound what one file may cost.

The corpus is made here (PyAV, plus a few bytes patched by hand) next to the real clips of
``../shared/videos``. Every file either decodes correctly (the right frame count, upright, the
container's increasing timestamps, the frame each picture says it is) or raises ``VideoError``
with a message naming the file and the cause. The four entry points run in a worker process, so
a decoder that aborts or segfaults fails the test instead of killing pytest; a worker that dies
or hangs is replaced and the file it was on is reported. Afterwards the feature cache and the
library must hold no entry for a file that failed and no entry that is not whole.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

from freevllm_tools import video as video_module
from freevllm_tools.cache import FeatureCache, hash_file
from freevllm_tools.config import sample_frame_indices
from freevllm_tools.errors import InputError, VideoError
from freevllm_tools.library import VideoLibrary
from freevllm_tools.limits import DEFAULT_LIMITS, Limits
from freevllm_tools.testing import synthetic_frame, write_video

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "videos"
STEPS = ("probe", "read", "ask", "add")
READ_FRAMES = 50  # what read_frames samples by default
ASK_FRAMES = 8  # ask and the library sample 8 frames (uniform), to keep the tiny models quick


# -- the corpus ------------------------------------------------------------------------------------


@dataclass
class Expect:
    """What a file must give: a VideoError matching ``error``, or these frames."""

    error: str | None = None
    """Regex the VideoError message must match; None: the file must decode."""
    frames: int | None = None
    """Frames in the video."""
    size: tuple[int, int] | None = None
    """(width, height) as displayed (upright)."""
    times: np.ndarray | None = None
    """Presentation time of every frame, seconds."""
    numbers: Callable[[int], int] | None = None
    """Frame index -> the number ``synthetic_frame`` drew in it (None: not a synthetic video)."""
    may_break: bool = False
    """A damaged file: a VideoError, or the frames before the break with ``partial`` set."""


def _frames(first: int, count: int, size=(64, 48), seed: int = 0) -> np.ndarray:
    return np.stack([synthetic_frame(first + i, size, seed=seed) for i in range(count)])


def _encode(path: Path, pictures, *, codec: str, rate, pix_fmt: str, pts=None, time_base=None,
            options=None, container_options=None) -> Path:
    """Write ``pictures`` (upright RGB) with PyAV, frame i at ``pts[i]`` (default i)."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = pictures[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if options:
            stream.options = options
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = int(pts[i]) if pts is not None else i
            if time_base is not None:
                frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _noisy(count: int) -> np.ndarray:
    """Frames that compress badly, so that 60 KB holds only a few of them."""
    noise = np.random.default_rng(0).integers(-24, 24, (count, 120, 160, 3))
    return np.clip(_frames(0, count, (160, 120), seed=5).astype(int) + noise, 0, 255).astype(np.uint8)


def _png(picture: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return out.getvalue()


def _jpeg(picture: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (CRC fixed) claims ``width`` x ``height``: FFmpeg's PNG decoder
    allocates the claimed picture (about 600 MB for 16000x12000) before it finds the data short."""
    data = bytearray(_png(synthetic_frame(7)))
    at = data.find(b"IHDR")
    struct.pack_into(">II", data, at + 4, width, height)
    struct.pack_into(">I", data, at + 17, zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def _mjpeg_avi_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 6-frame MJPEG AVI, then every size field patched: the AVI main header (avih), the
    stream's BITMAPINFOHEADER (strf) and each JPEG frame's SOF0 marker."""
    _encode(path, _frames(0, 6), codec="mjpeg", rate=10, pix_fmt="yuvj420p")
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, data.find(b"avih") + 8 + 32, width, height)
    struct.pack_into("<ii", data, data.find(b"strf") + 8 + 4, width, height)
    at, patched = 0, 0
    while (at := data.find(b"\xff\xc0", at)) >= 0:
        struct.pack_into(">HH", data, at + 5, height, width)
        at, patched = at + 2, patched + 1
    assert patched == 6
    path.write_bytes(bytes(data))
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


VFR_PTS_MS = np.cumsum([0, *np.random.default_rng(3).integers(10, 300, 39)])
LONG = {"frames": 9000, "fps": 15, "size": (40, 24)}  # ten minutes of 40x24 frames


def make_corpus(folder: Path) -> dict[str, Expect]:
    """Write the generated corpus into ``folder``; returns name -> expectation."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, Expect] = {}

    def bad(name: str, error: str) -> None:
        corpus[name] = Expect(error=error)

    (folder / "zero.mp4").write_bytes(b"")
    bad("zero.mp4", r"empty \(0 bytes\)")
    (folder / "random.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 200_000, np.uint8).tobytes())
    bad("random.mp4", "not a video FFmpeg can read")
    (folder / "text.mp4").write_text("This is not a video, only text.\n" * 80)
    bad("text.mp4", "not a video FFmpeg can read")
    _audio_only(folder / "audio.mp4")
    bad("audio.mp4", r"no video stream \(streams: audio\)")

    # An MP4 cut after its first 60 KB: with the index (moov) at the end it is gone; with it in
    # front ("faststart") the first frames are there and the rest is missing.
    whole = _encode(folder / "whole.mp4", _noisy(60), codec="libx264", rate=25, pix_fmt="yuv420p",
                    options={"crf": "12"})
    (folder / "cut.mp4").write_bytes(whole.read_bytes()[:60_000])
    bad("cut.mp4", "not a video FFmpeg can read")
    front = _encode(folder / "front.mp4", _noisy(60), codec="libx264", rate=25, pix_fmt="yuv420p",
                    options={"crf": "12"}, container_options={"movflags": "faststart"})
    assert whole.stat().st_size > 120_000 and front.stat().st_size > 120_000
    (folder / "cut_faststart.mp4").write_bytes(front.read_bytes()[:60_000])
    corpus["cut_faststart.mp4"] = Expect(size=(160, 120), times=np.arange(60) / 25, numbers=lambda i: i,
                                         may_break=True)
    whole.unlink()
    front.unlink()

    # Pictures named .mp4: FFmpeg's image demuxers read them as one-frame videos.
    (folder / "png.mp4").write_bytes(_png(synthetic_frame(7)))
    corpus["png.mp4"] = Expect(frames=1, size=(64, 48), times=np.zeros(1), numbers=lambda i: 7)
    (folder / "jpeg.mp4").write_bytes(_jpeg(synthetic_frame(9)))
    corpus["jpeg.mp4"] = Expect(frames=1, size=(64, 48), times=np.zeros(1), numbers=lambda i: 9)

    # Enormous pictures claimed by a header; decoders would allocate them.
    (folder / "huge_png.mp4").write_bytes(_png_claiming(16000, 12000))
    bad("huge_png.mp4", r"Limits\.max_pixels")
    _mjpeg_avi_claiming(folder / "huge_mjpeg.avi", 16000, 12000)
    bad("huge_mjpeg.avi", r"Limits\.max_pixels")

    gray = np.stack([np.full((1, 1, 3), 40 * i, np.uint8) for i in range(5)])
    _encode(folder / "one_pixel.mp4", gray, codec="libx264", rate=10, pix_fmt="yuv444p")
    corpus["one_pixel.mp4"] = Expect(frames=5, size=(1, 1), times=np.arange(5) / 10)

    write_video(folder / "two_frames.mp4", num_frames=2, fps=10)
    corpus["two_frames.mp4"] = Expect(frames=2, size=(64, 48), times=np.arange(2) / 10, numbers=lambda i: i)
    for rotation in (90, 180, 270):
        write_video(folder / f"rot{rotation}.mp4", _frames(0, 8), fps=10, rotation=rotation)
        corpus[f"rot{rotation}.mp4"] = Expect(frames=8, size=(64, 48), times=np.arange(8) / 10, numbers=lambda i: i)

    _encode(folder / "vfr.mp4", _frames(0, len(VFR_PTS_MS)), codec="libx264", rate=30, pix_fmt="yuv420p",
            pts=VFR_PTS_MS, time_base=Fraction(1, 1000))
    corpus["vfr.mp4"] = Expect(frames=len(VFR_PTS_MS), size=(64, 48), times=VFR_PTS_MS / 1000, numbers=lambda i: i)

    write_video(folder / "long_tiny.mp4", num_frames=LONG["frames"], size=LONG["size"], fps=LONG["fps"])
    corpus["long_tiny.mp4"] = Expect(frames=LONG["frames"], size=LONG["size"],
                                     times=np.arange(LONG["frames"]) / LONG["fps"], numbers=lambda i: i % 1024)

    _encode(folder / "anim.gif", _frames(0, 12), codec="gif", rate=10, pix_fmt="rgb8")
    corpus["anim.gif"] = Expect(frames=12, size=(64, 48), times=np.arange(12) / 10, numbers=lambda i: i)
    return corpus


def shared_corpus() -> dict[str, Expect]:
    """The real clips, as ``../shared/videos/README.md`` describes them."""
    if not SHARED.is_dir():
        return {}
    return {
        "flipping_a_pancake.mkv": Expect(frames=310, size=(426, 240)),
        "sample_demo_3.mp4": Expect(frames=146, size=(640, 360), times=np.arange(146) * 1001 / 24000),
        "video_90.mov": Expect(frames=3, size=(320, 568)),
        "no_duration.webm": Expect(frames=74, size=(1280, 720)),
        "corrupted.mp4": Expect(may_break=True),
    }


# -- the worker: the four entry points, one file at a time -----------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, os, sys, time, traceback
    import numpy as np
    from freevllm_tools.config import PerceptionConfig
    from freevllm_tools.errors import FreeVideoError
    from freevllm_tools.library import VideoLibrary
    from freevllm_tools.testing import read_frame_number, tiny_free_video_llm
    from freevllm_tools.video import probe, read_frames

    cache_dir, library_dir, *paths = sys.argv[1:]
    qa = tiny_free_video_llm(cache_dir, config=PerceptionConfig.uniform(8), max_new_tokens=4)
    library = VideoLibrary(library_dir, qa.guide, cache=qa.cache, num_frames=8, frames_per_second=False)

    def say(**message):
        sys.stdout.write(json.dumps(message) + "\\n")
        sys.stdout.flush()

    def red(image):
        r, g, b = (int(v) for v in image[-1, 0])
        return r > 150 and g < 110 and b < 110

    def probe_step(path):
        info = probe(path)
        return {"frames": info.num_frames, "size": [info.width, info.height], "rotation": info.rotation}

    def read_step(path):
        frames = read_frames(path, 50)
        return {
            "shape": list(frames.images.shape), "indices": frames.indices.tolist(),
            "timestamps": frames.timestamps.tolist(), "partial": frames.partial,
            "numbers": [read_frame_number(im) if im.shape[1] >= 10 else -1 for im in frames.images],
            "red": [red(im) for im in frames.images], "backend": frames.info.backend,
        }

    def ask_step(path):
        result = qa.ask(path, "What moves across the picture?")
        return {"video": result.video, "tokens": result.num_visual_tokens, "answer": result.answer,
                "times": result.timestamps}

    def add_step(path):
        report = library.add(path, progress=False)
        return {"added": report.added, "failed": report.failed, "warnings": report.warnings}

    steps = {"probe": probe_step, "read": read_step, "ask": ask_step, "add": add_step}
    say(ready=True)
    for path in paths:
        for step, run in steps.items():
            say(file=path, step=step, start=True)
            started = time.perf_counter()
            try:
                out = {"ok": run(path)}
            except FreeVideoError as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            except Exception as exc:
                out = {"error": type(exc).__name__, "message": str(exc), "unexpected": traceback.format_exc()}
            out["seconds"] = time.perf_counter() - started
            say(file=path, step=step, result=out)
    library.close()
    say(done=True)
    """
)

STEP_TIMEOUT_S = 120.0


def _start_worker(cache: Path, library: Path, paths: list[str], script: str) -> tuple[subprocess.Popen, queue.Queue]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models; 2 shared cores
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(cache), str(library), *paths],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(library.parent),
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, lines


def run_entry_points(
    paths: list[str], cache: Path, library: Path, *, script: str = _WORKER, step_timeout: float = STEP_TIMEOUT_S
) -> tuple[dict, list[str], float]:
    """Every step on every path in worker processes: ({(path, step): result}, crashes, seconds).

    A worker that dies (a crash in native code) or stops answering is replaced; the step it was
    on is recorded as a crash and the next file goes on in a new worker.
    """
    results: dict[tuple[str, str], dict] = {}
    crashes: list[str] = []
    todo = list(paths)
    started = time.perf_counter()
    while todo:
        proc, lines = _start_worker(cache, library, todo, script)
        current: tuple[str, str] | None = None
        finished = False
        while True:
            try:
                line = lines.get(timeout=step_timeout + (60 if current is None else 0))
            except queue.Empty:
                proc.kill()
                line = None
                crashes.append(f"{current}: no answer for {step_timeout:.0f} s (hung); killed")
            if line is None:
                break
            message = json.loads(line)
            if message.get("done"):
                finished = True
            elif message.get("start"):
                current = (message["file"], message["step"])
            elif "result" in message:
                results[(message["file"], message["step"])] = message["result"]
                current = None
        code = proc.wait()
        if finished:
            break
        if current is None:
            raise AssertionError(f"the worker stopped before it started (exit {code}); is the package importable?")
        if not any(current[0] in c for c in crashes):
            crashes.append(f"{current}: the worker died with exit status {code}")
        todo = todo[todo.index(current[0]) + 1 :]
    return results, crashes, time.perf_counter() - started


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    corpus = {str(base / "corpus" / name): expect for name, expect in make_corpus(base / "corpus").items()}
    corpus.update({str(SHARED / name): expect for name, expect in shared_corpus().items()})
    results, crashes, seconds = run_entry_points(list(corpus), base / "cache", base / "library")
    print(f"\nhostile corpus: {len(corpus)} files x {len(STEPS)} entry points in {seconds:.1f} s")
    return SimpleNamespace(corpus=corpus, results=results, crashes=crashes, base=base)


_FAKE_WORKER = textwrap.dedent(
    """
    import ctypes, json, sys, time
    def say(**message):
        print(json.dumps(message), flush=True)
    say(ready=True)
    for path in sys.argv[3:]:
        for step in ("probe", "read", "ask", "add"):
            say(file=path, step=step, start=True)
            if path == "segfault" and step == "read":
                ctypes.string_at(0)  # what a decoder's bug does to its process
            if path == "hang" and step == "ask":
                time.sleep(600)
            say(file=path, step=step, result={"ok": {}, "seconds": 0})
    say(done=True)
    """
)


def test_the_harness_reports_a_crash_or_a_hang_and_goes_on(tmp_path):
    paths = ["fine", "segfault", "after", "hang", "last"]
    results, crashes, _ = run_entry_points(paths, tmp_path, tmp_path / "lib", script=_FAKE_WORKER, step_timeout=2)
    assert len(crashes) == 2
    assert "('segfault', 'read')" in crashes[0] and "exit status -11" in crashes[0]
    assert "('hang', 'ask')" in crashes[1] and "hung" in crashes[1]
    assert {p for p, _ in results} == {"fine", "segfault", "after", "hang", "last"}
    assert (("segfault", "read") not in results) and all((p, s) in results for p in ("fine", "after", "last") for s in STEPS)


# -- what each file must give ------------------------------------------------------------------------


def test_no_entry_point_crashed_or_hung(outcome):
    assert outcome.crashes == []
    missing = [(Path(p).name, s) for p in outcome.corpus for s in STEPS if (p, s) not in outcome.results]
    assert missing == []
    unexpected = {
        (Path(p).name, s): r["unexpected"] for (p, s), r in outcome.results.items() if "unexpected" in r
    }
    assert unexpected == {}, "only the package's own errors may come out:\n" + "\n".join(unexpected.values())


def _check_error(path: str, step: str, result: dict, pattern: str) -> None:
    name = Path(path).name
    if step == "add":
        assert result["ok"]["added"] == [], (name, result)
        [(failed, reason)] = result["ok"]["failed"]
        assert Path(failed).name == name and re.search(pattern, reason), (name, reason)
        return
    assert result.get("error") == "VideoError", (name, step, result)
    assert name in result["message"] and re.search(pattern, result["message"]), (name, step, result["message"])
    assert ";" in result["message"], "a cause and a fix: " + result["message"]


def _check_frames(path: str, expect: Expect, results: dict) -> None:
    name = Path(path).name
    probe, read, ask, add = (results[(path, s)] for s in STEPS)
    if expect.may_break and "error" in read:
        assert read["error"] == "VideoError" and name in read["message"]
        for step, result in (("ask", ask), ("add", add)):
            _check_error(path, step, result, ".")
        return
    assert "ok" in probe and "ok" in read, (name, probe, read)
    info, frames = probe["ok"], read["ok"]
    count = len(frames["indices"])
    if expect.frames is not None:
        assert info["frames"] == expect.frames, name
    if expect.size is not None:
        assert tuple(info["size"]) == expect.size, name
        assert frames["shape"][1:] == [expect.size[1], expect.size[0], 3], (name, "not upright")
    indices = np.asarray(frames["indices"])
    times = np.asarray(frames["timestamps"])
    if frames["partial"]:
        assert expect.may_break, (name, "a sound file came back partial")
        assert 0 < count < min(READ_FRAMES, info["frames"])
        assert set(indices) <= set(sample_frame_indices(info["frames"], READ_FRAMES))
    else:
        assert indices.tolist() == sample_frame_indices(info["frames"], READ_FRAMES), name
    assert count == frames["shape"][0]
    assert np.all(np.diff(times) > 0) and times[0] >= 0, (name, "timestamps must increase")
    if expect.times is not None:
        np.testing.assert_allclose(times, expect.times[indices], atol=1e-6, err_msg=name)
    if expect.numbers is not None:
        assert frames["numbers"] == [expect.numbers(i) for i in indices], (name, "wrong pictures")
        assert all(frames["red"]), (name, "the marker is not at the bottom left: not upright")
    assert "ok" in ask, (name, ask)
    assert ask["ok"]["video"] == os.path.realpath(path) and ask["ok"]["tokens"] > 0
    asked = set(np.round(ask["ok"]["times"], 4))
    if expect.times is not None:  # the answer is grounded on the frames the sampling rule picks
        assert asked <= set(np.round(expect.times[sample_frame_indices(info["frames"], ASK_FRAMES)], 4)), name
    elif info["frames"] <= READ_FRAMES:
        assert asked <= set(np.round(times, 4)), (name, "grounding on frames that do not exist")
    assert add["ok"]["failed"] == [] and [Path(p).name for p in add["ok"]["added"]] == [name], (name, add)
    assert bool(add["ok"]["warnings"]) == frames["partial"], (name, add)


def test_each_file_decodes_correctly_or_raises_a_clear_video_error(outcome):
    checked = 0
    for path, expect in outcome.corpus.items():
        steps = {s: outcome.results.get((path, s)) for s in STEPS}
        if any(r is None for r in steps.values()):
            continue  # reported by test_no_entry_point_crashed_or_hung
        if expect.error is not None:
            for step, result in steps.items():
                _check_error(path, step, result, expect.error)
        else:
            _check_frames(path, expect, outcome.results)
        checked += 1
    assert checked == len(outcome.corpus)


def test_no_partial_cache_or_library_entry_is_left(outcome):
    decoded = {
        os.path.realpath(p) for p in outcome.corpus
        if "ok" in outcome.results.get((p, "read"), {})
    }
    failed = [p for p in outcome.corpus if os.path.realpath(p) not in decoded]
    library = VideoLibrary(outcome.base / "library", None, cache=False)
    try:
        assert library.repairs == []
        assert {r.path for r in library.videos()} == decoded
        state = library.check()
        assert state["consistent"]
        rows = library._connect().execute(
            "SELECT videos.indexed_frames, COUNT(frames.id), MAX(frames.position) FROM videos "
            "LEFT JOIN frames ON frames.video_id = videos.id GROUP BY videos.id"
        ).fetchall()
        assert all(indexed == count == top + 1 for indexed, count, top in rows)
        orphans = library._connect().execute(
            "SELECT COUNT(*) FROM frames WHERE video_id NOT IN (SELECT id FROM videos)"
        ).fetchone()[0]
        assert orphans == 0
    finally:
        library.close()
    cache = FeatureCache(outcome.base / "cache")
    try:
        bad_keys = {hash_file(p) for p in failed if os.path.isfile(p) and os.path.getsize(p)}
        entries = cache.entries()
        assert entries and not [e for e in entries if e.video_key in bad_keys]
        for entry in entries:  # every entry whole: each of its arrays loads
            held = cache.get(entry.video_key, entry.name)
            assert held is not None and held.names
            for name in held.names:
                assert held.array(name).size > 0
    finally:
        cache.close()
    leftovers = [p for p in (outcome.base / "cache").rglob(".tmp-*")] + list((outcome.base / "library").glob(".tmp-*"))
    assert leftovers == []


# -- an enormous header is refused before anything is allocated --------------------------------------

_MEMORY = textwrap.dedent(
    """
    import json, resource, sys
    import av, numpy  # imported before the measurement: only the probe's own allocations count
    from freevllm_tools.errors import VideoError
    from freevllm_tools.limits import Limits
    from freevllm_tools.video import probe
    path, unlimited = sys.argv[1], sys.argv[2] == "1"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        probe(path, limits=Limits.none() if unlimited else None)
        message = None
    except VideoError as exc:
        message = str(exc)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mb": grown / 1024, "message": message}))
    """
)


def test_enormous_header_is_refused_without_allocating_the_picture(tmp_path):
    path = tmp_path / "huge.mp4"
    path.write_bytes(_png_claiming(16000, 12000))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    for unlimited in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", _MEMORY, str(path), unlimited], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        runs[unlimited] = json.loads(done.stdout)
    # The file claims a 16000x12000 picture (PNG IHDR); with no limits nothing refuses it ...
    assert struct.unpack(">II", path.read_bytes()[16:24]) == (16000, 12000)
    assert runs["1"]["message"] is None or "max_pixels" not in runs["1"]["message"]
    # ... with the default max_pixels it refuses before allocating, and says why.
    assert runs["0"]["grown_mb"] < 60
    assert "Limits.max_pixels" in runs["0"]["message"] and "35,389,440" in runs["0"]["message"]


# -- the limits, one by one (safe files, in this process) ----------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("limits")
    return SimpleNamespace(
        short=write_video(folder / "short.mp4", num_frames=30, fps=10),
        long=write_video(folder / "long.mp4", num_frames=1500, size=(32, 24), fps=25),  # 60 s
        webm=write_video(folder / "short.webm", _frames(0, 20), fps=10, codec="libvpx"),
        folder=folder,
    )


@pytest.fixture
def no_open(monkeypatch):
    """Fail the test if FFmpeg is asked to open a file."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"av.open was called: {args[:1]}")

    monkeypatch.setattr(av, "open", refuse)


@pytest.fixture
def no_scan(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the packets were scanned")

    monkeypatch.setattr(video_module, "_scan_stream", refuse)


def test_limits_defaults_and_validation():
    assert DEFAULT_LIMITS == Limits()
    assert Limits().max_pixels == 8192 * 4320 and Limits().max_question_chars == 2000
    assert all(value is None for value in vars(Limits.none()).values())
    assert Limits().replace(max_duration_s=60).max_duration_s == 60
    for bad in ({"max_pixels": 0}, {"max_duration_s": -1.0}, {"max_frames": True}, {"max_decode_s": float("nan")},
                {"max_file_bytes": "4GB"}):
        with pytest.raises(InputError, match=f"Limits.{next(iter(bad))}"):
            Limits(**bad)
    with pytest.raises(InputError, match="limits must be"):
        video_module.probe(__file__, limits={"max_pixels": 1})


def test_file_size_is_checked_before_the_file_is_opened(clips, no_open):
    with pytest.raises(VideoError, match=r"short\.mp4.*bytes, over the limit of 100 bytes \(Limits\.max_file_bytes\)"):
        video_module.read_frames(clips.short, limits=Limits(max_file_bytes=100))


def test_header_duration_and_frame_count_are_checked_before_the_scan(clips, no_scan):
    claim = r"header claims a duration of 60\.0 s, over the limit of 10 s \(Limits\.max_duration_s\)"
    with pytest.raises(VideoError, match=claim):
        video_module.probe(clips.long, limits=Limits(max_duration_s=10))
    with pytest.raises(VideoError, match=r"header claims 1,500 frames, over the limit of 1,000 frames \(Limits\.max_frames\)"):
        video_module.probe(clips.long, limits=Limits(max_frames=1000))


def test_a_header_that_under_reports_is_caught_during_the_scan(clips, monkeypatch):
    monkeypatch.setattr(video_module, "_check_header", lambda *args: None)  # as if the header said nothing
    with pytest.raises(VideoError, match=r"frames span at least 10\.\d s, over the limit of 10 s"):
        video_module.probe(clips.long, limits=Limits(max_duration_s=10))
    with pytest.raises(VideoError, match=r"stream holds at least 1,001 frames, over the limit of 1,000"):
        video_module.probe(clips.long, limits=Limits(max_frames=1000))


def test_shared_webm_without_a_duration_is_bounded_by_its_packets(shared_videos):
    with pytest.raises(VideoError, match=r"no_duration\.webm.*frames span at least 2\.\d+ s"):
        video_module.probe(shared_videos / "no_duration.webm", limits=Limits(max_duration_s=2))


def test_pixels_over_the_limit_are_refused_from_the_header(clips):
    # (A header FFmpeg cannot size within the limit, e.g. huge_png.mp4 above, is refused by FFmpeg itself.)
    pattern = r"header claims frames of 64x48 = 3,072 pixels, over the limit of 1,000 pixels a frame \(Limits\.max_pixels\)"
    with pytest.raises(VideoError, match=pattern):
        video_module.read_frames(clips.short, limits=Limits(max_pixels=1000))
    assert video_module.read_frames(clips.short, 4, limits=Limits(max_pixels=64 * 48)).images.shape == (4, 48, 64, 3)


def test_decoded_bytes_are_checked_before_decoding(clips, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(video_module, "_read_pyav", refuse)
    monkeypatch.setattr(video_module, "_read_decord", refuse)
    with pytest.raises(VideoError, match=r"50 frames of 32x24 need 115,200 bytes.*Limits\.max_decoded_bytes.*fewer frames"):
        video_module.read_frames(clips.long, 50, limits=Limits(max_decoded_bytes=100_000))


def test_probing_past_the_time_limit_stops(clips):
    with pytest.raises(VideoError, match=r"probing ran past the time limit of 1e-06 s \(Limits\.max_decode_s\)"):
        video_module.probe(clips.long, limits=Limits(max_decode_s=1e-6))


def test_pyav_decoding_past_the_time_limit_stops(clips, monkeypatch):
    real = video_module._decoded_frames

    def slow(container, stream):
        for frame in real(container, stream):
            time.sleep(0.05)
            yield frame

    monkeypatch.setattr(video_module, "_decoded_frames", slow)
    started = time.monotonic()
    with pytest.raises(VideoError, match=r"decoding ran past the time limit of 0\.3 s"):
        video_module.read_frames(clips.short, 30, backend="pyav", limits=Limits(max_decode_s=0.3))
    assert time.monotonic() - started < 3


def test_a_hanging_decord_child_is_killed_at_the_time_limit(clips, monkeypatch):
    monkeypatch.setattr(video_module, "_decord_available", lambda: True)
    monkeypatch.setattr(video_module, "_DECORD_WORKER", "import time\ntime.sleep(60)\n")
    started = time.monotonic()
    with pytest.raises(VideoError, match=r"ran past the time limit of 1 s"):
        video_module.read_frames(clips.short, 8, limits=Limits(max_decode_s=1), backend="auto")
    assert time.monotonic() - started < 10  # not the decord child's own 30 s time-out


class _NoModel:
    """Stands in for a guide or an answerer that must never be reached."""

    identity = "none"
    image_size = (8, 8)

    def __getattr__(self, name):
        raise AssertionError(f"a model was used ({name})")


def test_pipeline_checks_the_question_and_the_file_before_any_work(clips, tmp_path, monkeypatch):
    from freevllm_tools.pipeline import FreeVideoLLM

    decodes = []
    monkeypatch.setattr(video_module, "read_frames", lambda *a, **k: decodes.append(a))
    cache = FeatureCache(tmp_path / "cache")
    qa = FreeVideoLLM(_NoModel(), _NoModel(), cache=cache, limits=Limits(max_question_chars=10, max_file_bytes=100))
    with pytest.raises(InputError, match="11 characters long; the limit is 10"):
        qa.ask(clips.short, "x" * 11)
    with pytest.raises(VideoError, match=r"Limits\.max_file_bytes"):
        qa.ask(clips.short, "What?")
    assert decodes == [] and cache.stats.hashes == 0
    cache.close()


def test_library_refuses_a_video_over_a_limit_and_keeps_nothing_of_it(clips, tmp_path):
    class Guide:
        identity, embed_dim = "flat-guide/1", 4

        def encode_frames(self, frames, **_):
            return SimpleNamespace(pooled=np.ones((len(frames), 4), np.float32))

    cache = FeatureCache(tmp_path / "cache")
    library = VideoLibrary(tmp_path / "lib", Guide(), cache=cache, limits=Limits(max_duration_s=30))
    report = library.add([clips.long, clips.short], progress=False)
    assert [Path(p).name for p in report.added] == ["short.mp4"]
    [(path, reason)] = report.failed
    assert Path(path).name == "long.mp4" and "Limits.max_duration_s" in reason
    assert [r.name for r in library.videos()] == ["short.mp4"] and library.check()["consistent"]
    assert cache.entries(hash_file(clips.long)) == []
    library.close()
    cache.close()


def test_features_in_the_cache_are_not_served_past_stricter_limits(clips, tmp_path):
    class Guide:
        identity, embed_dim = "flat-guide/1", 4

        def encode_frames(self, frames, **_):
            return SimpleNamespace(pooled=np.ones((len(frames), 4), np.float32))

    cache = FeatureCache(tmp_path / "cache")
    lenient = VideoLibrary(tmp_path / "a", Guide(), cache=cache, frames_per_second=False)
    assert lenient.add(clips.long, progress=False).added  # its features are in the shared cache now
    strict = VideoLibrary(tmp_path / "b", Guide(), cache=cache, frames_per_second=False, limits=Limits(max_duration_s=30))
    report = strict.add(clips.long, progress=False)
    [(_, reason)] = report.failed
    assert "it lasts 60.0 s, over the limit of 30 s (Limits.max_duration_s)" in reason and len(strict) == 0
    assert cache.stats.hits >= 1  # refused from the cached record, not from a new probe
    for library in (lenient, strict):
        library.close()
    cache.close()
