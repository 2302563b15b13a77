"""What an untrusted caller (an LLM writing tool arguments, a web form) may make this package open.

Pure Python, no third-party imports: the LangChain and LlamaIndex tools, the CLI and the hostile-input
tests all use the same rules.

:class:`PathPolicy` turns a path string into the real path of a video file inside the allowed
folders ("roots"), or refuses with :class:`~freevllm_tools.errors.AccessError` /
:class:`~freevllm_tools.errors.InputError` saying why. The checks run in this order, and nothing
outside the roots is ever opened, listed or stat'ed:

1. **Text only.** The path must be a non-empty ``str`` of bounded length without control characters
   (a NUL byte is refused). URLs and other ``scheme:`` forms (``http://``, ``file:``, ``data:``,
   ``concat:``) are refused: this package reads local files only. ``~`` is not expanded.
2. **Lexical containment.** A relative path is joined to each root; ``..`` is resolved in the text
   (``os.path.normpath``). A path whose text is not inside a root is refused without touching the
   file system, so ``../../etc/passwd`` or ``/etc/passwd`` is never even stat'ed.
3. **Symlinks.** The components below the root are resolved one at a time with ``lstat`` /
   ``readlink``; a link whose target leaves the roots is refused before the target is looked at.
   The result is checked once more with ``os.path.realpath`` and ``os.path.commonpath`` (never a
   string prefix: ``/data/videos-private`` is not inside ``/data/videos``).
4. **The file.** Only now is the resolved file stat'ed: it must be a regular file (not a device,
   FIFO, socket or folder), have a video extension from an allowlist, and be at most
   ``max_file_bytes`` long.

The caller then opens the returned real path, never the string it was given. (A process that can
write inside a root can still swap a file for a link between this check and the decoder's open;
roots should be folders that untrusted parties cannot write to.)

Deny by default: a policy with no roots refuses every path; ``None`` is not a root.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import AccessError, InputError

__all__ = [
    "PathPolicy",
    "VIDEO_EXTENSIONS",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_PATH_CHARS",
    "MAX_QUESTION_CHARS",
    "MAX_RESULTS",
    "check_question",
    "check_count",
    "check_duration",
    "is_url",
]

#: File name endings accepted as videos (lower case; compared case-insensitively).
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m2v", ".wmv", ".flv",
        ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".ogv", ".gif",
    }
)
#: Largest video file a policy accepts unless told otherwise: 4 GiB.
DEFAULT_MAX_FILE_BYTES = 4 * 1024**3
#: Longest path string accepted (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096
#: Longest question accepted; the same limit as :data:`freevllm_tools.pipeline.MAX_QUESTION_CHARS`.
MAX_QUESTION_CHARS = 2000
#: Largest number of results a caller may ask a search for.
MAX_RESULTS = 50
#: Symlinks followed while resolving one path before giving up (the kernel's own limit).
_MAX_SYMLINKS = 40

_HINT = "give a path relative to an allowed folder, or a library video id"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_url(text: str) -> bool:
    """True for ``scheme://...`` anywhere and for a leading ``scheme:`` of two or more letters.

    The second form covers FFmpeg's protocols (``file:``, ``data:``, ``concat:``, ``pipe:``,
    ``subfile:``) as well as ``http:`` without slashes; a one-letter drive (``C:``) is not a URL.
    """
    return "://" in text or _SCHEME.match(text) is not None


class _NotFound(InputError):
    """No file at a path inside the roots (an InputError; private so resolve can try the next root)."""


def _quote(text: str, limit: int = 200) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters: error messages stay short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def _check_encodable(text: str, what: str) -> None:
    """Refuse lone surrogates and other text that is not valid Unicode (the OS would choke on it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        msg = f"{what} is not valid Unicode text (character {error.start}: {text[error.start]!r})"
        raise InputError(msg) from None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _within(path: str, root: str) -> bool:
    """``path`` equals ``root`` or lies below it; both absolute and normalised."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives, or a mix of absolute and relative
        return False


@dataclass(frozen=True)
class PathPolicy:
    """The folders an untrusted caller may read videos from, and the limits on those files.

    ``roots`` are resolved with ``os.path.realpath`` when the policy is made and must be existing
    folders. Build one with :meth:`from_roots`; check a path with :meth:`resolve`.
    """

    roots: tuple[str, ...]
    """Real paths of the allowed folders. Empty: every path is refused."""
    extensions: frozenset[str] = VIDEO_EXTENSIONS
    """Accepted file name endings, lower case, with the dot."""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    """Largest file accepted, in bytes."""
    _spellings: tuple[tuple[str, str], ...] = field(default=(), init=False, repr=False, compare=False)
    """(as written, real) per root, so a path spelled through a root's own symlink still matches."""

    def __post_init__(self) -> None:
        if isinstance(self.roots, (str, bytes, os.PathLike)) or self.roots is None:
            msg = f"roots must be a sequence of folders, got {self.roots!r}; use PathPolicy.from_roots(...)"
            raise InputError(msg)
        spellings: list[tuple[str, str]] = []
        real_roots: list[str] = []
        for root in self.roots:
            if root is None or not isinstance(root, (str, os.PathLike)):
                msg = f"an allowed root must be a folder path, got {root!r}; None never means 'anywhere'"
                raise InputError(msg)
            text = os.fspath(root)
            if not text or "\x00" in text:
                msg = f"an allowed root must be a non-empty folder path, got {text!r}"
                raise InputError(msg)
            written = os.path.abspath(text)
            real = os.path.realpath(written)
            if not os.path.isdir(real):
                msg = f"allowed root {text!r} is not an existing folder (resolved to {real!r})"
                raise InputError(msg)
            if real not in real_roots:
                real_roots.append(real)
            for spelling in {written, real}:
                spellings.append((spelling, real))
        if self.max_file_bytes < 1:
            raise InputError(f"max_file_bytes must be positive, got {self.max_file_bytes}")
        extensions = frozenset(e.lower() if e.startswith(".") or not e else "." + e.lower() for e in self.extensions)
        object.__setattr__(self, "roots", tuple(real_roots))
        object.__setattr__(self, "extensions", extensions)
        object.__setattr__(self, "_spellings", tuple(spellings))

    @classmethod
    def from_roots(
        cls,
        roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        **limits: object,
    ) -> PathPolicy:
        """A policy for ``roots``: one folder, several, or ``None`` for the current directory."""
        if roots is None:
            roots = [os.getcwd()]
        elif isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        return cls(tuple(roots), **limits)  # type: ignore[arg-type]

    # -- checks -----------------------------------------------------------------------------

    def contains(self, real_path: str) -> bool:
        """Whether an absolute real path lies inside one of the roots (no file system access)."""
        return any(_within(real_path, root) for root in self.roots)

    def resolve(self, path: object) -> str:
        """The real path of the video file ``path`` names inside the roots; refuses otherwise.

        Raises:
            InputError: not a usable string (empty, too long, control characters), or no such file.
            AccessError: a URL, a NUL byte, outside the roots (also through a symlink), not a
                regular file, not a video extension, or over the size limit.
        """
        text = self._check_text(path)
        if not self.roots:
            msg = f"refused {_quote(text)}: no folders are allowed (the policy has no roots)"
            raise AccessError(msg)
        missing: list[_NotFound] = []
        for candidate in self._lexical(text):  # never empty
            self._check_extension(text, candidate)
            real = self._follow_links(candidate, text)
            try:
                return self.check_file(real, shown=text)
            except _NotFound as error:  # a relative name may be in a later root
                missing.append(error)
        raise missing[0]

    def check_file(self, real_path: str, *, shown: str | None = None) -> str:
        """Stat an already-resolved path: a regular video file within the size limit.

        Used by :meth:`resolve` after the containment checks, and on paths a trusted source gave
        (a library's own record of a video). Returns ``real_path``.
        """
        shown = real_path if shown is None else shown
        self._check_extension(shown, real_path)
        try:
            info = os.stat(real_path, follow_symlinks=False)  # a link swapped in since: refused
        except (FileNotFoundError, NotADirectoryError):
            msg = (
                f"no video file at {_quote(shown)} inside the allowed folders; "
                "check the name or use a library video id"
            )
            raise _NotFound(msg) from None
        except OSError as error:
            msg = f"cannot read {_quote(shown)}: {error.strerror or error}"
            raise AccessError(msg) from None
        if not stat.S_ISREG(info.st_mode):
            msg = f"refused {_quote(shown)}: it is {_file_kind(info.st_mode)}, not a video file"
            raise AccessError(msg)
        if info.st_size > self.max_file_bytes:
            msg = (
                f"refused {_quote(shown)}: the file is {info.st_size:,} bytes, over the limit of "
                f"{self.max_file_bytes:,} bytes; use a shorter clip"
            )
            raise AccessError(msg)
        return real_path

    # -- the steps ----------------------------------------------------------------------------

    @staticmethod
    def _check_text(path: object) -> str:
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            msg = f"a video must be given as a path string or a library video id, got {type(path).__name__}"
            raise InputError(msg)
        if "\x00" in path:
            raise AccessError("refused a path containing a NUL byte")
        text = path.strip()
        if not text:
            raise InputError("the video path is empty; give a library video id or a file name such as 'clip.mp4'")
        if len(text) > MAX_PATH_CHARS:
            msg = f"the video path is {len(text)} characters long; the limit is {MAX_PATH_CHARS}"
            raise InputError(msg)
        if is_url(text):
            msg = f"refused {_quote(text)}: URLs are not supported; give a local video file inside the allowed folders"
            raise AccessError(msg)
        if _CONTROL.search(text):
            msg = f"refused {_quote(text)}: the path contains control characters"
            raise InputError(msg)
        _check_encodable(text, "the video path")
        return text

    def _lexical(self, text: str) -> list[str]:
        """Normalised absolute paths inside a root, from the text alone (one per root for a
        relative path); refuses when there is none."""
        if os.path.isabs(text):
            candidates = [os.path.normpath(text)]
        else:
            candidates = [os.path.normpath(os.path.join(root, text)) for root in self.roots]
        inside = [
            candidate
            for candidate in dict.fromkeys(candidates)
            if any(_within(candidate, written) and candidate != written for written, _ in self._spellings)
        ]
        if not inside:
            msg = f"refused {_quote(text)}: it is outside the allowed folders; {_HINT}"
            raise AccessError(msg)
        return inside

    def _check_extension(self, shown: str, path: str) -> None:
        _stem, extension = os.path.splitext(path)
        if extension.lower() not in self.extensions:
            accepted = ", ".join(sorted(self.extensions))
            msg = f"refused {_quote(shown)}: {extension or 'no extension'} is not a video file type ({accepted})"
            raise AccessError(msg)

    def _split_at_root(self, candidate: str) -> tuple[str, list[str]] | None:
        """(real root, components below it) for a lexically contained path, else None."""
        best: tuple[str, str] | None = None
        for written, real in self._spellings:
            if _within(candidate, written) and (best is None or len(written) > len(best[0])):
                best = (written, real)
        if best is None:
            return None
        written, real = best
        rest = os.path.relpath(candidate, written)
        parts = [] if rest == "." else rest.split(os.sep)
        return real, parts

    def _follow_links(self, candidate: str, shown: str) -> str:
        """Resolve symlinks below the root one component at a time, never leaving the roots.

        Each link's target is checked against the roots as text before anything at the target
        is looked at. A missing component ends the walk (the file check then says "no video").
        """
        hops = 0
        while True:
            split = self._split_at_root(candidate)
            if split is None:
                msg = f"refused {_quote(shown)}: a symbolic link leads outside the allowed folders; {_HINT}"
                raise AccessError(msg)
            current, parts = split
            restart: str | None = None
            for position, part in enumerate(parts):
                step = os.path.join(current, part)
                try:
                    mode = os.lstat(step).st_mode
                except (FileNotFoundError, NotADirectoryError):
                    current = os.path.join(step, *parts[position + 1 :])
                    break
                except OSError as error:
                    msg = f"cannot read {_quote(shown)}: {error.strerror or error}"
                    raise AccessError(msg) from None
                if stat.S_ISLNK(mode):
                    hops += 1
                    if hops > _MAX_SYMLINKS:
                        msg = f"refused {_quote(shown)}: too many symbolic links (a loop?)"
                        raise AccessError(msg)
                    target = os.readlink(step)
                    restart = os.path.normpath(os.path.join(current, target, *parts[position + 1 :]))
                    break
                current = step
            if restart is None:
                break
            candidate = restart
        real = os.path.realpath(current)
        if not self.contains(real):  # defence in depth: a race, or a link the walk missed
            msg = f"refused {_quote(shown)}: it resolves outside the allowed folders; {_HINT}"
            raise AccessError(msg)
        return real


def check_question(question: object, max_chars: int = MAX_QUESTION_CHARS, *, what: str = "question") -> str:
    """The stripped question, or InputError when it is not a non-empty, bounded string."""
    if not isinstance(question, str):
        raise InputError(f"{what} must be a string, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InputError(f"{what} is empty; ask something about the video, e.g. 'What happens at the end?'")
    if len(text) > max_chars:
        raise InputError(f"{what} is {len(text):,} characters long; the limit is {max_chars:,}. Shorten it.")
    _check_encodable(text, what)
    return text


def check_count(value: object, *, maximum: int = MAX_RESULTS, what: str = "k") -> int:
    """``value`` as an int in ``[1, maximum]``, or InputError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{what} must be a whole number from 1 to {maximum}, got {reprlib.repr(value)}")
    if not 1 <= value <= maximum:
        raise InputError(f"{what} must be from 1 to {maximum}, got {value}")
    return value


def check_duration(duration_s: float, max_duration_s: float | None, *, shown: str = "the video") -> None:
    """Refuse a video longer than ``max_duration_s`` seconds (``None``: no limit)."""
    if max_duration_s is None:
        return
    if not math.isfinite(duration_s) or duration_s > max_duration_s:
        msg = (
            f"refused {shown}: it lasts {duration_s:.1f} s, over the limit of {max_duration_s:g} s; "
            "use a shorter clip"
        )
        raise AccessError(msg)
