"""Property-based tests over the tools' argument schemas: whatever an LLM writes into a tool call,
the tool answers or refuses with a readable error, and nothing outside the allowed folders is
ever opened.

Paths are generated from pieces that attack path handling (traversal, symlinks out of the root,
device files, FIFOs, folders named like videos, URLs and FFmpeg protocols, odd Unicode: bidi
overrides, full-width dots and slashes, lone surrogates, NUL) and joined in every order; questions
and queries are arbitrary Unicode of any length; ``k`` is anything JSON can carry.

What "opened" means is watched three ways: an audit hook (``sys.addaudithook``) records Python's
``open``, ``os.listdir``/``os.scandir``, ``sqlite3.connect`` and ``subprocess.Popen`` events (a hook
cannot be removed, so one is installed per session and consults a module-level switch); FFmpeg
opens files in C, so ``av.open`` is wrapped; and the pipeline the tools call is a spy that checks
the path it is given. For the pure path policy, ``stat``/``lstat``/``readlink`` are watched too:
nothing outside the roots (but the roots' own parents) is even looked at.
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import ToolMessage

from freevllm_tools.errors import FreeVideoError
from freevllm_tools.integrations.langchain import FreeVideoQATool, FreeVideoSearchTool
from freevllm_tools.integrations.llama_index import FreeVideoToolSpec
from freevllm_tools.library import VideoLibrary
from freevllm_tools.security import PathPolicy
from freevllm_tools.testing import write_video

SETTINGS = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}

# -- watching what is opened ------------------------------------------------------------------------


class Watch:
    """What was opened while ``Watch.on``: (event, path) pairs. One audit hook per session."""

    on = False
    seen: list[tuple[str, str]] = []
    stats: list[str] = []
    hook_installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not cls.on:
            return
        if event in ("open", "os.listdir", "os.scandir", "sqlite3.connect") and args:
            if isinstance(args[0], (str, bytes, os.PathLike)):
                cls.seen.append((event, os.fsdecode(args[0])))
        elif event == "subprocess.Popen" and len(args) > 1:
            for arg in args[1] or ():
                if isinstance(arg, (str, bytes, os.PathLike)) and os.fsdecode(arg).startswith("/"):
                    cls.seen.append((event, os.fsdecode(arg)))

    @classmethod
    @contextmanager
    def recording(cls) -> Iterator[type[Watch]]:
        cls.seen, cls.stats, cls.on = [], [], True
        try:
            yield cls
        finally:
            cls.on = False


if not Watch.hook_installed:
    sys.addaudithook(Watch.hook)
    Watch.hook_installed = True


def _python_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, paths["stdlib"], paths["purelib"], paths["platlib"],
            str(Path(__file__).resolve().parents[1] / "freevllm_tools")}
    return [os.path.realpath(d) for d in dirs]


def _within(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:
        return False


def strays(seen: list[tuple[str, str]], allowed: list[str]) -> list[tuple[str, str]]:
    """The recorded paths outside the ``allowed`` folders (and Python's own files)."""
    folders = [os.path.realpath(a) for a in allowed] + _python_dirs()
    temp = os.path.realpath(tempfile.gettempdir())  # the decord child's error file is made there
    out = []
    for event, path in seen:
        real = os.path.realpath(path)
        if real == temp or path == "/dev/null":
            continue
        if not any(_within(real, f) for f in folders):
            out.append((event, path))
    return out


@pytest.fixture(scope="module")
def watched_calls() -> Iterator[None]:
    """Wrap FFmpeg's open and the stat calls for the module (recorded only while Watch.on)."""
    with pytest.MonkeyPatch.context() as patch:
        real_open = av.open

        def av_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if Watch.on and isinstance(file, (str, bytes, os.PathLike)):
                Watch.seen.append(("av.open", os.fsdecode(file)))
            return real_open(file, *args, **kwargs)

        patch.setattr(av, "open", av_open)
        for name in ("stat", "lstat", "readlink"):
            original = getattr(os, name)

            def wrapper(path: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if Watch.on and isinstance(path, (str, bytes, os.PathLike)):
                    Watch.stats.append(os.fsdecode(path))
                return _original(path, *args, **kwargs)

            patch.setattr(os, name, wrapper)
        yield


# -- the tree the tools may read, and what lies around it --------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = Path(os.path.realpath(tmp_path_factory.mktemp("fuzz")))
    root, outside, sibling = base / "root", base / "outside", base / "root-private"
    for folder in (root, root / "sub", outside, sibling):
        folder.mkdir()
    good = [
        write_video(root / "clip.mp4", num_frames=8, seed=1),
        write_video(root / "CAPS.MP4", num_frames=8, seed=2),
        write_video(root / "sub" / "deep.mkv", num_frames=8, seed=3),
        write_video(root / "ünï cödé.mp4", num_frames=8, seed=4),
    ]
    write_video(outside / "secret.mp4", num_frames=4, seed=9)
    write_video(sibling / "private.mp4", num_frames=4, seed=8)
    (outside / "secret.txt").write_text("secret")
    (root / "zero.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("not a video\n" * 20)
    (root / "notes.txt").write_text("not a video")
    links = {
        "escape.mp4": outside / "secret.mp4", "outlink": outside, "alias.mp4": "clip.mp4", "sublink": root / "sub",
        "sub/dotdot.mp4": "../../outside/secret.mp4", "loop1.mp4": "loop2.mp4", "loop2.mp4": "loop1.mp4",
        "null.mp4": "/dev/null", "devzero.mp4": "/dev/zero", "random.mp4": "/dev/urandom", "etc": "/etc",
        "environ.mp4": "/proc/self/environ", "disguised.mp4": "notes.txt", "sibling.mp4": sibling / "private.mp4",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    (root / "folder.mp4").mkdir()
    os.mkfifo(root / "pipe.mp4")
    sock = None
    if len(str(root / "sock.mp4")) < 100:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(root / "sock.mp4"))
    names = sorted({p.name for p in root.iterdir()} | {"sub", "deep.mkv", "dotdot.mp4", "secret.mp4", "private.mp4"})
    yield SimpleNamespace(base=base, root=root, outside=outside, sibling=sibling, good=good, names=names)
    if sock is not None:
        sock.close()


ODD = [
    "..", ".", "", "~", "~root", "$HOME", "%2e%2e%2f", "..%2f", "..\\", "\\..\\", "C:\\Windows", "\\\\?\\C:",
    "\u202e4pm.txt", "\u200b", "\uff0e\uff0e", "\uff0f", "\u2024\u2024", "e\u0301", "\u01c5", "\U0001f3a5",
    "\x00", "\ud800", "\udcff", "\n", "\t", " ", "*", "?", "[a]", "'; DROP TABLE videos; --", "a" * 300,
    "x" * 5000,
]
SCHEMES = ["http://example.com/", "https://x/", "file://", "file:", "data:video/mp4;base64,AAAA", "concat:",
           "pipe:", "subfile:,,start,0,end,0,,:", "tcp://127.0.0.1:1/", "ftp://x/", "rtsp://x/", "crypto:"]


def _paths(tree: SimpleNamespace) -> st.SearchStrategy[str]:
    piece = st.one_of(st.sampled_from(tree.names), st.sampled_from(ODD), st.text(max_size=10))
    prefix = st.sampled_from([
        "", "/", "./", "../", "../../", f"{tree.root}/", f"{tree.outside}/", f"{tree.sibling}/", f"{tree.base}/",
        "/etc/", "/dev/", "/proc/self/", "/proc/self/fd/", "/sys/", "//", *SCHEMES,
    ])
    sep = st.sampled_from(["/", "//", "/./", "\\"])
    return st.builds(lambda p, parts, s: p + s.join(parts), prefix, st.lists(piece, max_size=6), sep)


def _near_misses(tree: SimpleNamespace) -> st.SearchStrategy[str]:
    """Spellings of the root's videos, most of them valid, some one step off."""
    prefix = st.sampled_from(["", "./", f"{tree.root}/", "sub/../", "sublink/../", "./sub/./../", f"{tree.root}//",
                              "../root/", "outlink/../", "sub/../../root/", " "])
    name = st.sampled_from(["clip.mp4", "CAPS.MP4", "sub/deep.mkv", "ünï cödé.mp4", "alias.mp4", "sublink/deep.mkv",
                            "clip.MP4", "clip.mp4/", "clip.mp4/.", "sub//deep.mkv", "unï cödé.mp4"])
    return st.builds(lambda p, n, end: p + n + end, prefix, name, st.sampled_from(["", " ", "\n", "\x00"]))


def _videos(tree: SimpleNamespace) -> st.SearchStrategy[Any]:
    """Anything an LLM might put in ``video``: path strings (hostile or nearly right), ids, wrong types."""
    return st.one_of(
        _paths(tree), _paths(tree), _near_misses(tree), _near_misses(tree),
        st.integers(min_value=-(10**20), max_value=10**20).map(lambda n: n if n % 3 else str(n)),
        st.sampled_from(["1", "2", "3", " 1 ", "01", "1.0", "١", "0x1", "-1", "999999999999999999999"]),
        st.none(), st.booleans(), st.floats(allow_nan=True), st.lists(st.text(max_size=5), max_size=2),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    )


QUESTIONS = st.one_of(
    st.text(max_size=60), st.text(min_size=1990, max_size=2100),
    st.sampled_from(["What happens?", "", "   ", "\x00", "\ud800?", "\u202eWhat?", "x" * 10_000, "é" * 2000]),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=30),  # surrogates too
    st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2),
)


# -- a pipeline that only records, and a library searched by text hashes ------------------------------


class SpyQA:
    """Stands in for FreeVideoLLM: records the path and question; the path must be a video inside the root."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.calls: list[tuple[str, str]] = []

    def ask(self, video: Any, question: str, **_: Any) -> Any:
        path = os.fspath(video)
        self.calls.append((path, question))
        return SimpleNamespace(
            answer="a square", video=path, num_visual_tokens=8, grounding=lambda: "slow frames at 0.10s",
            to_dict=lambda: {"video": path, "question": question},
        )

    async def aask(self, video: Any, question: str, **kwargs: Any) -> Any:
        return self.ask(video, question, **kwargs)


class HashGuide:
    """A guide without a model: frames embed by their mean colour, texts by a hash (any text works)."""

    identity, embed_dim = "hash-guide/1", 8

    def encode_frames(self, frames: np.ndarray, **_: Any) -> SimpleNamespace:
        means = np.asarray(frames, dtype=np.float32).reshape(len(frames), -1, 3).mean(axis=1)
        return SimpleNamespace(pooled=np.concatenate([means, np.ones((len(frames), 5), np.float32)], axis=1))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        seeds = [int.from_bytes(t.encode("utf-8", "surrogatepass")[:8].ljust(8, b"\0"), "little") for t in texts]
        return np.stack([np.random.default_rng(s).normal(size=8) + 0.1 for s in seeds]).astype(np.float32)


@pytest.fixture(scope="module")
def library(tree: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VideoLibrary]:
    folder = tmp_path_factory.mktemp("fuzz-library")
    lib = VideoLibrary(folder / "lib", HashGuide(), cache=False, num_frames=4, frames_per_second=False)
    assert lib.add([str(p) for p in tree.good], progress=False).ok
    yield lib
    lib.close()


def _call(tool: Any, args: dict[str, Any]) -> ToolMessage:
    message = tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})
    assert isinstance(message, ToolMessage)
    return message


def _check_accepted(path: str, tree: SimpleNamespace) -> None:
    real = os.path.realpath(path)
    assert real == path, "the pipeline must get the resolved real path"
    assert _within(real, str(tree.root)), f"a path outside the root reached the pipeline: {path!r}"
    assert os.path.isfile(real) and Path(real).suffix.lower() in {".mp4", ".mkv"}


# -- the watch itself: it must see what it is meant to catch ------------------------------------------


def test_the_watch_sees_opens_outside(tree: SimpleNamespace, watched_calls: None) -> None:
    import subprocess

    with Watch.recording() as watch:
        (tree.outside / "secret.txt").read_text()
        os.listdir(tree.outside)
        av.open(str(tree.outside / "secret.mp4")).close()
        subprocess.run([sys.executable, "-c", "pass", str(tree.outside / "secret.mp4")], check=True)
        os.stat(tree.outside / "secret.txt")
    found = {event for event, _ in strays(watch.seen, [tree.root])}
    assert found == {"open", "os.listdir", "av.open", "subprocess.Popen"}, watch.seen
    assert str(tree.outside / "secret.txt") in watch.stats


# -- the pure path policy: thousands of paths ----------------------------------------------------------


def test_path_policy_on_generated_paths(tree: SimpleNamespace, watched_calls: None) -> None:
    policy = PathPolicy.from_roots(tree.root)
    root = str(tree.root)
    above = {root}
    while (parent := os.path.dirname(next(iter(sorted(above, key=len))))) not in above:
        above.add(parent)
    resolved: list[str] = []

    @given(path=_paths(tree))
    @settings(max_examples=3000, **SETTINGS)
    def check(path: str) -> None:
        with Watch.recording() as watch:
            try:
                real = policy.resolve(path)
            except FreeVideoError as error:
                assert str(error)
                real = None
        looked_at = [p for p in map(os.path.normpath, watch.stats) if p not in above and not _within(p, root)]
        assert looked_at == [] and watch.seen == [], (path, looked_at, watch.seen)
        if real is not None:
            _check_accepted(real, tree)
            resolved.append(real)

    check()
    assert resolved, "no generated path resolved: the generator does not reach the videos"


# -- the LangChain tools ------------------------------------------------------------------------------


def test_qa_tool_on_generated_arguments(tree: SimpleNamespace, library: VideoLibrary, watched_calls: None) -> None:
    qa = SpyQA(tree.root)
    tool = FreeVideoQATool(qa=qa, library=library, allowed_roots=[tree.root])
    outcomes = {"error": 0, "success": 0}

    extras = st.dictionaries(st.sampled_from(["k", "path", "cmd"]), st.text(max_size=3), max_size=1)

    @given(video=_videos(tree), question=QUESTIONS, extra=extras)
    @settings(max_examples=1000, **SETTINGS)
    def check(video: Any, question: Any, extra: dict) -> None:
        qa.calls.clear()
        with Watch.recording() as watch:
            message = _call(tool, {"video": video, "question": question, **extra})
        assert isinstance(message.content, str) and message.content
        outcomes[message.status] += 1
        if message.status == "error":
            assert qa.calls == [], (video, message.content)
        else:
            [(path, asked)] = qa.calls
            _check_accepted(path, tree)
            if isinstance(question, (int, float)) and not isinstance(question, bool):
                question = str(question)  # the schema coerces numbers to text
            assert asked == question.strip() and message.content.startswith("Answer: a square")
        assert strays(watch.seen, [tree.root]) == [], (video, watch.seen)

    check()
    assert outcomes["error"] > 300 and outcomes["success"] > 30, outcomes


def test_search_tool_on_generated_arguments(library: VideoLibrary, watched_calls: None) -> None:
    tool = FreeVideoSearchTool(library=library)
    paths = {r.path for r in library.videos()}
    ks = st.one_of(st.integers(min_value=-5, max_value=60), st.integers(), st.floats(), st.text(max_size=4),
                   st.none(), st.booleans(), st.just("3"), st.just(2.0))

    @given(query=QUESTIONS, k=ks)
    @settings(max_examples=300, **SETTINGS)
    def check(query: Any, k: Any) -> None:
        with Watch.recording() as watch:
            message = _call(tool, {"query": query, "k": k})
        assert isinstance(message.content, str) and message.content
        if message.status != "error":
            moments = message.artifact
            assert 1 <= len(moments) <= 50 and message.content.count("\n") == len(moments)
            assert {m["source"] for m in moments} <= paths
            if isinstance(k, int) and not isinstance(k, bool):
                assert len(moments) <= k
        else:
            assert message.artifact is None
        assert strays(watch.seen, [library.path]) == [], watch.seen

    check()


# -- the LlamaIndex tool spec ---------------------------------------------------------------------------


def test_llama_index_spec_on_generated_arguments(
    tree: SimpleNamespace, library: VideoLibrary, watched_calls: None
) -> None:
    qa = SpyQA(tree.root)
    spec = FreeVideoToolSpec(qa=qa, library=library, allowed_roots=[tree.root])

    @given(video=_videos(tree), question=QUESTIONS, query=QUESTIONS, k=st.integers(min_value=-3, max_value=60))
    @settings(max_examples=400, **SETTINGS)
    def check(video: Any, question: Any, query: Any, k: int) -> None:
        qa.calls.clear()
        with Watch.recording() as watch:
            try:
                text = spec.answer_video_question(video, question)
            except FreeVideoError as error:
                assert str(error) and qa.calls == []
            else:
                [(path, _)] = qa.calls
                _check_accepted(path, tree)
                assert text.startswith("Answer: ")
            try:
                found = spec.search_video_library(query, k)
            except FreeVideoError as error:
                assert str(error)
            else:
                assert found.count("\n") <= k
        assert strays(watch.seen, [tree.root, library.path]) == [], watch.seen

    check()


# -- the real (tiny) pipeline behind the tool ----------------------------------------------------------


def test_qa_tool_with_the_tiny_pipeline(tree: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory,
                                        watched_calls: None) -> None:
    from freevllm_tools.config import PerceptionConfig
    from freevllm_tools.testing import tiny_free_video_llm

    cache = tmp_path_factory.mktemp("fuzz-cache")
    qa = tiny_free_video_llm(cache, config=PerceptionConfig.uniform(4), max_new_tokens=2)
    tool = FreeVideoQATool(qa=qa, allowed_roots=[tree.root])
    spellings = ["clip.mp4", "./clip.mp4", "sub/../clip.mp4", f"{tree.root}/clip.mp4", "alias.mp4", "CAPS.MP4",
                 "sublink/deep.mkv", "ünï cödé.mp4", "escape.mp4", "../outside/secret.mp4", "null.mp4", "pipe.mp4",
                 "notes.mp4", "zero.mp4", "sub/dotdot.mp4", "sibling.mp4", "http://x/clip.mp4"]
    answered = []

    @given(video=st.sampled_from(spellings), question=st.text(min_size=1, max_size=80))
    @settings(max_examples=15, **SETTINGS)
    def check(video: str, question: str) -> None:
        with Watch.recording() as watch:
            message = _call(tool, {"video": video, "question": question})
        if video in spellings[:8] and question.strip():
            assert message.status == "success", message.content
            assert message.content.startswith("Answer: ") and message.artifact["video"] in {str(p) for p in tree.good}
            answered.append(video)
        else:
            assert message.status == "error" and message.content, message.content
        assert strays(watch.seen, [tree.root, cache]) == [], (video, watch.seen)

    check()
    assert answered
