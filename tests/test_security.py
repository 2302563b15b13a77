"""The path policy and argument checks that stand between an LLM's tool arguments and the disk.

Pure: no models, no decoding. Files here are placeholders (the policy never reads them); what
matters is where they are, what kind of file they are and how big.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freevllm_tools.errors import AccessError, FreeVideoError, InputError
from freevllm_tools.security import (
    MAX_PATH_CHARS,
    MAX_QUESTION_CHARS,
    PathPolicy,
    check_count,
    check_duration,
    check_question,
    is_url,
)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ with videos, links and odd files; outside/ and root-private/ next to it."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    sibling = tmp_path / "root-private"  # shares a string prefix with root
    for folder in (root, root / "sub", outside, sibling):
        folder.mkdir()
    (root / "clip.mp4").write_bytes(b"0" * 100)
    (root / "CAPS.MP4").write_bytes(b"0")
    (root / "sub" / "deep.mkv").write_bytes(b"0")
    (root / "notes.txt").write_bytes(b"0")
    (root / "noext").write_bytes(b"0")
    (outside / "secret.mp4").write_bytes(b"0")
    (sibling / "private.mp4").write_bytes(b"0")
    os.symlink(outside / "secret.mp4", root / "escape.mp4")  # file link out
    os.symlink(outside, root / "outlink")  # folder link out
    os.symlink("clip.mp4", root / "alias.mp4")  # relative link, stays inside
    os.symlink(root / "sub", root / "sublink")  # absolute link, stays inside
    os.symlink("../../outside/secret.mp4", root / "sub" / "dotdot.mp4")  # relative link out
    os.symlink("loop2.mp4", root / "loop1.mp4")
    os.symlink("loop1.mp4", root / "loop2.mp4")
    os.symlink("notes.txt", root / "disguised.mp4")  # a video name for a text file
    os.symlink("/dev/null", root / "null.mp4")
    (root / "folder.mp4").mkdir()
    os.mkfifo(root / "pipe.mp4")
    return {"root": root, "outside": outside, "sibling": sibling, "tmp": tmp_path}


@pytest.fixture
def policy(tree: dict[str, Path]) -> PathPolicy:
    return PathPolicy.from_roots(tree["root"])


# -- what is accepted ------------------------------------------------------------------------


def test_accepts_relative_absolute_and_inside_links(policy: PathPolicy, tree: dict[str, Path]) -> None:
    root = tree["root"]
    clip = os.path.realpath(root / "clip.mp4")
    assert policy.resolve("clip.mp4") == clip
    assert policy.resolve(str(root / "clip.mp4")) == clip
    assert policy.resolve(root / "clip.mp4") == clip  # PathLike
    assert policy.resolve("  clip.mp4 ") == clip
    assert policy.resolve("alias.mp4") == clip  # link inside the root
    assert policy.resolve("sub/../clip.mp4") == clip  # `..` that stays inside
    assert policy.resolve("sublink/deep.mkv") == os.path.realpath(root / "sub" / "deep.mkv")
    assert policy.resolve("CAPS.MP4") == os.path.realpath(root / "CAPS.MP4")  # case-insensitive extension


def test_relative_name_is_looked_up_in_each_root(tree: dict[str, Path]) -> None:
    policy = PathPolicy.from_roots([tree["outside"], tree["root"]])
    assert policy.resolve("clip.mp4") == os.path.realpath(tree["root"] / "clip.mp4")
    assert policy.resolve("secret.mp4") == os.path.realpath(tree["outside"] / "secret.mp4")


def test_root_spelled_through_a_symlink(tree: dict[str, Path]) -> None:
    link = tree["tmp"] / "root-link"
    os.symlink(tree["root"], link)
    policy = PathPolicy.from_roots(link)
    assert policy.roots == (os.path.realpath(tree["root"]),)
    clip = os.path.realpath(tree["root"] / "clip.mp4")
    assert policy.resolve(str(link / "clip.mp4")) == clip
    assert policy.resolve(str(tree["root"] / "clip.mp4")) == clip


def test_default_root_is_the_current_directory(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree["root"])
    policy = PathPolicy.from_roots(None)
    assert policy.roots == (os.path.realpath(tree["root"]),)
    assert policy.resolve("clip.mp4") == os.path.realpath(tree["root"] / "clip.mp4")
    with pytest.raises(AccessError):
        policy.resolve("../outside/secret.mp4")


# -- what is refused, and why ------------------------------------------------------------------

REFUSED = [
    ("../outside/secret.mp4", AccessError, "outside the allowed folders"),
    ("sub/../../outside/secret.mp4", AccessError, "outside the allowed folders"),
    ("../root-private/private.mp4", AccessError, "outside the allowed folders"),
    ("escape.mp4", AccessError, "symbolic link leads outside"),
    ("outlink/secret.mp4", AccessError, "symbolic link leads outside"),
    ("sub/dotdot.mp4", AccessError, "symbolic link leads outside"),
    ("null.mp4", AccessError, "symbolic link leads outside"),
    ("loop1.mp4", AccessError, "too many symbolic links"),
    ("/etc/passwd", AccessError, "outside the allowed folders"),
    ("/dev/zero", AccessError, "outside the allowed folders"),
    ("/dev/zero.mp4", AccessError, "outside the allowed folders"),
    ("/proc/self/environ", AccessError, "outside the allowed folders"),
    ("~/secret.mp4", InputError, "no video file"),  # ~ is not expanded: a name inside the root
    ("http://example.com/v.mp4", AccessError, "URLs are not supported"),
    ("HTTPS://example.com/v.mp4", AccessError, "URLs are not supported"),
    ("file:///etc/passwd", AccessError, "URLs are not supported"),
    ("file:clip.mp4", AccessError, "URLs are not supported"),
    ("concat:clip.mp4|clip.mp4", AccessError, "URLs are not supported"),
    ("data:video/mp4;base64,AAAA", AccessError, "URLs are not supported"),
    ("rtsp://camera/stream", AccessError, "URLs are not supported"),
    ("sub/http://x/clip.mp4", AccessError, "URLs are not supported"),
    ("clip.mp4\x00.txt", AccessError, "NUL byte"),
    ("clip\n.mp4", InputError, "control characters"),
    ("clip\x85.mp4", InputError, "control characters"),
    ("clip\udcff\ud800.mp4", InputError, "not valid Unicode"),
    ("", InputError, "empty"),
    ("   ", InputError, "empty"),
    ("notes.txt", AccessError, ".txt is not a video file type"),
    ("noext", AccessError, "no extension is not a video file type"),
    ("disguised.mp4", AccessError, ".txt is not a video file type"),
    ("folder.mp4", AccessError, "a folder"),
    ("pipe.mp4", AccessError, "named pipe"),
    ("missing.mp4", InputError, "no video file"),
    ("clip.mp4/inner.mp4", InputError, "no video file"),
    ("x" * (MAX_PATH_CHARS + 1) + ".mp4", InputError, "characters long"),
]


@pytest.mark.parametrize(("path", "error", "reason"), REFUSED, ids=[repr(p[0])[:40] for p in REFUSED])
def test_refuses_with_a_reason(policy: PathPolicy, path: str, error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as info:
        policy.resolve(path)
    assert reason in str(info.value)
    assert isinstance(info.value, FreeVideoError)


@pytest.mark.parametrize("value", [None, 3, b"clip.mp4", ["clip.mp4"], {"path": "clip.mp4"}])
def test_refuses_non_strings(policy: PathPolicy, value: object) -> None:
    with pytest.raises(InputError, match="path string"):
        policy.resolve(value)


def test_absolute_path_into_the_sibling_with_a_common_prefix(policy: PathPolicy, tree: dict[str, Path]) -> None:
    # "/tmp/x/root-private/..." starts with the string "/tmp/x/root": commonpath, not a prefix test.
    with pytest.raises(AccessError, match="outside"):
        policy.resolve(str(tree["sibling"] / "private.mp4"))


def test_device_files_are_refused_even_inside_a_root(tree: dict[str, Path]) -> None:
    policy = PathPolicy.from_roots([tree["root"], "/dev"], extensions=frozenset({".mp4", ""}))
    for device in ("/dev/null", "/dev/zero"):
        with pytest.raises(AccessError, match="character device"):
            policy.resolve(device)
    with pytest.raises(AccessError, match="character device"):
        policy.resolve("null.mp4")  # the link now stays inside the roots: the stat refuses it


def test_socket_is_refused(tree: dict[str, Path]) -> None:
    short = Path(os.path.realpath(tree["root"]))
    path = short / "sock.mp4"
    if len(str(path)) > 100:
        pytest.skip("temporary folder too deep for a unix socket path")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        with pytest.raises(AccessError, match="socket"):
            PathPolicy.from_roots(short).resolve("sock.mp4")
    finally:
        server.close()


def test_size_limit(tree: dict[str, Path]) -> None:
    assert PathPolicy.from_roots(tree["root"], max_file_bytes=100).resolve("clip.mp4")
    with pytest.raises(AccessError, match="100 bytes, over the limit of 99 bytes"):
        PathPolicy.from_roots(tree["root"], max_file_bytes=99).resolve("clip.mp4")


def test_library_path_check_file(policy: PathPolicy, tree: dict[str, Path]) -> None:
    # A trusted path (a library record) skips containment but not the file checks.
    secret = os.path.realpath(tree["outside"] / "secret.mp4")
    assert policy.check_file(secret) == secret
    with pytest.raises(AccessError, match="named pipe"):
        policy.check_file(os.path.realpath(tree["root"] / "pipe.mp4"))


# -- policies that could silently allow everything ----------------------------------------------


def test_no_roots_refuses_everything(tree: dict[str, Path]) -> None:
    policy = PathPolicy(())
    with pytest.raises(AccessError, match="no folders are allowed"):
        policy.resolve(str(tree["root"] / "clip.mp4"))


@pytest.mark.parametrize("roots", [[None], [""], [b"/tmp"], "not-a-sequence-of-roots", None])
def test_bad_roots_are_refused_when_the_policy_is_made(roots: object) -> None:
    with pytest.raises(InputError):
        PathPolicy(roots)  # type: ignore[arg-type]


def test_missing_root_is_refused(tree: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="not an existing folder"):
        PathPolicy.from_roots(tree["tmp"] / "nope")


def test_root_of_slash_still_checks_files(tmp_path: Path) -> None:
    policy = PathPolicy.from_roots("/")
    (tmp_path / "a.mp4").write_bytes(b"0")
    assert policy.resolve(str(tmp_path / "a.mp4")) == os.path.realpath(tmp_path / "a.mp4")
    with pytest.raises(AccessError, match="not a video file type"):
        policy.resolve("/etc/passwd")


# -- nothing outside the roots is touched -----------------------------------------------------------


class _Recorder:
    """Paths given to open/stat/lstat/readlink/listdir while active (audit hook + wrappers)."""

    active = False
    paths: list[str] = []
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if not (cls.active and event in {"open", "os.listdir", "os.scandir"} and args):
            return
        if isinstance(args[0], (str, os.PathLike)):
            cls.paths.append(os.fspath(args[0]))


def _ancestors(path: str) -> set[str]:
    out = set()
    while True:
        out.add(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    if not _Recorder.installed:
        sys.addaudithook(_Recorder.hook)
        _Recorder.installed = True
    _Recorder.paths = []
    for name in ("stat", "lstat", "readlink"):
        original = getattr(os, name)

        def wrapper(path, *args, _original=original, **kwargs):
            if _Recorder.active:
                _Recorder.paths.append(os.fspath(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, wrapper)
    yield _Recorder
    _Recorder.active = False


def test_nothing_outside_the_roots_is_opened_or_stated(
    policy: PathPolicy, tree: dict[str, Path], recorder: type[_Recorder]
) -> None:
    hostile = [p for p, _, _ in REFUSED] + [str(tree["outside"] / "secret.mp4"), "outlink", "escape.mp4"]
    root = os.path.realpath(tree["root"])
    allowed_above = _ancestors(root)
    recorder.active = True
    for path in hostile:
        with pytest.raises(FreeVideoError):
            policy.resolve(path)
    recorder.active = False
    assert recorder.paths, "the recorder saw nothing: it is not wired up"
    strays = [
        p for p in recorder.paths
        if os.path.normpath(p) not in allowed_above and os.path.commonpath([root, os.path.normpath(p)]) != root
    ]
    assert strays == []


_PIECES = ["..", ".", "", "clip.mp4", "escape.mp4", "outlink", "sub", "sublink", "null.mp4", "pipe.mp4",
           "loop1.mp4", "~", "http:", "file:", "\x00", "\ud800", "é", "\u202e", "a" * 300, "secret.mp4"]


@given(
    parts=st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=12)), max_size=8),
    absolute=st.sampled_from(["", "/", "ROOT/", "OUTSIDE/"]),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_path_resolves_inside_or_is_refused(
    policy: PathPolicy, tree: dict[str, Path], parts: list[str], absolute: str
) -> None:
    root = os.path.realpath(tree["root"])
    prefix = absolute.replace("ROOT", root).replace("OUTSIDE", os.path.realpath(tree["outside"]))
    path = prefix + "/".join(parts)
    try:
        real = policy.resolve(path)
    except FreeVideoError:
        return
    assert os.path.commonpath([root, real]) == root
    assert os.path.isfile(real) and os.path.splitext(real)[1].lower() in policy.extensions


# -- questions, counts, durations, URLs -------------------------------------------------------------


def test_check_question() -> None:
    assert check_question("  What happens?  ") == "What happens?"
    assert check_question("x" * MAX_QUESTION_CHARS) == "x" * MAX_QUESTION_CHARS
    bad_questions = [
        ("", "empty"),
        ("   \n", "empty"),
        ("x" * 10_000, "10,000 characters"),
        (None, "string"),
        (5, "string"),
        ("what is \ud800 this?", "not valid Unicode"),
    ]
    for bad, reason in bad_questions:
        with pytest.raises(InputError, match=reason):
            check_question(bad)
    with pytest.raises(InputError, match="query is empty"):
        check_question("", what="query")



def test_check_count() -> None:
    assert check_count(5) == 5
    assert check_count(5.0) == 5
    assert check_count(50) == 50
    for bad in (0, -1, 51, 10**12, True, "5", 2.5, None, float("nan")):
        with pytest.raises(InputError, match="k must be"):
            check_count(bad)


def test_check_duration() -> None:
    check_duration(10.0, 60.0)
    check_duration(1e9, None)
    for bad in (61.0, float("inf"), float("nan")):
        with pytest.raises(AccessError, match="over the limit of 60 s"):
            check_duration(bad, 60.0)


@pytest.mark.parametrize(
    ("text", "url"),
    [("http://x", True), ("s3://bucket/v.mp4", True), ("file:a.mp4", True), ("pipe:0", True),
     ("C:\\videos\\a.mp4", False), ("clips/a.mp4", False), ("a:b.mp4", False), ("/abs/a.mp4", False)],
)
def test_is_url(text: str, url: bool) -> None:
    assert is_url(text) is url
