"""VideoLibrary: add / search / remove / reopen, moments, the cache shared with ``ask``,
crash safety (SIGKILL mid-add), two writers at once, a damaged FAISS file.

Two guides: the tiny random CLIP guide (the real encoder path; its text scores mean nothing,
so search is checked with query vectors it produced), and ``NumberGuide``, a hand-made guide
that reads the frame number drawn in each synthetic frame and returns a vector chosen by the
test, so that which frames match a query, and at what times, is known exactly. The number
guide needs no torch, which keeps the subprocess tests quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from freevllm_tools import video as video_module
from freevllm_tools.cache import GUIDE_POOLED, FeatureCache, feature_name
from freevllm_tools.errors import InputError, LibraryError
from freevllm_tools.library import AddReport, Moment, VideoLibrary, format_moments
from freevllm_tools.testing import read_frame_number, synthetic_frame, write_video

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
FPS = 10  # frame i of every test video is at i / 10 s; 20 frames: 2.0 s
DIM = 8
E0 = np.eye(DIM, dtype=np.float32)[0]
E1 = np.eye(DIM, dtype=np.float32)[1]
#: Frame number -> embedding for the frames a query should find; every other frame gets a
#: vector pointing away from E0 and E1.
THEMES = {
    103: E0, 104: E0, 106: E0,  # b.mp4, positions 3, 4 and 6
    210: 0.8 * E0 + 0.6 * E1, 211: 0.8 * E0 + 0.6 * E1,  # c.mp4, positions 10 and 11
}
#: Videos of the shared folder: name -> (first frame number, background seed).
VIDEOS = {"a.mp4": (0, 1), "b.mp4": (100, 2), "c.mp4": (200, 3), "sub/d.mkv": (300, 4)}


class NumberGuide:
    """A hand-made guide: a frame's embedding is chosen by the number drawn in it."""

    identity = "number-guide/1"
    embed_dim = DIM

    def frame_vector(self, number: int) -> np.ndarray:
        if number in THEMES:
            return np.asarray(THEMES[number], dtype=np.float32)
        rng = np.random.default_rng(number)
        vector = np.concatenate([[-1.0, -1.0], rng.normal(size=DIM - 2)])
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    def encode_frames(self, frames, **_: object) -> SimpleNamespace:
        pooled = np.stack([self.frame_vector(read_frame_number(image)) for image in frames])
        return SimpleNamespace(pooled=pooled, dense=None)

    def encode_text(self, texts):
        table = {"theme zero": E0, "theme one": E1}
        return np.stack([table[t] for t in texts])


