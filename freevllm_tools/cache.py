"""Per-video feature cache: a second question about a video reuses its frames' features.

Entries are keyed by ``(video key, feature name)``:

- the **video key** is a content hash of the file (BLAKE2b, 160 bits, read in 4 MiB chunks),
  remembered in SQLite against ``(realpath, size, mtime_ns, inode)`` so that an unchanged file
  is not read again; a renamed copy gets the same key, an edited file a new one;
- the **feature name** says what the entry holds and what produced it: a kind, the model's
  identity and the sampling settings, built by :func:`feature_name`, e.g.
  ``"guide-pooled|ViT-L-14-336/openai|frames=50"``.

An entry is a few named arrays (each one ``.npy`` file, loaded with ``allow_pickle=False``)
and a small JSON ``meta`` dict. Two classes of entries:

- **persistent** (never evicted): the guide's pooled per-frame embeddings with the frame
  indices, timestamps and video info — small (50 x 768 floats a video) and what a library
  search and every question need;
- **budgeted** (least-recently-used eviction when their total exceeds ``budget_bytes``):
  dense guide tokens, the LLM-side projected tokens, resized frames — large, and cheap to
  recompute from one another (a miss costs an encoder pass, not a decode, while resized
  frames are held).

Writes are atomic: arrays go to uniquely named temporary files that are fsync'ed and renamed,
then one SQLite transaction (WAL mode) publishes the entry. A reader never sees a half-written
entry; several processes may share one cache directory.

Arrays may be NumPy arrays or torch tensors (torch is imported only when a tensor is given or
asked for). Tensors keep their dtype: bfloat16, which NumPy lacks, is stored bit-exact as a
``uint16`` view and comes back as bfloat16 from :meth:`CacheEntry.tensor` (or as float32 from
:meth:`CacheEntry.array`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import stat as stat_module
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import InputError, LibraryError, VideoError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FeatureCache",
    "CacheEntry",
    "CacheStats",
    "CacheUsage",
    "EntryInfo",
    "feature_name",
    "hash_file",
    "default_cache_dir",
    "parse_bytes",
    "jsonable",
    "GUIDE_POOLED",
    "GUIDE_DENSE",
    "LLM_TOKENS",
    "RESIZED_FRAMES",
    "PERSISTENT_KINDS",
    "DEFAULT_BUDGET_BYTES",
]

logger = logging.getLogger(__name__)

#: The guide's pooled per-frame embeddings, ``pooled (T, D)`` float32 L2-normalised, with
#: ``indices (T,)`` int64 and ``timestamps (T,)`` float64; meta ``{"info": {...}, "partial": bool}``
#: (``info`` is :func:`jsonable` of the ``VideoInfo``). Persistent. Shared by ``ask`` and the library.
GUIDE_POOLED = "guide-pooled"
#: The guide's dense patch embeddings, ``dense (T, h, w, D)``. Budgeted.
GUIDE_DENSE = "guide-dense"
#: The LLM-side projected tokens, ``tokens (T, h, w, D)`` in the model's dtype. Budgeted.
LLM_TOKENS = "llm-tokens"
#: Frames resized for an encoder, ``images (T, H, W, 3)`` uint8. Budgeted.
RESIZED_FRAMES = "frames-resized"
#: Kinds stored as persistent unless ``put(..., persistent=False)`` says otherwise.
PERSISTENT_KINDS = frozenset({GUIDE_POOLED})

#: Budget of the evictable entries when neither the argument nor ``FREEVLLM_CACHE_BUDGET`` says.
DEFAULT_BUDGET_BYTES = 4 * 1024**3

_HASH_CHUNK = 4 * 1024 * 1024
_SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TMP_MAX_AGE_S = 3600.0
_SWEEP_EVERY_S = 24 * 3600.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS files (realpath TEXT PRIMARY KEY, size INTEGER NOT NULL, "
    "mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, video_key TEXT NOT NULL, checked REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (video_key TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, "
    "persistent INTEGER NOT NULL, nbytes INTEGER NOT NULL, token TEXT NOT NULL, arrays TEXT NOT NULL, "
    "meta TEXT NOT NULL, created REAL NOT NULL, last_used INTEGER NOT NULL, PRIMARY KEY (video_key, name))",
    "CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used)",
)


# -- keys ------------------------------------------------------------------------------------


def hash_file(path: str | os.PathLike[str], *, chunk_size: int = _HASH_CHUNK) -> str:
    """Content hash of a whole file: BLAKE2b-160 as 40 hex digits, read in ``chunk_size`` chunks."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(chunk_size)
        view = memoryview(buffer)
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def feature_name(kind: str, identity: str, **settings: Any) -> str:
    """The name of a cache entry: ``kind|identity|key=value,...`` with the settings sorted.

    ``kind`` says what is stored (:data:`GUIDE_POOLED`, :data:`LLM_TOKENS`, ...), ``identity``
    which model made it (``ClipGuide.identity``, ``LlavaAnswerer.identity``), ``settings``
    everything else the values depend on (the number of frames sampled, a dtype, a size).
    The pipeline and the library build names with this one function, so that they share entries.

    >>> feature_name("guide-pooled", "ViT-L-14-336/openai", frames=50)
    'guide-pooled|ViT-L-14-336/openai|frames=50'
    """
    if not kind or "|" in kind:
        raise InputError(f"feature kind must be a non-empty string without '|', got {kind!r}")
    if not identity:
        raise InputError("feature identity is empty: pass the model's identity string")
    parts = []
    for key in sorted(settings):
        value = settings[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{key}={_setting_text(value)}")
    return f"{kind}|{identity}|{','.join(parts)}"


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_setting_text(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _kind_of(name: str) -> str:
    return name.split("|", 1)[0]


def default_cache_dir() -> Path:
    """``FREEVLLM_CACHE`` when set, else the platform's user cache directory for ``freevllm``."""
    env = os.environ.get("FREEVLLM_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("freevllm"))


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """A byte count from ``4294967296``, ``"4GiB"``, ``"500 MB"`` or ``"2g"``."""
    if isinstance(value, bool):
        raise InputError(f"a byte budget must be a number or a size such as '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(f"cannot read {value!r} as a size; write it like '4GiB', '500MB' or 1000000")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise InputError(f"a byte budget cannot be negative, got {value!r}")
    return int(number * _UNITS[unit])


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses become dicts, Fractions ``"30000/1001"``,
    paths strings, NumPy scalars and arrays numbers and lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# -- array conversion ------------------------------------------------------------------------

_TORCH_BIT_VIEWS = {2: ("int16", np.uint16), 1: ("uint8", np.uint8)}


def _to_numpy(name: str, value: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous NumPy array and the dtype tag that restores the original."""
    if type(value).__module__.split(".")[0] == "torch":
        import torch

        if not isinstance(value, torch.Tensor):
            raise InputError(f"cache array {name!r}: expected a tensor or an array, got {type(value).__name__}")
        tensor = value.detach().to("cpu").contiguous()
        tag = f"torch:{str(tensor.dtype).removeprefix('torch.')}"
        try:
            return np.ascontiguousarray(tensor.numpy()), tag
        except TypeError:  # bfloat16, float8: keep the bits
            view = _TORCH_BIT_VIEWS.get(tensor.element_size())
            if view is None:
                raise InputError(f"cache array {name!r}: cannot store tensors of dtype {tensor.dtype}") from None
            bits = tensor.view(getattr(torch, view[0])).numpy().view(view[1])
            return np.ascontiguousarray(bits), tag
    array = np.asarray(value)
    if array.dtype.hasobject or array.dtype.kind in "OV":
        raise InputError(
            f"cache array {name!r} has dtype {array.dtype}; only numeric and boolean arrays are stored "
            "(no pickling)"
        )
    return np.ascontiguousarray(array), f"numpy:{array.dtype.str}"


def _torch_dtype(tag: str) -> torch.dtype:
    import torch

    return getattr(torch, tag.split(":", 1)[1])


# -- records ---------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counters of this :class:`FeatureCache` object (this process only), for tests and logs."""

    hits: int = 0
    """``get`` calls that found an entry."""
    misses: int = 0
    """``get`` calls that found none (or found a damaged one)."""
    puts: int = 0
    """Entries written."""
    evictions: int = 0
    """Budgeted entries evicted to keep within the budget (by any ``put`` of this object)."""
    hashes: int = 0
    """Files read to compute a content hash."""
    key_reuses: int = 0
    """``video_key`` calls answered from the remembered (path, size, mtime) without reading."""

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass(frozen=True)
class CacheUsage:
    """Bytes held by the cache, by class of entry."""

    persistent_bytes: int
    budgeted_bytes: int
    budget_bytes: int
    entries: int


@dataclass(frozen=True)
class EntryInfo:
    """One entry's bookkeeping (no arrays loaded)."""

    video_key: str
    name: str
    kind: str
    persistent: bool
    nbytes: int
    last_used: int
    """Use order: larger is more recent."""


@dataclass
class CacheEntry:
    """A loaded entry: named arrays plus JSON metadata.

    ``entry["pooled"]`` / :meth:`array` give NumPy arrays (bfloat16 widened to float32);
    :meth:`tensor` gives a torch tensor in the dtype it was stored with.
    """

    video_key: str
    name: str
    meta: dict[str, Any]
    persistent: bool
    nbytes: int
    _raw: dict[str, np.ndarray] = field(repr=False)
    _tags: dict[str, str] = field(repr=False)

    @property
    def names(self) -> list[str]:
        """The array names in this entry."""
        return list(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def array(self, name: str) -> np.ndarray:
        """Array ``name`` as NumPy; torch dtypes NumPy lacks (bfloat16) come back as float32."""
        raw, tag = self._get(name)
        if tag == "torch:bfloat16":  # widening bfloat16 is exact: its bits are float32's top half
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if tag.startswith("torch:float8"):
            return self.tensor(name).float().numpy()
        return raw

    def tensor(self, name: str, *, device: Any = None) -> torch.Tensor:
        """Array ``name`` as a torch tensor with its original dtype, on ``device`` if given."""
        import torch

        raw, tag = self._get(name)
        if tag.startswith("torch:") and raw.dtype == np.uint16:  # bfloat16 bits; view as int16
            raw = raw.view(np.int16)
        tensor = torch.from_numpy(np.array(raw) if not raw.flags.writeable else raw)
        if tag.startswith("torch:"):
            dtype = _torch_dtype(tag)
            if tensor.dtype != dtype:
                tensor = tensor.view(dtype)
        return tensor if device is None else tensor.to(device)

    def tensors(self, *, device: Any = None) -> dict[str, torch.Tensor]:
        """Every array as a torch tensor (see :meth:`tensor`)."""
        return {name: self.tensor(name, device=device) for name in self._raw}

    def _get(self, name: str) -> tuple[np.ndarray, str]:
        if name not in self._raw:
            raise KeyError(f"cache entry {self.name!r} has no array {name!r}; it has {self.names}")
        return self._raw[name], self._tags[name]


# -- atomic file writes ----------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(handle)``: temporary file, fsync, rename, fsync the folder.

    A reader sees the old file or the new one, never a part; a crash leaves at most a
    ``.tmp-*`` file beside it. The cache's arrays and the library's manifest and journal use it.
    """
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as ``.npy`` (no pickle), atomically."""
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


# -- the cache -------------------------------------------------------------------------------


class FeatureCache:
    """Per-video features on disk, keyed by content hash + model identity + sampling.

    ``cache_dir`` (else ``FREEVLLM_CACHE``, else the platform's user cache directory) holds
    ``cache.sqlite`` and ``blobs/``. ``budget_bytes`` (else ``FREEVLLM_CACHE_BUDGET``, else
    4 GiB; ``"8GiB"`` style strings accepted) bounds the budgeted entries only.

    Typical use (what the pipeline does)::

        cache = FeatureCache()
        key = cache.video_key("clip.mp4")                  # hashes the file once, ever
        name = feature_name(GUIDE_POOLED, guide.identity, frames=50)
        entry = cache.get(key, name)
        if entry is None:
            ...                                            # decode + encode
            cache.put(key, name, {"pooled": pooled, "indices": idx, "timestamps": ts},
                      meta={"info": jsonable(info)})
        else:
            pooled = entry.tensor("pooled")

    One object may be used from several threads; several processes may share a directory.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        budget_bytes: int | str | None = None,
    ) -> None:
        self.root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        if budget_bytes is None:
            budget_bytes = os.environ.get("FREEVLLM_CACHE_BUDGET") or DEFAULT_BUDGET_BYTES
        self.budget_bytes = parse_bytes(budget_bytes)
        self.stats = CacheStats()
        self._blobs = self.root / "blobs"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = (
                f"cannot create the feature cache directory {self.root}: {exc}. Pass cache_dir= "
                "or set FREEVLLM_CACHE to a writable folder"
            )
            raise LibraryError(msg) from exc
        self._lock = threading.RLock()
        self.repairs: list[str] = []
        """What opening had to fix: a damaged database is set aside and the cache starts empty."""
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()
        self._maybe_sweep()

    # -- connection ------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        return self.root / "cache.sqlite"

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            return self._open_database()
        except LibraryError as exc:
            cause = exc.__cause__
            if not isinstance(cause, sqlite3.DatabaseError) or isinstance(cause, sqlite3.OperationalError):
                raise
        # A cache holds nothing that cannot be computed again: set the damaged one aside.
        self._set_aside(f"the database is damaged ({cause})")
        return self._open_database()

    def _set_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in (self.db_path, Path(f"{self.db_path}-wal"), Path(f"{self.db_path}-shm"), self._blobs):
            if path.exists():
                os.replace(path, path.with_name(f"{path.name}.damaged-{stamp}"))
        self._blobs.mkdir(parents=True, exist_ok=True)
        self.repairs.append(reason)
        logger.warning("feature cache %s: %s; set aside, starting empty", self.root, reason)

    def _open_database(self) -> sqlite3.Connection:
        # A connection made before a fork must not be used in the child: open a new one.
        try:
            conn = sqlite3.connect(
                self.db_path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with _transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
                elif int(row[0]) > _SCHEMA_VERSION:
                    raise LibraryError(
                        f"feature cache {self.root} has schema {row[0]}, newer than this version of "
                        f"freevllm-tools understands ({_SCHEMA_VERSION}); upgrade, or use another cache_dir"
                    )
        except sqlite3.Error as exc:
            msg = f"cannot open the feature cache database {self.db_path}: {exc}"
            raise LibraryError(msg) from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close the database connection (the object reopens it if used again)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, budget_bytes={self.budget_bytes})"

    # -- video keys ------------------------------------------------------------------------

    def video_key(self, path: str | os.PathLike[str]) -> str:
        """The content key of the video file at ``path``.

        The file is read and hashed only when its (realpath, size, mtime_ns, inode) differ from
        the last time; otherwise the remembered key is returned (``stats.key_reuses``).
        """
        real = os.path.realpath(os.fspath(path))
        st = _stat_file(real, path)
        with self._lock:
            row = self._connect().execute(
                "SELECT size, mtime_ns, inode, video_key FROM files WHERE realpath = ?", (real,)
            ).fetchone()
        if row is not None and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
            self.stats.key_reuses += 1
            return str(row[3])
        key = hash_file(real)
        self.stats.hashes += 1
        after = _stat_file(real, path)
        if (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino):
            with self._lock, _transaction(self._connect()) as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    (real, st.st_size, st.st_mtime_ns, st.st_ino, key, time.time()),
                )
        else:  # written to while we read it: do not remember a key that may be torn
            logger.warning("video %s changed while it was hashed; its key is not remembered", real)
        return key

    # -- entries ---------------------------------------------------------------------------

    def get(self, video_key: str, name: str, *, mmap: bool = False) -> CacheEntry | None:
        """The entry ``(video_key, name)``, or None (a miss). Counts ``stats.hits`` / ``misses``.

        ``mmap=True`` maps the arrays read-only instead of reading them (large token tensors).
        A budgeted entry that is read becomes the most recently used.
        """
        with self._lock:
            row = self._connect().execute(
                "SELECT persistent, nbytes, token, arrays, meta FROM entries WHERE video_key = ? AND name = ?",
                (video_key, name),
            ).fetchone()
        if row is None:
            self.stats.misses += 1
            return None
        persistent, nbytes, token, arrays_json, meta_json = row
        specs = json.loads(arrays_json)
        raw: dict[str, np.ndarray] = {}
        tags: dict[str, str] = {}
        try:
            for array_name, spec in specs.items():
                path = self._blob_path(video_key, token, array_name)
                array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
                if list(array.shape) != spec["shape"]:
                    raise ValueError(f"shape {array.shape} on disk, {spec['shape']} recorded")
                raw[array_name], tags[array_name] = array, spec["dtype"]
        except (OSError, ValueError, EOFError) as exc:
            # Evicted by another process between the two reads, or damaged on disk.
            logger.warning("feature cache entry %s / %s unreadable (%s); treating as a miss", video_key, name, exc)
            self._drop(video_key, name, token)
            self.stats.misses += 1
            return None
        if not persistent:
            with self._lock, _transaction(self._connect()) as conn:
                conn.execute(
                    "UPDATE entries SET last_used = (SELECT COALESCE(MAX(last_used), 0) + 1 FROM entries) "
                    "WHERE video_key = ? AND name = ? AND token = ?",
                    (video_key, name, token),
                )
        self.stats.hits += 1
        return CacheEntry(video_key, name, json.loads(meta_json), bool(persistent), int(nbytes), raw, tags)

    def get_tensors(
        self, video_key: str, name: str, *, device: Any = None
    ) -> dict[str, torch.Tensor] | None:
        """:meth:`get` with every array as a torch tensor in its stored dtype, or None."""
        entry = self.get(video_key, name)
        return None if entry is None else entry.tensors(device=device)

    def contains(self, video_key: str, name: str) -> bool:
        """Whether the entry exists (no counters touched, nothing loaded)."""
        with self._lock:
            row = self._connect().execute(
                "SELECT 1 FROM entries WHERE video_key = ? AND name = ?", (video_key, name)
            ).fetchone()
        return row is not None

    def put(
        self,
        video_key: str,
        name: str,
        arrays: Mapping[str, Any],
        *,
        meta: Mapping[str, Any] | None = None,
        persistent: bool | None = None,
    ) -> bool:
        """Store ``arrays`` (name -> ndarray or tensor) and JSON ``meta`` as entry ``(video_key, name)``.

        ``persistent`` defaults to whether the name's kind is in :data:`PERSISTENT_KINDS`.
        A budgeted entry evicts least-recently-used budgeted entries until the total fits
        the budget; one larger than the whole budget is not stored (returns False).
        An existing entry of the same name is replaced.
        """
        if not isinstance(arrays, Mapping) or not arrays:
            raise InputError(f"cache put {name!r}: arrays must be a non-empty mapping of name -> array")
        kind = _kind_of(name)
        if persistent is None:
            persistent = kind in PERSISTENT_KINDS
        converted: dict[str, tuple[np.ndarray, str]] = {}
        for array_name, value in arrays.items():
            if not isinstance(array_name, str) or not _NAME_RE.match(array_name):
                raise InputError(
                    f"cache array name {array_name!r} must be 1-64 letters, digits, '.', '_' or '-'"
                )
            converted[array_name] = _to_numpy(array_name, value)
        meta_json = json.dumps(jsonable(dict(meta or {})), allow_nan=True)
        nbytes = sum(array.nbytes for array, _ in converted.values())
        if not persistent and nbytes > self.budget_bytes:
            logger.info(
                "feature cache: %s (%d bytes) exceeds the whole budget (%d bytes); not stored",
                name, nbytes, self.budget_bytes,
            )
            return False
        token = uuid.uuid4().hex
        folder = self._video_dir(video_key)
        written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for array_name, (array, _) in converted.items():
                path = self._blob_path(video_key, token, array_name)
                atomic_save_npy(path, array)
                written.append(path)
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            msg = f"cannot write feature cache entry {name!r} under {folder}: {exc}"
            raise LibraryError(msg) from exc
        specs = {k: {"dtype": tag, "shape": list(array.shape)} for k, (array, tag) in converted.items()}
        stale: list[tuple[str, str, list[str]]] = []
        with self._lock, _transaction(self._connect()) as conn:
            old = conn.execute(
                "SELECT token, arrays FROM entries WHERE video_key = ? AND name = ?", (video_key, name)
            ).fetchone()
            if old is not None:
                stale.append((video_key, old[0], list(json.loads(old[1]))))
            clock = conn.execute("SELECT COALESCE(MAX(last_used), 0) + 1 FROM entries").fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (video_key, name, kind, int(persistent), nbytes, token, json.dumps(specs), meta_json,
                 time.time(), clock),
            )
            evicted = self._evict_locked(conn, self.budget_bytes) if not persistent else []
            stale.extend(evicted)
        self.stats.puts += 1
        self.stats.evictions += len(evicted)
        self._unlink_blobs(stale)
        return True

    def delete(self, video_key: str, name: str | None = None) -> int:
        """Remove entry ``name`` of ``video_key`` (every entry of it when None); returns how many."""
        with self._lock, _transaction(self._connect()) as conn:
            if name is None:
                rows = conn.execute(
                    "SELECT video_key, token, arrays FROM entries WHERE video_key = ?", (video_key,)
                ).fetchall()
                conn.execute("DELETE FROM entries WHERE video_key = ?", (video_key,))
            else:
                rows = conn.execute(
                    "SELECT video_key, token, arrays FROM entries WHERE video_key = ? AND name = ?",
                    (video_key, name),
                ).fetchall()
                conn.execute("DELETE FROM entries WHERE video_key = ? AND name = ?", (video_key, name))
        self._unlink_blobs([(k, t, list(json.loads(a))) for k, t, a in rows])
        return len(rows)

    def clear(self) -> None:
        """Remove every entry and every remembered file key."""
        with self._lock, _transaction(self._connect()) as conn:
            rows = conn.execute("SELECT video_key, token, arrays FROM entries").fetchall()
            conn.execute("DELETE FROM entries")
            conn.execute("DELETE FROM files")
        self._unlink_blobs([(k, t, list(json.loads(a))) for k, t, a in rows])

    def evict(self, budget_bytes: int | str | None = None) -> int:
        """Evict least-recently-used budgeted entries down to ``budget_bytes`` (default: the budget)."""
        target = self.budget_bytes if budget_bytes is None else parse_bytes(budget_bytes)
        with self._lock, _transaction(self._connect()) as conn:
            evicted = self._evict_locked(conn, target)
        self.stats.evictions += len(evicted)
        self._unlink_blobs(evicted)
        return len(evicted)

    def entries(self, video_key: str | None = None) -> list[EntryInfo]:
        """Bookkeeping of every entry (of ``video_key``), least recently used first."""
        query = "SELECT video_key, name, kind, persistent, nbytes, last_used FROM entries"
        params: tuple[Any, ...] = ()
        if video_key is not None:
            query += " WHERE video_key = ?"
            params = (video_key,)
        with self._lock:
            rows = self._connect().execute(query + " ORDER BY last_used", params).fetchall()
        return [EntryInfo(k, n, kind, bool(p), int(b), int(u)) for k, n, kind, p, b, u in rows]

    def usage(self) -> CacheUsage:
        """Bytes held by persistent and by budgeted entries."""
        with self._lock:
            rows = self._connect().execute(
                "SELECT persistent, COALESCE(SUM(nbytes), 0), COUNT(*) FROM entries GROUP BY persistent"
            ).fetchall()
        sums = {bool(p): (int(b), int(c)) for p, b, c in rows}
        persistent, budgeted = sums.get(True, (0, 0)), sums.get(False, (0, 0))
        return CacheUsage(persistent[0], budgeted[0], self.budget_bytes, persistent[1] + budgeted[1])

    def sweep(self, min_age_s: float = _TMP_MAX_AGE_S) -> int:
        """Delete files no entry refers to (left by a killed writer), older than ``min_age_s``."""
        with self._lock:
            rows = self._connect().execute("SELECT video_key, token FROM entries").fetchall()
        live = {(k, t) for k, t in rows}
        now, removed = time.time(), 0
        for path in self._blobs.glob("*/*/*"):
            try:
                if now - path.stat().st_mtime < min_age_s:
                    continue
                video_key = path.parent.name
                token = path.name.split(".", 1)[0]
                if path.name.startswith(".tmp-") or (video_key, token) not in live:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        with self._lock, _transaction(self._connect()) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_sweep', ?)", (str(now),))
        return removed

    # -- internals -------------------------------------------------------------------------

    def _video_dir(self, video_key: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_-]{4,128}", video_key):
            raise InputError(f"not a video key: {video_key!r} (get one from FeatureCache.video_key)")
        return self._blobs / video_key[:2] / video_key

    def _blob_path(self, video_key: str, token: str, array_name: str) -> Path:
        return self._video_dir(video_key) / f"{token}.{array_name}.npy"

    def _evict_locked(self, conn: sqlite3.Connection, budget: int) -> list[tuple[str, str, list[str]]]:
        total = conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries WHERE persistent = 0").fetchone()[0]
        evicted: list[tuple[str, str, list[str]]] = []
        if total <= budget:
            return evicted
        for video_key, name, token, arrays, nbytes in conn.execute(
            "SELECT video_key, name, token, arrays, nbytes FROM entries WHERE persistent = 0 ORDER BY last_used"
        ).fetchall():
            if total <= budget:
                break
            conn.execute("DELETE FROM entries WHERE video_key = ? AND name = ?", (video_key, name))
            evicted.append((video_key, token, list(json.loads(arrays))))
            total -= nbytes
        return evicted

    def _drop(self, video_key: str, name: str, token: str) -> None:
        with self._lock, _transaction(self._connect()) as conn:
            row = conn.execute(
                "SELECT arrays FROM entries WHERE video_key = ? AND name = ? AND token = ?",
                (video_key, name, token),
            ).fetchone()
            conn.execute(
                "DELETE FROM entries WHERE video_key = ? AND name = ? AND token = ?", (video_key, name, token)
            )
        if row is not None:
            self._unlink_blobs([(video_key, token, list(json.loads(row[0])))])

    def _unlink_blobs(self, items: list[tuple[str, str, list[str]]]) -> None:
        for video_key, token, names in items:
            for array_name in names:
                try:
                    self._blob_path(video_key, token, array_name).unlink(missing_ok=True)
                except OSError as exc:  # pragma: no cover - best effort
                    logger.debug("could not delete cache file: %s", exc)

    def _maybe_sweep(self) -> None:
        with self._lock:
            row = self._connect().execute("SELECT value FROM meta WHERE key = 'last_sweep'").fetchone()
        if row is None:
            with self._lock, _transaction(self._connect()) as conn:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('last_sweep', ?)", (str(time.time()),))
        elif time.time() - float(row[0]) > _SWEEP_EVERY_S:
            self.sweep()


def _stat_file(real: str, given: object) -> os.stat_result:
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise VideoError(f"video {given!s} does not exist; check the path") from None
    except OSError as exc:
        raise VideoError(f"cannot read video {given!s}: {exc}") from exc
    if not stat_module.S_ISREG(st.st_mode):
        raise VideoError(f"{given!s} is not a regular file; pass a video file")
    return st


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")

