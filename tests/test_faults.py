"""Faults in the video library: several indexers at once, indexers killed with SIGKILL at random
moments, and damaged files (the FAISS index, its manifest, the SQLite database) found on open.

The guarantees checked (``docs/reliability.md``): the library always opens; what opening had to
repair (and any video it could not restore) is in ``VideoLibrary.repairs``; no video whose ``add``
returned before the fault is lost; no video is ever half there (its row with only some of its
frames, frames without a row, vectors the database does not know); searches find every video.

The videos are VP8 WebM (decoded by PyAV in-process, a few milliseconds each) and the guide is
hand-made (``FaultGuide``: a frame's embedding is a fixed random vector chosen by the number drawn
in the frame), so each indexer process starts in well under a second and needs no model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from freevllm_tools.cache import FeatureCache
from freevllm_tools.library import VideoLibrary, _read_journal
from freevllm_tools.testing import read_frame_number, synthetic_frame, write_video

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FRAMES = 10  # frames per test video; frame k of video v shows the number 100 * (v % 10) + k ... see _video
DIM = 16


class FaultGuide:
    """A guide without a model: the embedding of a frame is a fixed random unit vector chosen by
    the number drawn in it, so each frame of each test video is found by its own vector."""

    identity = "fault-guide/1"
    embed_dim = DIM

    @staticmethod
    def vector(number: int) -> np.ndarray:
        vector = np.random.default_rng(number).normal(size=DIM)
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    def encode_frames(self, frames, **_: object) -> SimpleNamespace:
        return SimpleNamespace(pooled=np.stack([self.vector(read_frame_number(f)) for f in frames]))


def _video(folder: Path, number: int) -> Path:
    """Video ``number``: frames drawn with the numbers ``10 * number + k`` (k < 10), VP8 in WebM."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.stack([synthetic_frame(10 * number + k, seed=number) for k in range(FRAMES)])
    return write_video(folder / f"v{number:03d}.webm", frames, fps=10, codec="libvpx")


def _open(folder: Path, cache: Path | None = None) -> VideoLibrary:
    return VideoLibrary(folder, FaultGuide(), cache=FeatureCache(cache) if cache else False,
                        num_frames=FRAMES, frames_per_second=False)


def _number(path: str) -> int:
    return int(Path(path).stem[1:])


def check_whole(library: VideoLibrary, *, search: bool = True) -> dict[str, list[int]]:
    """Assert the library is whole; returns path -> frame ids."""
    conn = library._connect()
    rows = conn.execute(
        "SELECT videos.path, videos.indexed_frames, COUNT(frames.id), MIN(frames.position), MAX(frames.position) "
        "FROM videos LEFT JOIN frames ON frames.video_id = videos.id GROUP BY videos.id"
    ).fetchall()
    for path, indexed, count, low, high in rows:
        assert indexed == count == FRAMES and (low, high) == (0, FRAMES - 1), (path, indexed, count)
    assert conn.execute("SELECT COUNT(*) FROM frames WHERE video_id NOT IN (SELECT id FROM videos)").fetchone()[0] == 0
    state = library.check()
    assert state["consistent"], state
    ids: dict[str, list[int]] = {}
    for path, frame_id in conn.execute(
        "SELECT videos.path, frames.id FROM frames JOIN videos ON videos.id = frames.video_id ORDER BY frames.id"
    ):
        ids.setdefault(path, []).append(frame_id)
    if search:  # each video is found by the vector of one of its own frames
        for path in ids:
            k = _number(path) % FRAMES
            [hit] = library.search_vector(FaultGuide.vector(10 * _number(path) + k), k=1)
            assert hit.path == path and k in hit.frame_indices and hit.score > 0.99, (path, hit)
    journal = _read_journal(library.path / "videos.jsonl")  # the redundant copy agrees
    assert {v["video"]["path"] for v in journal.videos.values()} == set(ids)
    assert sorted(i for v in journal.videos.values() for i in v["frames"]["ids"]) == sorted(i for v in ids.values() for i in v)
    return ids