def _write(path: Path, first: int, seed: int, count: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([synthetic_frame(first + i, seed=seed) for i in range(count)])
    return write_video(path, frames, fps=FPS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, (first, seed) in VIDEOS.items():
        _write(root / name, first, seed)
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def tiny_guide():
    pytest.importorskip("open_clip")
    from freevllm_tools.testing import tiny_clip_guide

    return tiny_clip_guide()


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Paths passed to ``read_frames``: a decode each."""
    calls: list[str] = []
    original = video_module.read_frames

    def counting(path, *args, **kwargs):
        calls.append(os.fspath(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(video_module, "read_frames", counting)
    return calls


def _library(tmp_path: Path, guide=None, **options) -> VideoLibrary:
    options.setdefault("num_frames", 20)
    return VideoLibrary(
        tmp_path / "lib", guide or NumberGuide(), cache=FeatureCache(tmp_path / "cache"), **options
    )


def _names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


def _frame_ids(library: VideoLibrary) -> dict[str, list[int]]:
    rows = library._connect().execute(
        "SELECT videos.path, frames.id FROM frames JOIN videos ON videos.id = frames.video_id ORDER BY frames.id"
    ).fetchall()
    out: dict[str, list[int]] = {}
    for path, frame_id in rows:
        out.setdefault(Path(path).name, []).append(frame_id)
    return out


# -- the number guide itself -----------------------------------------------------------------


def test_number_guide_reads_the_frames_back(folder):
    frames = video_module.read_frames(folder / "b.mp4", 20)
    assert [read_frame_number(image) for image in frames.images] == list(range(100, 120))
    np.testing.assert_allclose(frames.timestamps, np.arange(20) / FPS)


# -- add / search / remove / reopen with the tiny CLIP guide ---------------------------------


def test_add_search_remove_reopen_with_the_tiny_guide(tmp_path, folder, tiny_guide):
    library = _library(tmp_path, tiny_guide, num_frames=10, frames_per_second=False)
    report = library.add(folder, progress=False)
    assert isinstance(report, AddReport) and report.ok
    assert _names(report.added) == ["a.mp4", "b.mp4", "c.mp4", "d.mkv"]  # notes.txt ignored
    assert report.frames_added == 40
    records = {r.name: r for r in library.videos()}
    b = records["b.mp4"]
    assert b.path == os.path.realpath(folder / "b.mp4")
    assert b.num_frames == 20 and b.indexed_frames == 10
    assert b.fps == pytest.approx(FPS) and b.duration == pytest.approx(2.0)
    assert b.size == (64, 48) and b.guide_identity == tiny_guide.identity
    assert [r.id for r in library.videos()] == sorted(r.id for r in records.values())

    # A frame's own guide embedding finds that frame, in that video, at that time.
    frames = video_module.read_frames(folder / "b.mp4", 10)
    pooled = tiny_guide.encode_frames(frames.images).pooled
    top = library.search_vector(pooled[4], k=3)[0]
    assert top.path == b.path and top.video_id == b.id
    assert top.score == pytest.approx(1.0, abs=1e-4)
    assert frames.timestamps[4] in top.timestamps and int(frames.indices[4]) in top.frame_indices
    assert top.start <= frames.timestamps[4] <= top.end

    # Text search runs the guide's text tower; with random weights only the shape is checkable.
    moments = library.search("a yellow square moves to the right", k=2)
    assert 1 <= len(moments) <= 2 and all(isinstance(m, Moment) for m in moments)
    assert [m.score for m in moments] == sorted((m.score for m in moments), reverse=True)
    for m in moments:
        assert 0.0 <= m.start <= min(m.timestamps) <= max(m.timestamps) <= m.end <= 2.0 + 1e-9

    ids_before = {r.name: r.id for r in library.videos()}
    frame_ids_before = _frame_ids(library)
    removed = library.remove(b.path)
    assert [r.id for r in removed] == [b.id] and b.path not in library
    assert all(m.path != b.path for m in library.search_vector(pooled[4], k=10))
    library.close()

    reopened = VideoLibrary(tmp_path / "lib", tiny_guide, cache=FeatureCache(tmp_path / "cache"))
    assert reopened.repairs == []
    assert reopened.sampling["num_frames"] == 10  # settings are stored with the library
    ids_before.pop("b.mp4")
    frame_ids_before.pop("b.mp4")
    assert {r.name: r.id for r in reopened.videos()} == ids_before
    assert _frame_ids(reopened) == frame_ids_before
    a_frames = video_module.read_frames(folder / "a.mp4", 10)
    hit = reopened.search_vector(tiny_guide.encode_frames(a_frames.images).pooled[7], k=1)[0]
    assert hit.name == "a.mp4" and hit.frame_ids[list(hit.timestamps).index(a_frames.timestamps[7])] in (
        frame_ids_before["a.mp4"]
    )
    assert reopened.check()["consistent"]


# -- moments from hand-made features ---------------------------------------------------------


def test_moments_merge_adjacent_frames_with_known_times(tmp_path, folder):
    library = _library(tmp_path)
    assert library.add(folder, progress=False).ok
    ids = {r.name: r.id for r in library.videos()}

    moments = library.search_vector(E0, k=3, min_score=0.5)
    assert [(m.name, m.frame_indices) for m in moments] == [
        ("b.mp4", (3, 4)), ("b.mp4", (6,)), ("c.mp4", (10, 11)),
    ]
    first, second, third = moments
    assert first.video_id == ids["b.mp4"]
    assert first.timestamps == pytest.approx((0.3, 0.4))
    # A moment spans the segments its frames stand for: halfway to the neighbouring samples.
    assert (first.start, first.end) == pytest.approx((0.25, 0.45))
    assert (second.start, second.end) == pytest.approx((0.55, 0.65))
    assert (third.start, third.end) == pytest.approx((0.95, 1.15))
    assert first.score == pytest.approx(1.0) and third.score == pytest.approx(0.8)
    assert first.best_timestamp in first.timestamps

    # The text path goes through the guide's text embedding.
    assert library.search("theme zero", k=3, min_score=0.5) == moments
    # videos= restricts the search; k bounds the answer.
    only_c = library.search_vector(E0, k=5, videos=[ids["c.mp4"]], min_score=0.5)
    assert [(m.name, m.frame_indices) for m in only_c] == [("c.mp4", (10, 11))]
    assert len(library.search_vector(E0, k=1)) == 1
    assert library.search_vector(E0, k=1)[0].name == "b.mp4"
    # The last sampled frame's segment ends at the end of the video.
    last = library.search_vector(NumberGuide().frame_vector(219), k=1)[0]
    assert last.name == "c.mp4" and 19 in last.frame_indices
    assert last.end == pytest.approx(2.0)

    # Within merge_gap seconds, hits one sampled frame apart merge too.
    library.close()
    wide = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False, merge_gap=0.25)
    merged = wide.search_vector(E0, k=2, min_score=0.5)
    assert merged[0].frame_indices == (3, 4, 6) and (merged[0].start, merged[0].end) == pytest.approx((0.25, 0.65))

    table = format_moments(moments)
    assert "b.mp4" in table and "c.mp4" in table and "1.000" in table
    assert json.loads(format_moments(moments, as_json=True))[0] == moments[0].to_dict()
    assert moments[0].to_dict()["frame_indices"] == [3, 4]


def test_search_arguments_are_checked(tmp_path, folder):
    library = _library(tmp_path)
    assert library.search_vector(E0) == []  # empty library: nothing, and no guide needed
    library.add(folder / "b.mp4", progress=False)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(InputError):
            library.search_vector(E0, k=bad_k)
    with pytest.raises(InputError):
        library.search("   ")
    with pytest.raises(InputError, match="dimensions"):
        library.search_vector(np.ones(DIM + 1))
    with pytest.raises(LibraryError, match="no video"):
        library.search_vector(E0, videos=[12345])


# -- skipping, re-indexing, copies and moves -------------------------------------------------


def test_unchanged_skipped_changed_reindexed_copies_and_moves_reuse(tmp_path, folder, decodes, monkeypatch):
    from freevllm_tools import cache as cache_module

    hashes: list[str] = []
    original_hash = cache_module.hash_file
    monkeypatch.setattr(cache_module, "hash_file", lambda p, **k: hashes.append(os.fspath(p)) or original_hash(p, **k))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(folder / name, src / name)
    library = _library(tmp_path)
    assert _names(library.add(src, progress=False).added) == ["a.mp4", "b.mp4"]
    assert len(decodes) == 2
    hashed = len(hashes)

    again = library.add(src, progress=False)
    assert _names(again.skipped) == ["a.mp4", "b.mp4"] and not again.added
    assert len(decodes) == 2 and len(hashes) == hashed  # not decoded, not even read

    a_id = library.video(src / "a.mp4").id
    old_frames = _frame_ids(library)["a.mp4"]
    time.sleep(0.01)
    _write(src / "a.mp4", 400, 9)  # edited: other pictures
    changed = library.add(src, progress=False)
    assert _names(changed.updated) == ["a.mp4"] and _names(changed.skipped) == ["b.mp4"]
    assert library.video(src / "a.mp4").id == a_id  # same video id, new frames
    assert set(_frame_ids(library)["a.mp4"]).isdisjoint(old_frames)
    assert len(decodes) == 3
    assert library.search_vector(NumberGuide().frame_vector(405), k=1)[0].frame_indices == (5,)

    shutil.copy(src / "b.mp4", src / "b copy.mp4")
    copied = library.add(src, progress=False)
    assert _names(copied.added) == ["b copy.mp4"] and copied.cache_hits == 1
    assert len(decodes) == 3  # a renamed copy is not decoded

    b = library.video(src / "b.mp4")
    b_frames = _frame_ids(library)["b.mp4"]
    os.rename(src / "b.mp4", src / "b moved.mp4")
    moved = library.add(src, progress=False)
    assert moved.moved == [(b.path, os.path.realpath(src / "b moved.mp4"))]
    assert library.video(src / "b moved.mp4").id == b.id
    assert _frame_ids(library)["b moved.mp4"] == b_frames
    assert len(decodes) == 3 and library.check()["consistent"]
    assert [p.name for p in map(Path, (r.path for r in library.prune()))] == []


def test_failures_are_reported_per_file_and_the_rest_indexed(tmp_path, folder):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(folder / "a.mp4", src / "a.mp4")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    library = _library(tmp_path)
    report = library.add([src, tmp_path / "missing.mp4"], progress=False)
    assert _names(report.added) == ["a.mp4"]
    assert sorted(Path(p).name for p, _ in report.failed) == ["broken.mp4", "missing.mp4"]
    assert all(reason for _, reason in report.failed)
    assert not report.ok and "broken.mp4" in str(report)
    assert len(library) == 1 and library.check()["consistent"]


def test_another_guide_is_refused(tmp_path, folder):
    library = _library(tmp_path)
    library.add(folder / "a.mp4", progress=False)
    other = NumberGuide()
    other.identity = "number-guide/2"
    library.close()
    reopened = VideoLibrary(tmp_path / "lib", other, cache=False)
    with pytest.raises(LibraryError, match="number-guide/1"):
        reopened.add(folder / "b.mp4", progress=False)
    with pytest.raises(LibraryError, match="built with guide"):
        reopened.search("theme zero")


def test_remove_by_id_record_or_path_and_unknown_refs(tmp_path, folder):
    library = _library(tmp_path)
    library.add(folder, progress=False)
    records = {r.name: r for r in library.videos()}
    with pytest.raises(LibraryError, match="no video"):
        library.remove([records["a.mp4"].id, 999])
    assert len(library) == 4  # nothing removed
    removed = library.remove([records["a.mp4"].id, records["c.mp4"], folder / "sub" / "d.mkv"])
    assert _names(r.path for r in removed) == ["a.mp4", "c.mp4", "d.mkv"]
    assert [r.name for r in library.videos()] == ["b.mp4"]
    assert {m.name for m in library.search_vector(E0, k=5)} == {"b.mp4"}
    state = library.check()
    assert (state["frames"], state["vectors"], state["consistent"]) == (20, 20, True)


# -- sharing the feature cache with ``ask`` --------------------------------------------------


def test_library_and_ask_share_pooled_guide_features(tmp_path, folder, decodes, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    guide = NumberGuide()
    # What the pipeline stores after an ``ask`` about a.mp4 (50 frames, as the paper samples).
    key = cache.video_key(folder / "a.mp4")
    name = feature_name(GUIDE_POOLED, guide.identity, frames=50)
    pooled = np.tile(np.eye(DIM, dtype=np.float32)[2], (20, 1))
    info = {"path": str(folder / "a.mp4"), "num_frames": 20, "fps": "10/1", "duration": 2.0, "width": 64,
            "height": 48}
    cache.put(key, name, {"pooled": pooled, "indices": np.arange(20), "timestamps": np.arange(20) / FPS},
              meta={"info": info, "partial": False})
    library = VideoLibrary(tmp_path / "lib", guide, cache=cache, num_frames=50, frames_per_second=False)
    report = library.add(folder / "a.mp4", progress=False)
    assert report.added and report.cache_hits == 1 and decodes == []
    hit = library.search_vector(np.eye(DIM)[2], k=1)[0]
    assert hit.name == "a.mp4" and hit.score == pytest.approx(1.0)
    assert hit.frame_scores == pytest.approx((1.0,) * len(hit.frame_indices))  # the cached vectors
    assert library.videos()[0].fps == pytest.approx(10.0)

    # ...and what the library computes is there for ``ask``: a persistent entry with the same name.
    library.add(folder / "b.mp4", progress=False)
    assert decodes == [os.path.realpath(folder / "b.mp4")]
    entry = cache.get(cache.video_key(folder / "b.mp4"), name)
    assert entry is not None and entry.persistent
    assert entry["pooled"].shape == (20, DIM) and entry.meta["info"]["num_frames"] == 20
    np.testing.assert_allclose(entry["pooled"][3], E0)
    np.testing.assert_allclose(entry["timestamps"], np.arange(20) / FPS)


def test_dense_sampling_by_frames_per_second(tmp_path, folder):
    library = _library(tmp_path, num_frames=4, frames_per_second=5.0, max_frames=8)
    assert library.frames_for(2.0) == 8 and library.frames_for(0.5) == 4 and library.frames_for(100) == 8
    library.add(folder / "b.mp4", progress=False)
    assert library.videos()[0].indexed_frames == 8
    with pytest.raises(InputError):
        _library(tmp_path / "x", num_frames=10, max_frames=5)


# -- the frame index: approximate option, freshness, repair ----------------------------------


def test_hnsw_index_searches_removes_and_reopens(tmp_path, folder):
    library = _library(tmp_path, index="hnsw", index_options={"m": 8})
    library.add(folder, progress=False)
    moments = library.search_vector(E0, k=3, min_score=0.5)
    assert [(m.name, m.frame_indices) for m in moments] == [
        ("b.mp4", (3, 4)), ("b.mp4", (6,)), ("c.mp4", (10, 11)),
    ]
    library.remove(folder / "b.mp4")  # HNSW cannot remove: rebuilt from SQLite
    assert [m.name for m in library.search_vector(E0, k=3, min_score=0.5)] == ["c.mp4"]
    assert library.check()["consistent"]
    library.close()
    reopened = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False)
    assert reopened.index_kind == "hnsw" and reopened.repairs == []
    assert reopened.check()["consistent"]
    reopened.close()
    as_flat = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False, index="flat")
    assert [r.action for r in as_flat.repairs] == ["rebuilt"]
    assert [m.name for m in as_flat.search_vector(E0, k=3, min_score=0.5)] == ["c.mp4"]


class NumpyIndex:
    """A brute-force FrameIndex in plain NumPy: what a vector-database client would implement."""

    kind = "numpy"
    supports_remove = True

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vectors: dict[int, np.ndarray] = {}

    @property
    def ntotal(self) -> int:
        return len(self.vectors)

    def add(self, ids, vectors) -> None:
        self.vectors.update({int(i): np.asarray(v, np.float32) for i, v in zip(ids, vectors)})

    def remove(self, ids) -> None:
        for i in ids:
            self.vectors.pop(int(i), None)

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.vectors), dtype=np.int64)

    def search(self, vectors, k, *, allowed_ids=None):
        ids = self.ids() if allowed_ids is None else np.intersect1d(self.ids(), allowed_ids)
        scores = np.stack([self.vectors[int(i)] for i in ids]) @ np.asarray(vectors, np.float32)[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order][None, :], ids[order][None, :]


def test_the_frame_index_can_be_replaced(tmp_path, folder):
    external = NumpyIndex(DIM)
    library = _library(tmp_path, index=external)
    library.add(folder, progress=False)
    assert external.ntotal == 80
    expected = library.search_vector(E0, k=3, min_score=0.5)
    assert [(m.name, m.frame_indices) for m in expected][0] == ("b.mp4", (3, 4))
    library.remove(folder / "a.mp4")
    assert external.ntotal == 60
    library.close()
    # A fresh, empty external index is filled from SQLite on open; FAISS still works after.
    refilled = NumpyIndex(DIM)
    reopened = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False, index=refilled)
    assert refilled.ntotal == 60 and reopened.search_vector(E0, k=3, min_score=0.5) == expected
    reopened.close()
    with_faiss = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False)
    assert with_faiss.index_kind == "flat" and with_faiss.check()["consistent"]
    assert with_faiss.search_vector(E0, k=3, min_score=0.5) == expected


def test_a_reader_sees_another_writers_videos(tmp_path, folder):
    reader = _library(tmp_path)
    reader.add(folder / "a.mp4", progress=False)
    writer = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False)
    writer.add(folder / "b.mp4", progress=False)
    assert reader.search_vector(E0, k=1, min_score=0.5)[0].name == "b.mp4"  # no stale index
    writer.remove(folder / "b.mp4")
    assert reader.search_vector(E0, k=1, min_score=0.5) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest", "delete"])
def test_a_damaged_faiss_file_is_rebuilt_from_sqlite(tmp_path, folder, damage):
    library = _library(tmp_path)
    library.add(folder, progress=False)
    expected = library.search_vector(E0, k=3, min_score=0.5)
    library.close()
    manifest_path = tmp_path / "lib" / "index.json"
    index_file = tmp_path / "lib" / json.loads(manifest_path.read_text())["file"]
    if damage == "truncate":
        index_file.write_bytes(index_file.read_bytes()[: index_file.stat().st_size // 2])
    elif damage == "garbage":
        index_file.write_bytes(os.urandom(index_file.stat().st_size))
    elif damage == "manifest":
        manifest_path.write_text("{not json")
    else:
        index_file.unlink()
    reopened = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False)
    assert [r.action for r in reopened.repairs] == ["rebuilt"] and reopened.repairs[0].vectors == 80
    assert reopened.search_vector(E0, k=3, min_score=0.5) == expected
    assert reopened.check()["consistent"]
    reopened.close()
    # The repaired index was saved: the next open finds nothing to fix.
    assert VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False).repairs == []


# -- several processes, and a killed one -----------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import test_library as t
    import freevllm_tools.library as L
    from freevllm_tools.cache import FeatureCache

    lib, cache, hook, kill_on, ready, go, *files = sys.argv[1:]
    if hook != "-":
        original, calls = getattr(L.VideoLibrary, hook), [0]

        def patched(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            calls[0] += 1
            if calls[0] == int(kill_on):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(L.VideoLibrary, hook, patched)
    library = L.VideoLibrary(lib, t.NumberGuide(), cache=FeatureCache(cache), num_frames=20)
    if ready != "-":
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
    report = library.add(files, progress=False)
    assert report.ok, report.failed
    print(len(report.added), len(report.skipped))
    """
).format(tests=str(TESTS_DIR))


def _child(tmp_path: Path, files, *, hook="-", kill_on=0, ready="-", go="-") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [str(tmp_path / "lib"), str(tmp_path / "cache"), hook, str(kill_on), str(ready), str(go)]
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args, *map(str, files)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_processes_adding_at_once(tmp_path, folder):
    extra = tmp_path / "extra"
    more = [_write(extra / f"e{i}.mp4", 500 + 20 * i, 10 + i) for i in range(4)]
    first = [folder / "a.mp4", folder / "b.mp4", more[0], more[1]]
    second = [folder / "c.mp4", folder / "b.mp4", more[2], more[3]]  # b.mp4 in both
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    go = tmp_path / "go"
    procs = [_child(tmp_path, files, ready=r, go=go) for files, r in zip((first, second), ready)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    go.touch()  # both start adding together
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    added = sum(int(out.split()[0]) for out, _ in results)
    assert added == 7  # b.mp4 indexed once, by whichever came first

    library = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=False)
    assert _names(r.path for r in library.videos()) == ["a.mp4", "b.mp4", "c.mp4", "e0.mp4", "e1.mp4",
                                                        "e2.mp4", "e3.mp4"]
    state = library.check()
    assert state["consistent"] and state["frames"] == 7 * 20
    frame_ids = [i for ids in _frame_ids(library).values() for i in ids]
    assert len(frame_ids) == len(set(frame_ids))
    for i in range(4):  # each video's own frames are found
        hit = library.search_vector(NumberGuide().frame_vector(500 + 20 * i + 7), k=1)[0]
        assert hit.name == f"e{i}.mp4" and hit.frame_indices[0] <= 7 <= hit.frame_indices[-1]
    assert library.search_vector(E0, k=1, min_score=0.5)[0].name == "b.mp4"


@pytest.mark.parametrize(
    ("hook", "survivors", "action"),
    [
        # killed inside the third video's transaction: it rolls back
        ("_insert_frames", ["a.mp4", "b.mp4"], None),
        # killed after the third video's commit, before the index was saved: caught up on open
        ("_apply_to_index", ["a.mp4", "b.mp4", "c.mp4"], "caught up"),
    ],
)
def test_a_killed_indexer_leaves_a_working_library(tmp_path, folder, hook, survivors, action):
    files = [folder / "a.mp4", folder / "b.mp4", folder / "c.mp4", folder / "sub" / "d.mkv"]
    proc = _child(tmp_path, files, hook=hook, kill_on=3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err

    library = VideoLibrary(tmp_path / "lib", NumberGuide(), cache=FeatureCache(tmp_path / "cache"))
    assert [r.name for r in library.videos()] == survivors
    assert [r.action for r in library.repairs] == ([action] if action else [])
    assert library.check()["consistent"] and library.num_frames == 20 * len(survivors)
    assert library.search_vector(E0, k=1, min_score=0.5)[0].name == "b.mp4"
    # Indexing again finishes the job: what was committed is kept, the rest added.
    report = library.add(files, progress=False)
    assert _names(report.skipped) == sorted(survivors)
    assert len(report.added) == 4 - len(survivors)
    assert len(library) == 4 and library.check()["consistent"]


def test_add_decodes_the_next_video_while_the_current_one_is_embedded(tmp_path, folder, monkeypatch):
    import threading

    threads: list[tuple[str, str]] = []
    original = video_module.read_frames

    def recording(path, *args, **kwargs):
        threads.append((Path(path).name, threading.current_thread().name))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(video_module, "read_frames", recording)
    library = _library(tmp_path)
    report = library.add(folder, progress=False)
    names = sorted(Path(p).name for p in report.added)
    assert len(names) >= 3 and not report.failed
    decoded = [name for name, _ in threads]
    assert sorted(decoded) == names  # each video decoded exactly once
    by_name = dict(threads)
    assert by_name[names[0]] == threading.main_thread().name  # the first: nothing to overlap with
    assert all(by_name[name].startswith("freevllm-decode") for name in names[1:])  # decoded ahead
    # The prefetched frames are the ones indexed: search finds each video's own frames.
    for record in library.videos():
        assert record.indexed_frames == 20