# -- indexer processes -----------------------------------------------------------------------------

_INDEXER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import test_faults as t
    from freevllm_tools.cache import FeatureCache
    from freevllm_tools.library import VideoLibrary

    folder, cache, ready, go, *commands = sys.argv[1:]
    library = VideoLibrary(folder, t.FaultGuide(), cache=FeatureCache(cache) if cache != "-" else False,
                           num_frames=t.FRAMES, frames_per_second=False)
    print("ready", flush=True)
    if ready != "-":
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
    for command in commands:
        action, path = command.split(":", 1)
        print("start", action, path, flush=True)
        if action == "add":
            report = library.add(path, progress=False)
            assert report.ok, report.failed
            print("added" if report.added else "skipped", path, flush=True)
        else:
            library.remove(path)
            print("removed", path, flush=True)
    library.close()
    print("closed", flush=True)
    """
).format(tests=str(TESTS))


def _indexer(folder: Path, cache: Path | None, commands: list[str], *, ready: Path | None = None,
             go: Path | None = None, stderr: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    args = [str(folder), str(cache or "-"), str(ready or "-"), str(go or "-"), *commands]
    with open(stderr, "w") if stderr else contextlib.nullcontext(subprocess.PIPE) as err:
        return subprocess.Popen([sys.executable, "-c", _INDEXER, *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env, start_new_session=True)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_indexing_into_one_library_at_once(tmp_path, processes):
    videos = [_video(tmp_path / "videos", n) for n in range(8)]
    folder, cache = tmp_path / "lib", tmp_path / "cache"
    _open(folder, cache).close()
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(processes)]
    # Every process adds every video, each starting at a different one: they race on each file.
    procs = [
        _indexer(folder, cache, [f"add:{videos[(i * 2 + j) % 8]}" for j in range(8)], ready=ready, go=go)
        for i, ready in enumerate(readies)
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    reader = _open(folder, cache)
    searches, errors = [0], []

    def read_meanwhile() -> None:  # a reader in this process searches while they write
        while any(p.poll() is None for p in procs):
            try:
                for hit in reader.search_vector(FaultGuide.vector(10 * random.randrange(8) + 3), k=3):
                    assert hit.path in {str(v) for v in videos} and len(hit.frame_ids) >= 1
                searches[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(exc))

    thread = threading.Thread(target=read_meanwhile)
    go.touch()
    thread.start()
    outputs = [p.communicate(timeout=180) for p in procs]
    thread.join()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    added = [line.split(" ", 1)[1] for out, _ in outputs for line in out.splitlines() if line.startswith("added ")]
    assert sorted(added) == sorted(str(v) for v in videos)  # each video indexed once, by whichever came first
    assert errors == [] and searches[0] > 0
    reader.close()
    library = _open(folder, cache)
    assert library.repairs == []
    ids = check_whole(library)
    assert sorted(ids) == sorted(str(v) for v in videos)
    assert len({i for v in ids.values() for i in v}) == 8 * FRAMES
    library.close()


# -- killed with SIGKILL at random moments ----------------------------------------------------------


def test_indexers_killed_at_random_moments(tmp_path):
    """>= 20 indexers, each killed with SIGKILL after a random delay while it removes one video and
    adds three; after each kill the library opens whole, with every finished change in it."""
    rng = random.Random(int(os.environ.get("FAULT_SEED", "7")))
    folder, cache, videos_dir = tmp_path / "lib", tmp_path / "cache", tmp_path / "videos"
    pool = iter(range(1000))
    present: set[str] = set()  # what must be there: finished adds not removed since
    absent: set[str] = set()  # what must not be there: finished removes
    kill_points: list[str] = []
    uncertain: set[str] = set()  # changes a kill interrupted: settled by what the next open finds

    def trial(kill_after: float | None, *, during_open: bool = False) -> tuple[float, float]:
        """Run one indexer, killed ``kill_after`` s after it opened the library (or after it
        started, ``during_open``); returns (seconds to open, seconds from open to the end)."""
        batch = [str(_video(videos_dir, next(pool))) for _ in range(3)]
        commands = ([f"remove:{rng.choice(sorted(present))}"] if present else []) + [f"add:{p}" for p in batch]
        spawned = time.monotonic()
        proc = _indexer(folder, cache, commands, stderr=tmp_path / "stderr.txt")
        if during_open:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
            opened = time.monotonic()
        else:
            assert proc.stdout.readline().strip() == "ready", proc.communicate()
            opened = time.monotonic()
            if kill_after is not None:
                time.sleep(kill_after)
                proc.send_signal(signal.SIGKILL)  # only the indexer; a decoder child dies with its pipe
        out = proc.stdout.read()  # (not communicate(): it would skip what readline() buffered)
        proc.wait(timeout=120)
        err = (tmp_path / "stderr.txt").read_text()
        assert proc.returncode == (0 if kill_after is None else -signal.SIGKILL) or proc.returncode == 0, err
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it started and left behind
        # A kill can cut the last line short: only whole (newline-terminated) lines count.
        lines = [line for line in out.split("\n")[:-1] if line]
        for line in lines:
            word, _, path = line.partition(" ")
            if word == "added":
                present.add(path)
                absent.discard(path)
            elif word == "removed":
                present.discard(path)
                absent.add(path)
            elif word == "start":  # in flight when killed: either done whole or not done at all
                path = path.split(" ", 1)[1]
                present.discard(path)
                absent.discard(path)
                uncertain.add(path)
        last = lines[-1].split(" ") if lines else ["starting"]
        kill_points.append(" ".join(last[:2]) if last[0] == "start" else last[0])
        return opened - spawned, time.monotonic() - opened

    open_s, work_s = trial(None)  # calibrates the random delays, and leaves a library to work on
    for number in range(22):
        if number % 5 == 4:
            trial(rng.uniform(0.0, open_s), during_open=True)
        else:
            trial(rng.uniform(0.0, 1.1 * work_s))
        library = _open(folder, cache)
        try:
            ids = check_whole(library, search=number % 4 == 0)
            assert present <= set(ids), f"lost {present - set(ids)} (killed at {kill_points[-1]!r})"
            assert not absent & set(ids), f"removed {absent & set(ids)} came back"
            present.update(uncertain & set(ids))
            absent.update(uncertain - set(ids))
            uncertain.clear()
        finally:
            library.close()
    trial(None)  # a last indexer finishes on what the killed ones left
    library = _open(folder, cache)
    ids = check_whole(library)
    assert present <= set(ids) and not absent & set(ids)
    library.close()
    assert list(folder.glob(".tmp-*")) == []
    stages = set(kill_points[1:-1])
    print(f"\nkilled at: {sorted(stages)}")
    assert len(kill_points) - 2 >= 20 and len(stages) >= 3, kill_points  # kills landed at several stages


# -- damaged files found on open -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """A library of 7 videos (one removed and added again, one touched; the newest removed), and its cache."""
    base = tmp_path_factory.mktemp("damage")
    videos = [_video(base / "videos", n) for n in range(7)]
    library = _open(base / "lib", base / "cache")
    assert library.add(videos, progress=False).ok
    library.remove(videos[2])
    os.utime(videos[4], ns=(1, 1))  # touched: skipped, not re-indexed
    assert library.add(videos, progress=False).ok  # videos[2] comes back with new ids
    gone = _video(base / "gone", 90)
    library.add(gone, progress=False)
    library.remove(gone)  # the highest ids now belong to no video
    ids = check_whole(library)
    top = library._connect().execute("SELECT seq FROM sqlite_sequence WHERE name = 'frames'").fetchone()[0]
    assert top > max(i for v in ids.values() for i in v)
    library.close()
    return SimpleNamespace(base=base, videos=videos, ids=ids, top_id=top)


def _copy(built: SimpleNamespace, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(built.base / "lib", tmp_path / "lib")
    shutil.copytree(built.base / "cache", tmp_path / "cache")
    return tmp_path / "lib", tmp_path / "cache"


def _index_file(folder: Path) -> Path:
    return folder / json.loads((folder / "index.json").read_text())["file"]


@pytest.mark.parametrize("damage", ["empty", "other library", "count lies", "points outside", "stale temp"])
def test_damaged_frame_index_is_rebuilt_and_nothing_is_lost(built, tmp_path, damage):
    folder, cache = _copy(built, tmp_path)
    manifest_path = folder / "index.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "empty":
        _index_file(folder).write_bytes(b"")
    elif damage == "other library":  # a valid index of another library (same guide), with its valid manifest
        other = _open(tmp_path / "other")
        other.add(_video(tmp_path / "elsewhere", 40), progress=False)
        other.close()
        shutil.copy(_index_file(tmp_path / "other"), folder / json.loads((tmp_path / "other" / "index.json").read_text())["file"])
        shutil.copy(tmp_path / "other" / "index.json", manifest_path)
    elif damage == "count lies":
        manifest["count"] += 5
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "points outside":
        manifest["file"] = "../../../../../../etc/passwd"
        manifest_path.write_text(json.dumps(manifest))
    else:  # a save killed between write and rename leaves a temp file; it must be ignored, then swept
        (folder / ".tmp-index-99-deadbeef.faiss").write_bytes(os.urandom(4096))
    library = _open(folder, cache)
    if damage == "stale temp":
        assert library.repairs == []
    else:
        assert [r.action for r in library.repairs] in (["rebuilt"], ["caught up"]), library.repairs
        assert library.repairs[0].vectors == len(built.ids) * FRAMES and library.repairs[0].reason
    assert check_whole(library) == built.ids
    library.add(_video(tmp_path / "more", 50), progress=False)  # a write after the repair
    assert len(check_whole(library)) == len(built.ids) + 1
    library.close()
    assert list(folder.glob(".tmp-*")) == []
    assert _open(folder).repairs == []


TRUNCATIONS = ["empty", "one page", "quarter", "half", "all but the last byte", "garbage header"]


@pytest.mark.parametrize("cut", TRUNCATIONS)
@pytest.mark.parametrize("source", ["index file", "feature cache"])
def test_damaged_database_is_rebuilt_from_the_journal(built, tmp_path, cut, source):
    """SQLite truncated (or overwritten): every video comes back, with its frame ids, from the
    journal plus an intact copy of the embeddings (the FAISS file, else the feature cache)."""
    folder, cache = _copy(built, tmp_path)
    db = folder / "library.sqlite"
    data = db.read_bytes()
    sizes = {"empty": 0, "one page": 4096, "quarter": len(data) // 4, "half": len(data) // 2,
             "all but the last byte": len(data) - 1}
    db.write_bytes(os.urandom(len(data)) if cut == "garbage header" else data[: sizes[cut]])
    if source == "feature cache":
        _index_file(folder).write_bytes(os.urandom(2048))
    library = _open(folder, cache if source == "feature cache" else None)
    repair = library.repairs[0]
    assert repair.action == "database rebuilt" and repair.dropped == (), library.repairs
    assert f"{len(built.ids)} of {len(built.ids)} videos restored" in repair.reason and "library.sqlite.damaged-" in repair.reason
    assert check_whole(library) == built.ids  # the same videos, the same frame ids
    assert library.sampling["num_frames"] == FRAMES and library.guide_identity == FaultGuide.identity
    report = library.add(built.videos, progress=False)  # nothing to redo ...
    assert report.ok and report.added == [] and report.updated == []
    new = _video(tmp_path / "more", 60)
    library.add(new, progress=False)  # ... and new ids do not reuse lost ones
    new_ids = check_whole(library)[str(new)]
    assert min(new_ids) > built.top_id
    library.close()
    assert _open(folder).repairs == []
    assert list(folder.glob("library.sqlite.damaged-*"))  # kept for inspection


def test_without_an_intact_copy_the_dropped_videos_are_named_and_re_adding_restores_them(built, tmp_path):
    folder, _ = _copy(built, tmp_path)
    db = folder / "library.sqlite"
    db.write_bytes(db.read_bytes()[:4096])
    _index_file(folder).write_bytes(b"garbage")
    library = _open(folder)  # no cache either
    [repair, *_] = library.repairs
    assert repair.action == "database rebuilt"
    assert sorted(repair.dropped) == sorted(built.ids) and f"dropped {len(built.ids)}" in repair.reason
    assert len(library) == 0 and library.check()["consistent"]
    report = library.add(list(repair.dropped), progress=False)
    assert report.ok and len(report.added) == len(built.ids)
    assert sorted(check_whole(library)) == sorted(built.ids)
    library.close()


def test_a_database_behind_its_journal_is_rebuilt(built, tmp_path):
    """A backup restored over the database (or a lost WAL): the journal has commits the database lacks."""
    folder, cache = _copy(built, tmp_path)
    backup = tmp_path / "backup.sqlite"
    source, target = sqlite3.connect(folder / "library.sqlite"), sqlite3.connect(backup)
    source.backup(target)
    source.close()
    target.close()
    library = _open(folder, cache)
    newer = _video(tmp_path / "more", 70)
    library.add(newer, progress=False)
    library.close()
    for stale in folder.glob("library.sqlite-*"):
        stale.unlink()
    shutil.copy(backup, folder / "library.sqlite")  # the older state, healthy but behind
    library = _open(folder, cache)
    assert [r.action for r in library.repairs][:1] == ["database rebuilt"]
    assert "behind its journal" in library.repairs[0].reason
    assert sorted(check_whole(library)) == sorted([*built.ids, str(newer)])
    library.close()


@pytest.mark.parametrize("damage", ["deleted", "torn last line", "garbage"])
def test_a_damaged_journal_is_rewritten_from_a_healthy_database(built, tmp_path, damage):
    folder, cache = _copy(built, tmp_path)
    journal = folder / "videos.jsonl"
    if damage == "deleted":
        journal.unlink()
    elif damage == "torn last line":
        journal.write_bytes(journal.read_bytes()[:-40])
    else:
        journal.write_bytes(os.urandom(5000))
    library = _open(folder, cache)
    assert library.repairs == []
    assert check_whole(library) == built.ids  # check_whole compares the journal with the database
    library.close()


def test_without_a_journal_a_damaged_database_gives_what_still_reads(built, tmp_path):
    """A library written before the journal existed (or whose journal is gone too): the video rows
    that still read come back, their embeddings from the old file or the cache; it opens whole."""
    folder, cache = _copy(built, tmp_path)
    (folder / "videos.jsonl").unlink()
    db = folder / "library.sqlite"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    library = _open(folder, cache)
    assert library.repairs[0].action == "database rebuilt"
    ids = check_whole(library)
    assert set(ids) <= set(built.ids) and ids, library.repairs
    live = max(i for v in built.ids.values() for i in v)
    for path in ids:  # a video keeps its frame ids, or (embeddings from the cache) gets ids no video has
        assert ids[path] == built.ids[path] or min(ids[path]) > live
    assert library.repairs[0].action == "database rebuilt"
    assert {r.action for r in library.repairs[1:]} <= {"caught up", "rebuilt"}  # the index follows the new ids
    library.add(built.videos, progress=False)  # re-adding the folder brings back the rest
    assert sorted(check_whole(library)) == sorted(built.ids)
    library.close()


def test_embeddings_are_salvaged_from_what_still_reads_of_the_old_file(built, tmp_path):
    """Neither the index file nor a cache: the embeddings come from the damaged file itself, where
    its pages still read; a video whose frames do not is dropped and named."""
    folder, _ = _copy(built, tmp_path)
    db = folder / "library.sqlite"
    db.write_bytes(db.read_bytes()[:-4096 - 100])  # the last page and a bit more
    _index_file(folder).write_bytes(b"garbage")
    library = _open(folder)
    repair = library.repairs[0]
    ids = check_whole(library)
    assert ids and set(ids) | set(repair.dropped) == set(built.ids) and not set(ids) & set(repair.dropped)
    assert all(ids[path] == built.ids[path] for path in ids)
    library.close()
