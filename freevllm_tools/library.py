"""``VideoLibrary``: search a folder of videos by text, answers are ``Moment``s (video, start, end).

Each video is sampled (see *Sampling* below), each sampled frame embedded once by the CLIP
guide (the pooled, L2-normalised image embedding), and the embeddings put in a frame index
(FAISS by default). A text query is embedded by the same guide; frames are scored by inner
product (cosine); the best frames are merged, per video, into moments: runs of hits that are
consecutive in the video's sampled frames (or closer than ``merge_gap`` seconds).

Storage, in the library folder::

    library.sqlite       videos, frames (id -> video, position, frame index, timestamp) and the
                         embeddings themselves: the source of truth (SQLite, WAL mode)
    index.json           manifest of the frame index: file, count, dim, max id, identity,
                         generation, checksum
    index-*.faiss        the FAISS index named by the manifest
    library.lock         the writers' file lock
    videos.jsonl         the journal: one JSON line per committed change (a video's row and its
                         frames' ids, indices and times; moves; removals), appended and fsync'ed
                         after each commit: what rebuilds a damaged or truncated database

Crash safety: a writer holds the file lock, writes one video's rows in one SQLite
transaction, and only then updates and saves the FAISS index (temporary file, fsync, rename,
then the manifest the same way). A killed writer therefore leaves the database as it was
before the video it was on, and at worst a FAISS file that is behind it. Opening checks the
index against the manifest (checksum, identity, dimension) and against SQLite (ids), then
catches it up or rebuilds it from the embeddings in SQLite; it never serves a stale index.
A reader that finds the database changed by another process (a generation counter) brings
its in-memory index up to date before searching.

A damaged database (SQLite says "malformed" or "not a database", e.g. a truncated file) or one
that lost commits its journal holds is moved aside (``library.sqlite.damaged-*``) and rebuilt:
the videos from the journal, their embeddings from what still reads of the old file, else the
frame index file (when it matches its manifest), else the feature cache. A video none of them
can restore is dropped and named in ``repairs`` (re-adding its file indexes it again).

Sampling, always by the segment-middle rule: ``ceil(duration * frames_per_second)`` frames,
at least ``num_frames`` and at most ``max_frames`` (defaults 0.5 frame/s, 50, 120): a clip up
to 100 s gets the 50 frames ``ask`` samples, so the two share cached guide features; longer
videos get denser sampling, up to one frame every 2 s. ``frames_per_second=False`` samples
exactly ``num_frames``. The cap bounds the decoded frames held in memory at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import (
    GUIDE_POOLED,
    FeatureCache,
    atomic_write,
    feature_name,
    hash_file,
    jsonable,
)
from .errors import FreeVideoError, InputError, LibraryError
from .frame_index import INDEX_KINDS, FaissFrameIndex, FrameIndex, make_frame_index
from .limits import Limits, resolve_limits
from .moments import AddReport, IndexRepair, Moment, VideoRecord, format_moments

if TYPE_CHECKING:  # pragma: no cover
    from .guide import ClipGuide
    from .video import Frames

__all__ = [
    "VideoLibrary",
    "Moment",
    "VideoRecord",
    "AddReport",
    "IndexRepair",
    "FrameIndex",
    "FaissFrameIndex",
    "make_frame_index",
    "format_moments",
    "default_library_dir",
    "VIDEO_EXTENSIONS",
]

logger = logging.getLogger(__name__)

#: File name endings ``add`` picks up when given a folder (a file given by name is always tried).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
     ".ts", ".mts", ".m2ts", ".ogv"}
)

_SCHEMA_VERSION = 1
_DB_NAME = "library.sqlite"
_MANIFEST = "index.json"
_LOCK = "library.lock"
_JOURNAL = "videos.jsonl"
_SQL_CHUNK = 900
_SAVE_EVERY_S = 30.0
_SAVE_EACH_BELOW_BYTES = 64 * 1024**2

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS videos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL UNIQUE,
        content_key TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
        guide_identity TEXT NOT NULL,
        requested_frames INTEGER NOT NULL,
        indexed_frames INTEGER NOT NULL,
        num_frames INTEGER NOT NULL, fps REAL NOT NULL, duration REAL NOT NULL,
        width INTEGER NOT NULL, height INTEGER NOT NULL,
        info TEXT NOT NULL, partial INTEGER NOT NULL, added_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS videos_content ON videos (content_key)",
    """CREATE TABLE IF NOT EXISTS frames (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        video_id INTEGER NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
        position INTEGER NOT NULL, frame_index INTEGER NOT NULL, timestamp REAL NOT NULL,
        embedding BLOB NOT NULL,
        UNIQUE (video_id, position))""",
)


# -- the library -----------------------------------------------------------------------------


class _LockTimeout(LibraryError):
    """Another process held the library's write lock for longer than ``lock_timeout``."""


class _DamagedFile(LibraryError):
    """The database file is visibly damaged (truncated) before SQLite is asked."""


@dataclass
class _Features:
    pooled: np.ndarray  # (T, D) float32, L2-normalised
    indices: np.ndarray  # (T,) int64
    timestamps: np.ndarray  # (T,) float64
    info: dict[str, Any]
    partial: bool
    from_cache: bool


class VideoLibrary:
    """A searchable library of videos: per-frame CLIP guide embeddings in a frame index.

    Args:
        path: the library folder (created if missing); None: :func:`default_library_dir`.
        guide: the :class:`~freevllm_tools.guide.ClipGuide` that embeds frames and queries;
            None loads the default one (``ClipGuide.from_pretrained()``) when first needed.
            A library stays with the guide it was built with (its ``identity``).
        cache: the :class:`~freevllm_tools.cache.FeatureCache` shared with ``ask`` (None: the
            default cache; False: none). Embeddings found there are not recomputed.
        num_frames, frames_per_second, max_frames: sampling (see the module docstring);
            defaults 50, 0.5 and 120. Stored with the library and reused when reopened.
        index: ``"flat"`` (exact, the default) or ``"hnsw"`` (approximate, for large libraries),
            or a :class:`FrameIndex` object (e.g. a vector database client). Stored.
        index_options: HNSW ``m``, ``ef_construction``, ``ef_search``.
        merge_gap: seconds between two hits of one video that still merge into one moment
            (hits consecutive in the sampled frames always merge).
        lock_timeout: seconds a writer waits for another process's write to finish.
        limits: bounds on each video added (:class:`~freevllm_tools.limits.Limits`; None:
            the defaults), checked before it is hashed, probed or decoded.

    ``repairs`` lists what opening had to fix in the frame index or the database.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        guide: ClipGuide | None = None,
        *,
        cache: FeatureCache | None | bool = None,
        num_frames: int | None = None,
        frames_per_second: float | None | bool = None,
        max_frames: int | None = None,
        index: str | FrameIndex | None = None,
        index_options: dict[str, Any] | None = None,
        merge_gap: float = 0.0,
        lock_timeout: float = 600.0,
        limits: Limits | None = None,
    ) -> None:
        import filelock

        self.path = Path(path).expanduser() if path is not None else default_library_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LibraryError(f"cannot create the library folder {self.path}: {exc}") from exc
        self._guide = guide
        if cache is None or cache is True:
            cache = FeatureCache()
        self.cache: FeatureCache | None = cache or None
        if merge_gap < 0:
            raise InputError(f"merge_gap must be >= 0 seconds, got {merge_gap}")
        self.merge_gap = float(merge_gap)
        self.limits = resolve_limits(limits)
        self.repairs: list[IndexRepair] = []
        self._mutex = threading.RLock()
        self._file_lock = filelock.FileLock(os.fspath(self.path / _LOCK), timeout=lock_timeout)
        self._lock_timeout = lock_timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._index: FrameIndex | None = None
        self._custom_index = index is not None and not isinstance(index, str)
        self._generation = -1
        self._dirty = False
        self._decoding: dict[str, Future[tuple[int, Frames]]] = {}
        self._last_save = time.monotonic()
        self._open((num_frames, frames_per_second, max_frames, index, index_options))

    # -- settings --------------------------------------------------------------------------

    def _open(self, settings: tuple[Any, ...]) -> None:
        """Check the database against its journal, apply the settings, load the frame index;
        a damaged database is rebuilt first (see the module docstring)."""
        try:
            self._check_journal()
            self._setup(*settings)
            self._open_index()
        except (sqlite3.DatabaseError, LibraryError) as exc:
            cause = _damage(exc)
            if cause is None:
                raise
            with self._write_lock():
                if not self._healthy():  # another process may have rebuilt it meanwhile
                    self._recover_database(f"the database is damaged ({cause})")
            self._check_journal()
            self._setup(*settings)
            self._open_index()

    def _setup(self, num_frames, frames_per_second, max_frames, index, index_options) -> None:
        stored = self._meta_all()
        sampling = json.loads(stored.get("sampling", "null")) or {
            "num_frames": 50, "frames_per_second": 0.5, "max_frames": 120,
        }
        if num_frames is not None:
            sampling["num_frames"] = num_frames
        if frames_per_second is not None:
            sampling["frames_per_second"] = frames_per_second or None
        if max_frames is not None:
            sampling["max_frames"] = max_frames
        n, fps, cap = sampling["num_frames"], sampling["frames_per_second"], sampling["max_frames"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"num_frames must be a positive integer, got {n!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
            raise InputError(f"frames_per_second must be positive or None, got {fps!r}")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < n:
            raise InputError(f"max_frames must be an integer >= num_frames ({n}), got {cap!r}")
        self.sampling = sampling
        kind = stored.get("index_kind", "flat")
        options = json.loads(stored.get("index_options", "{}"))
        if isinstance(index, str):
            if index not in INDEX_KINDS:
                raise InputError(f"index must be one of {INDEX_KINDS} or a FrameIndex object, got {index!r}")
            if index != kind:
                options = {}
            kind = index
        elif index is not None:
            if not isinstance(index, FrameIndex):
                raise InputError(f"index must be 'flat', 'hnsw' or a FrameIndex object, got {type(index).__name__}")
            kind = index.kind
        if index_options:
            options = {**options, **index_options}
        self.index_kind, self.index_options = kind, options
        wanted = {"schema": str(_SCHEMA_VERSION), "sampling": json.dumps(sampling)}
        if not self._custom_index:
            FaissFrameIndex(kind, 1, **options)  # validates the options now, not at the first add
            wanted.update(index_kind=kind, index_options=json.dumps(options))
        else:  # the stored FAISS settings stay for when the library is opened without it
            self._index = index  # type: ignore[assignment]
        if any(stored.get(key) != value for key, value in wanted.items()) or "generation" not in stored:
            with self._write_lock():
                with self._transaction() as conn:
                    for key, value in wanted.items():
                        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
                self._journal({"op": "meta", "gen": self._db_generation(), "values": wanted})

    def frames_for(self, duration: float) -> int:
        """How many frames this library samples from a video of ``duration`` seconds."""
        n, fps, cap = (self.sampling[k] for k in ("num_frames", "frames_per_second", "max_frames"))
        if not fps or not math.isfinite(duration) or duration <= 0:
            return n
        return int(min(cap, max(n, math.ceil(duration * fps))))

    @property
    def guide(self) -> ClipGuide:
        """The guide; the default one is loaded on first use."""
        if self._guide is None:
            from .guide import ClipGuide

            self._guide = ClipGuide.from_pretrained()
        return self._guide

    @property
    def guide_identity(self) -> str | None:
        """The identity of the guide the library's embeddings come from (None while empty)."""
        return self._meta("guide_identity")

    @property
    def dim(self) -> int | None:
        value = self._meta("dim")
        return None if value is None else int(value)

    # -- database --------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        db = self.path / _DB_NAME
        problem = _truncation(db)
        if problem is not None:
            raise _DamagedFile(f"library database {db} is damaged: {problem}")
        try:
            conn = sqlite3.connect(db, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.Error as exc:
            raise LibraryError(f"cannot open the library database {db}: {exc}") from exc
        if row is not None and int(row[0]) > _SCHEMA_VERSION:
            conn.close()
            raise LibraryError(
                f"library {self.path} has schema {row[0]}; this freevllm-tools understands "
                f"{_SCHEMA_VERSION}: upgrade it"
            )
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one state of the database."""
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._connect().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _meta_all(self) -> dict[str, str]:
        return dict(self._connect().execute("SELECT key, value FROM meta").fetchall())

    def _db_generation(self, conn: sqlite3.Connection | None = None) -> int:
        row = (conn or self._connect()).execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        import filelock

        with self._mutex:
            try:
                with self._file_lock:
                    yield
            except filelock.Timeout as exc:
                raise _LockTimeout(
                    f"library {self.path} is being written by another process and stayed locked "
                    f"for {self._lock_timeout:.0f} s; retry later (lock file {self.path / _LOCK})"
                ) from exc

    def close(self) -> None:
        """Save a pending index and close the database."""
        with self._mutex:
            if self._dirty and self._conn is not None:
                with contextlib.suppress(FreeVideoError), self._write_lock():
                    self._sync()
                    self._save_index()
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> VideoLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VideoLibrary({str(self.path)!r}, videos={len(self)}, frames={self.num_frames})"

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM videos").fetchone()[0])

    @property
    def num_frames(self) -> int:
        """Frames in the library."""
        return int(self._connect().execute("SELECT COUNT(*) FROM frames").fetchone()[0])

    def videos(self) -> list[VideoRecord]:
        """Every indexed video, by id."""
        rows = self._connect().execute(f"SELECT {_VIDEO_COLUMNS} FROM videos ORDER BY id").fetchall()
        return [_record(row) for row in rows]

    def video(self, ref: int | str | os.PathLike[str] | VideoRecord) -> VideoRecord | None:
        """The video with this id or path, or None."""
        if isinstance(ref, VideoRecord):
            ref = ref.id
        if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
            row = self._connect().execute(
                f"SELECT {_VIDEO_COLUMNS} FROM videos WHERE id = ?", (int(ref),)
            ).fetchone()
        elif isinstance(ref, (str, os.PathLike)):
            row = self._connect().execute(
                f"SELECT {_VIDEO_COLUMNS} FROM videos WHERE path = ?", (os.path.realpath(os.fspath(ref)),)
            ).fetchone()
        else:
            raise InputError(f"a video is named by its id, its path or its record, got {type(ref).__name__}")
        return None if row is None else _record(row)

    def __contains__(self, ref: object) -> bool:
        try:
            return self.video(ref) is not None  # type: ignore[arg-type]
        except InputError:
            return False

    # -- adding ----------------------------------------------------------------------------

    def add(
        self,
        paths_or_folder: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        recursive: bool = True,
        progress: bool = True,
    ) -> AddReport:
        """Index videos: files, folders (their video files, ``recursive``ly), or a list of both.

        Unchanged files are skipped without being read; changed ones are re-indexed (same
        video id, new frame ids); a file that fails is reported in ``AddReport.failed`` and the
        others go on. Each video is committed on its own, so an interrupted ``add`` keeps the
        videos it finished.
        """
        report = AddReport()
        files = self._collect(paths_or_folder, recursive, report)
        if files:
            self._check_guide()
        from tqdm.auto import tqdm

        bar = tqdm(files, desc="indexing", unit="video", disable=not progress)
        # Decoding the next file overlaps with embedding the current one (one worker thread),
        # so the encoder, not the decoder, sets the pace; see docs/benchmarks.md, table 3.
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freevllm-decode")
        self._decoding = {}
        try:
            for position, file in enumerate(bar):
                bar.set_postfix_str(os.path.basename(file)[-40:], refresh=False)
                if position + 1 < len(files):
                    self._prefetch(prefetch, files[position + 1])
                try:
                    self._add_one(file, report)
                except _LockTimeout:
                    raise
                except FreeVideoError as exc:
                    report.failed.append((file, str(exc)))
                except Exception as exc:  # noqa: BLE001 - carry on with the other files
                    logger.debug("indexing %s failed", file, exc_info=True)
                    report.failed.append((file, f"{type(exc).__name__}: {exc}"))
        finally:
            bar.close()
            for future in self._decoding.values():
                future.cancel()
            prefetch.shutdown(wait=True)
            self._decoding = {}
            if self._dirty:
                with self._write_lock():
                    self._sync()
                    self._save_index()
        return report

    def _collect(self, source: Any, recursive: bool, report: AddReport) -> list[str]:
        items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        files: list[str] = []
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, (str, os.PathLike)):
                raise InputError(f"add() takes paths (str or PathLike), got {type(item).__name__}")
            path = Path(os.fspath(item)).expanduser()
            if path.is_dir():
                walker = path.rglob("*") if recursive else path.glob("*")
                found = sorted(
                    p for p in walker
                    if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            elif path.exists():
                found = [path]
            else:
                report.failed.append((os.fspath(item), "no such file or folder"))
                continue
            for p in found:
                real = os.path.realpath(p)
                if real not in seen:
                    seen.add(real)
                    files.append(real)
        return files

    def _add_one(self, real: str, report: AddReport) -> None:
        st = os.stat(real)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        identity = self.guide.identity
        row = self._row_by_path(real)
        if row is not None and self._unchanged(row, stamp, identity):
            report.skipped.append(real)
            return
        self.limits.check_file(real)  # before the file is hashed
        content_key = self.cache.video_key(real) if self.cache is not None else hash_file(real)
        if row is not None and row["content_key"] == content_key and self._current(row, identity):
            with self._write_lock(), self._transaction() as conn:  # touched, not changed
                conn.execute(
                    "UPDATE videos SET size_bytes = ?, mtime_ns = ?, inode = ? WHERE id = ?", (*stamp, row["id"])
                )
            report.skipped.append(real)
            return
        if row is None and self._try_move(real, content_key, stamp, identity, report):
            return
        features = self._features(real, content_key, identity)
        with self._write_lock():
            self._sync()
            row = self._row_by_path(real)  # another process may have indexed it meanwhile
            if row is not None and row["content_key"] == content_key and self._current(row, identity):
                report.skipped.append(real)
                return
            new_ids, old_ids = self._commit_video(real, content_key, stamp, identity, features, row)
            self._apply_to_index(new_ids, old_ids, features.pooled)
            if self._save_due():
                self._save_index()
        (report.updated if row is not None else report.added).append(real)
        report.frames_added += len(new_ids)
        report.cache_hits += int(features.from_cache)
        if features.partial:
            report.warnings.append(
                (real, f"decoding stopped early: {len(new_ids)} frames indexed; the file may be damaged")
            )

    def _unchanged(self, row: dict[str, Any], stamp: tuple[int, int, int], identity: str) -> bool:
        return (row["size_bytes"], row["mtime_ns"], row["inode"]) == stamp and self._current(row, identity)

    def _current(self, row: dict[str, Any], identity: str) -> bool:
        return row["guide_identity"] == identity and row["requested_frames"] == self.frames_for(row["duration"])

    def _row_by_path(self, real: str) -> dict[str, Any] | None:
        cursor = self._connect().execute("SELECT * FROM videos WHERE path = ?", (real,))
        row = cursor.fetchone()
        return None if row is None else dict(zip([d[0] for d in cursor.description], row))

    def _try_move(
        self, real: str, content_key: str, stamp: tuple[int, int, int], identity: str, report: AddReport
    ) -> bool:
        """An indexed file whose old path is gone, found under ``real``: keep its ids, fix its path."""
        with self._write_lock():
            self._sync()
            for video_id, old_path, gid, requested, duration in self._connect().execute(
                "SELECT id, path, guide_identity, requested_frames, duration FROM videos WHERE content_key = ?",
                (content_key,),
            ).fetchall():
                if os.path.exists(old_path) or gid != identity or requested != self.frames_for(duration):
                    continue
                if self._row_by_path(real) is not None:
                    return False
                with self._transaction() as conn:
                    conn.execute(
                        "UPDATE videos SET path = ?, size_bytes = ?, mtime_ns = ?, inode = ? WHERE id = ?",
                        (real, *stamp, video_id),
                    )
                    generation = self._bump_generation(conn)
                self._journal({"op": "move", "gen": generation, "id": video_id, "path": real, "stamp": list(stamp)})
                self._generation += 1  # nothing in the index changed
                report.moved.append((old_path, real))
                return True
        return False

    def _features(self, real: str, content_key: str, identity: str) -> _Features:
        """The video's pooled guide embeddings: from the library, the cache, or a decode + encode."""
        known = self._known_features(content_key, identity)
        if known is not None:
            self.limits.check_info(known.info, shown=real)
            return known
        info, count = self._sample_count(real)
        name = feature_name(GUIDE_POOLED, identity, frames=count)
        if self.cache is not None:
            entry = self.cache.get(content_key, name)
            if entry is not None and {"pooled", "indices", "timestamps"} <= set(entry.names):
                meta = entry.meta
                self.limits.check_info(meta.get("info") or {}, shown=real)
                return _Features(
                    _normalise(entry.array("pooled")),
                    entry.array("indices").astype(np.int64),
                    entry.array("timestamps").astype(np.float64),
                    dict(meta.get("info") or jsonable(info or self._probe(real))),
                    bool(meta.get("partial", False)),
                    True,
                )
        frames = self._decoded(real, count)
        pooled_np = _normalise(_as_numpy(self.guide.encode_frames(frames.images).pooled))
        indices = np.asarray(frames.indices, dtype=np.int64)
        timestamps = np.asarray(frames.timestamps, dtype=np.float64)
        info_json = jsonable(frames.info)
        if self.cache is not None:
            self.cache.put(
                content_key, name,
                {"pooled": pooled_np, "indices": indices, "timestamps": timestamps},
                meta={"info": info_json, "partial": bool(frames.partial)},
                persistent=True,
            )
        return _Features(pooled_np, indices, timestamps, info_json, bool(frames.partial), False)

    def _prefetch(self, pool: ThreadPoolExecutor, real: str) -> None:
        """Start decoding ``real`` in the background when it will need a decode.

        Not for a file the library holds unchanged, nor for content whose embeddings the library
        or the feature cache already has (a renamed copy): those are never decoded. The content
        key is memoised by the cache, so computing it here costs ``add`` nothing extra.
        """
        if self.cache is None:
            return
        identity = self.guide.identity
        try:
            st = os.stat(real)
            row = self._row_by_path(real)
            if row is not None and self._unchanged(row, (st.st_size, st.st_mtime_ns, st.st_ino), identity):
                return
            self.limits.check_file(real)
            key = self.cache.video_key(real)
        except (OSError, FreeVideoError):
            return  # _add_one reports it
        if self._known_features(key, identity) is not None:
            return
        prefix = f"{GUIDE_POOLED}|{identity}|"
        if any(entry.name.startswith(prefix) for entry in self.cache.entries(key)):
            return
        self._decoding[real] = pool.submit(self._decode, real)

    def _probe(self, real: str) -> Any:
        from .video import probe

        return probe(real, limits=self.limits)

    def _sample_count(self, real: str) -> tuple[Any, int]:
        """``(VideoInfo or None, frames to sample)``: the count depends on the duration."""
        if not self.sampling["frames_per_second"]:
            return None, self.frames_for(0.0)
        info = self._probe(real)
        return info, self.frames_for(float(info.duration))

    def _decode(self, real: str) -> tuple[int, Frames]:
        from .video import read_frames

        self.limits.check_file(real)
        count = self._sample_count(real)[1]
        return count, read_frames(real, count, limits=self.limits)

    def _decoded(self, real: str, count: int) -> Frames:
        """The ``count`` sampled frames of ``real``: from the prefetch when it has them."""
        future = self._decoding.pop(real, None)
        if future is not None:
            try:
                done_count, frames = future.result()
            except Exception:  # noqa: BLE001 - decode again here, so the error is reported as this file's
                done_count, frames = -1, None
            if done_count == count and frames is not None:
                return frames
        from .video import read_frames

        return read_frames(real, count, limits=self.limits)

    def _known_features(self, content_key: str, identity: str) -> _Features | None:
        """Embeddings of the same content already in the library (a copy under another name)."""
        conn = self._connect()
        for video_id, requested, duration, info, partial in conn.execute(
            "SELECT id, requested_frames, duration, info, partial FROM videos "
            "WHERE content_key = ? AND guide_identity = ?",
            (content_key, identity),
        ).fetchall():
            if requested != self.frames_for(duration):
                continue
            rows = conn.execute(
                "SELECT frame_index, timestamp, embedding FROM frames WHERE video_id = ? ORDER BY position",
                (video_id,),
            ).fetchall()
            if not rows:
                continue
            pooled = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])
            return _Features(
                pooled,
                np.array([r[0] for r in rows], dtype=np.int64),
                np.array([r[1] for r in rows], dtype=np.float64),
                json.loads(info),
                bool(partial),
                True,
            )
        return None

    def _commit_video(
        self,
        real: str,
        content_key: str,
        stamp: tuple[int, int, int],
        identity: str,
        features: _Features,
        row: dict[str, Any] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One transaction: the video row and all its frames (old frames of the path replaced)."""
        pooled = np.ascontiguousarray(features.pooled, dtype=np.float32)
        dim = int(pooled.shape[1])
        info = features.info
        fps = _as_float(info.get("fps", 0.0))
        duration = float(info.get("duration", 0.0))
        values = (
            content_key, *stamp, identity, self.frames_for(duration), len(pooled),
            int(info.get("num_frames", 0)), fps, duration, int(info.get("width", 0)),
            int(info.get("height", 0)), json.dumps(info), int(features.partial), time.time(),
        )
        with self._transaction() as conn:
            self._check_identity(conn, identity, dim)
            old_ids = np.zeros(0, dtype=np.int64)
            if row is not None:
                video_id = int(row["id"])
                old_ids = np.array(
                    [r[0] for r in conn.execute("SELECT id FROM frames WHERE video_id = ?", (video_id,))],
                    dtype=np.int64,
                )
                conn.execute("DELETE FROM frames WHERE video_id = ?", (video_id,))
                conn.execute(
                    "UPDATE videos SET content_key = ?, size_bytes = ?, mtime_ns = ?, inode = ?, "
                    "guide_identity = ?, requested_frames = ?, indexed_frames = ?, num_frames = ?, fps = ?, "
                    "duration = ?, width = ?, height = ?, info = ?, partial = ?, added_at = ? WHERE id = ?",
                    (*values, video_id),
                )
            else:
                video_id = int(
                    conn.execute(
                        "INSERT INTO videos (path, content_key, size_bytes, mtime_ns, inode, guide_identity, "
                        "requested_frames, indexed_frames, num_frames, fps, duration, width, height, info, "
                        "partial, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (real, *values),
                    ).lastrowid
                )
            new_ids = self._insert_frames(conn, video_id, features, pooled)
            generation = self._bump_generation(conn)
        self._journal({
            "op": "put", "gen": generation,
            "video": {"id": video_id, "path": real, **dict(zip(_ROW_FIELDS, values))},
            "frames": {"ids": new_ids.tolist(), "indices": np.asarray(features.indices).tolist(),
                       "timestamps": np.asarray(features.timestamps, dtype=np.float64).tolist()},
        })
        return new_ids, old_ids

    def _insert_frames(
        self, conn: sqlite3.Connection, video_id: int, features: _Features, pooled: np.ndarray
    ) -> np.ndarray:
        ids = []
        for position in range(len(pooled)):
            cursor = conn.execute(
                "INSERT INTO frames (video_id, position, frame_index, timestamp, embedding) VALUES (?, ?, ?, ?, ?)",
                (video_id, position, int(features.indices[position]), float(features.timestamps[position]),
                 pooled[position].tobytes()),
            )
            ids.append(cursor.lastrowid)
        return np.asarray(ids, dtype=np.int64)

    def _check_identity(self, conn: sqlite3.Connection, identity: str, dim: int) -> None:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('guide_identity', 'dim')").fetchall())
        if "guide_identity" not in rows:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('guide_identity', ?)", (identity,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(dim),))
            return
        if rows["guide_identity"] != identity or int(rows["dim"]) != dim:
            raise LibraryError(
                f"library {self.path} holds embeddings of guide {rows['guide_identity']!r} "
                f"(dimension {rows['dim']}); this guide is {identity!r} (dimension {dim}). "
                "Open the library with the guide it was built with, or index into a new library folder"
            )

    def _bump_generation(self, conn: sqlite3.Connection) -> int:
        generation = self._db_generation(conn) + 1
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation),))
        return generation

    # -- removing --------------------------------------------------------------------------

    def remove(
        self, videos: int | str | os.PathLike[str] | VideoRecord | Iterable[int | str | os.PathLike[str] | VideoRecord]
    ) -> list[VideoRecord]:
        """Remove videos (by id, path or record) and their frames; returns the removed records.

        Raises LibraryError, removing nothing, when one of them is not in the library.
        """
        refs = [videos] if isinstance(videos, (int, str, os.PathLike, VideoRecord, np.integer)) else list(videos)
        with self._write_lock():
            self._sync()
            records = []
            for ref in refs:
                record = self.video(ref)
                if record is None:
                    raise LibraryError(f"no video {ref!r} in library {self.path}; see videos() for what it holds")
                records.append(record)
            ids = sorted({r.id for r in records})
            with self._transaction() as conn:
                frame_ids = np.array(
                    [r[0] for chunk in _chunks(ids) for r in conn.execute(
                        f"SELECT id FROM frames WHERE video_id IN ({_marks(chunk)})", chunk)],
                    dtype=np.int64,
                )
                for chunk in _chunks(ids):
                    conn.execute(f"DELETE FROM frames WHERE video_id IN ({_marks(chunk)})", chunk)
                    conn.execute(f"DELETE FROM videos WHERE id IN ({_marks(chunk)})", chunk)
                generation = self._bump_generation(conn)
            self._journal({"op": "remove", "gen": generation, "ids": ids})
            self._apply_to_index(np.zeros(0, dtype=np.int64), frame_ids, None)
            self._save_index()
        return list({r.id: r for r in records}.values())

    def prune(self) -> list[VideoRecord]:
        """Remove the videos whose files no longer exist; returns them."""
        gone = [r for r in self.videos() if not os.path.exists(r.path)]
        return self.remove(gone) if gone else []

    # -- searching -------------------------------------------------------------------------

    def search(
        self,
        text: str,
        k: int = 5,
        videos: Iterable[int | str | os.PathLike[str] | VideoRecord] | None = None,
        *,
        min_score: float | None = None,
    ) -> list[Moment]:
        """The ``k`` moments that best match ``text``, best first.

        ``videos`` restricts the search to some videos (ids, paths or records);
        ``min_score`` drops frames scoring below it (cosine similarity).
        """
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"search text must be a non-empty string, got {text!r}")
        _check_k(k)
        if self.num_frames == 0:
            return []
        self._check_guide()
        query = _as_numpy(self.guide.encode_text([text.strip()]))[0]
        return self.search_vector(query, k, videos, min_score=min_score)

    def search_vector(
        self,
        vector: Any,
        k: int = 5,
        videos: Iterable[int | str | os.PathLike[str] | VideoRecord] | None = None,
        *,
        min_score: float | None = None,
    ) -> list[Moment]:
        """:meth:`search` with a query embedding ``(D,)`` instead of a text (normalised here)."""
        _check_k(k)
        query = _as_numpy(vector).reshape(-1)
        with self._mutex:
            self._sync()
            if self._index is None or self._index.ntotal == 0:
                return []
            if query.shape[0] != self._index.dim:
                raise InputError(f"query vector has {query.shape[0]} dimensions; the library's have {self._index.dim}")
            norm = float(np.linalg.norm(query))
            if not math.isfinite(norm) or norm == 0.0:
                raise InputError("query vector is zero or not finite")
            query = query / norm
            allowed = None
            if videos is not None:
                allowed = self._frame_ids_of(videos)
                if len(allowed) == 0:
                    return []
            available = int(self._index.ntotal if allowed is None else len(allowed))
            fetch = min(available, 3 * k)
            while True:
                scores, ids = self._index.search(query[None, :], fetch, allowed_ids=allowed)
                keep = ids[0] >= 0
                if min_score is not None:
                    keep &= scores[0] >= min_score
                moments = self._moments(ids[0][keep], scores[0][keep])
                if len(moments) >= k or fetch >= available or (min_score is not None and not keep.all()):
                    return moments[:k]
                fetch = min(available, fetch * 2)

    def _check_guide(self) -> None:
        identity = self.guide_identity
        if identity is not None and identity != self.guide.identity:
            raise LibraryError(
                f"library {self.path} was built with guide {identity!r}, but this guide is "
                f"{self.guide.identity!r}: their embeddings do not match. Open the library with "
                "the guide it was built with, or use a new library folder for this guide"
            )

    def _frame_ids_of(self, videos: Iterable[Any]) -> np.ndarray:
        if isinstance(videos, (int, str, os.PathLike, VideoRecord)):
            videos = [videos]
        ids = []
        for ref in videos:
            record = self.video(ref)
            if record is None:
                raise LibraryError(f"no video {ref!r} in library {self.path}; see videos() for what it holds")
            ids.append(record.id)
        conn = self._connect()
        return np.array(
            [r[0] for chunk in _chunks(sorted(set(ids))) for r in conn.execute(
                f"SELECT id FROM frames WHERE video_id IN ({_marks(chunk)})", chunk)],
            dtype=np.int64,
        )

    def _moments(self, ids: np.ndarray, scores: np.ndarray) -> list[Moment]:
        """Merge frame hits into moments: per video, runs of hits adjacent in the sampled frames."""
        if len(ids) == 0:
            return []
        score_of = {int(i): float(s) for i, s in zip(ids, scores)}
        with self._snapshot() as conn:
            hits: dict[int, list[tuple[int, int, int, float]]] = {}
            for chunk in _chunks([int(i) for i in ids]):
                for frame_id, video_id, position, frame_index, timestamp in conn.execute(
                    f"SELECT id, video_id, position, frame_index, timestamp FROM frames WHERE id IN ({_marks(chunk)})",
                    chunk,
                ):
                    hits.setdefault(video_id, []).append((position, frame_id, frame_index, timestamp))
            videos = {}
            timelines = {}
            for video_id in hits:
                videos[video_id] = conn.execute(
                    "SELECT path, duration FROM videos WHERE id = ?", (video_id,)
                ).fetchone()
                timelines[video_id] = np.array(
                    [r[0] for r in conn.execute(
                        "SELECT timestamp FROM frames WHERE video_id = ? ORDER BY position", (video_id,))],
                    dtype=np.float64,
                )
        moments = []
        for video_id, frames in hits.items():
            if videos[video_id] is None:
                continue  # removed meanwhile
            path, duration = videos[video_id]
            times = timelines[video_id]
            frames.sort()
            run: list[tuple[int, int, int, float]] = []
            for frame in frames:
                if run and not (frame[0] - run[-1][0] <= 1 or frame[3] - run[-1][3] <= self.merge_gap):
                    moments.append(_moment(video_id, path, duration, times, run, score_of))
                    run = []
                run.append(frame)
            moments.append(_moment(video_id, path, duration, times, run, score_of))
        moments.sort(key=lambda m: (-m.score, m.video_id, m.start))
        return moments

    # -- the index: load, reconcile, save --------------------------------------------------

    def _open_index(self) -> None:
        with self._mutex:
            if self._custom_index:
                self._generation = -1
                self._reconcile(report_as="opened with an external index")
                return
            manifest_path = self.path / _MANIFEST
            dim = self.dim
            reason = None
            if dim is None:
                self._index, self._generation = None, -1
                if self.num_frames:
                    reason = "the database has frames but no recorded dimension"
            elif not manifest_path.exists():
                reason = "no index file" if self.num_frames else None
                self._index, self._generation = make_frame_index(self.index_kind, dim, **self.index_options), -1
            else:
                try:
                    self._index, self._generation = self._load_index(manifest_path, dim)
                except LibraryError as exc:
                    reason = str(exc)
                    self._index, self._generation = None, -1
            if reason is not None:
                self._rebuild(reason, report=True)
            elif self._index is not None and self._generation != self._db_generation():
                self._reconcile(report_as="the index file is behind the database")
            if self.repairs and self._file_lock_free():
                try:
                    self._sync()
                    self._save_index()
                finally:
                    self._file_lock.release()

    def _file_lock_free(self) -> bool:
        import filelock

        try:
            self._file_lock.acquire(timeout=0)
            return True
        except filelock.Timeout:
            return False

    def _load_index(self, manifest_path: Path, dim: int) -> tuple[FrameIndex, int]:
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
            file = self.path / manifest["file"]
            if os.path.basename(manifest["file"]) != manifest["file"]:
                raise LibraryError(f"manifest names a file outside the library: {manifest['file']!r}")
            expected = {
                "kind": self.index_kind, "dim": dim, "identity": self.guide_identity,
                "options": self.index_options,
            }
            for key, value in expected.items():
                if manifest.get(key) != value:
                    raise LibraryError(f"index {key} is {manifest.get(key)!r}, the library's is {value!r}")
            if not file.exists():
                raise LibraryError(f"index file {file.name} is missing")
            if hash_file(file) != manifest["checksum"]:
                raise LibraryError(f"index file {file.name} does not match its checksum (damaged or truncated)")
            index = FaissFrameIndex.load(file, self.index_kind, dim, **self.index_options)
            if index.ntotal != manifest["count"]:
                raise LibraryError(f"index holds {index.ntotal} vectors, its manifest says {manifest['count']}")
            self._check_sample(index, file.name)
            return index, int(manifest["generation"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LibraryError(f"index manifest unreadable: {exc}") from exc

    def _check_sample(self, index: FaissFrameIndex, name: str, count: int = 16) -> None:
        """A few of the index's vectors against the database's: a file of another library (valid,
        with a valid manifest, but other frames behind the same ids) is never served."""
        ids = index.ids()
        if not len(ids):
            return
        sample = [int(i) for i in np.random.default_rng().choice(ids, size=min(count, len(ids)), replace=False)]
        rows = self._connect().execute(f"SELECT id, embedding FROM frames WHERE id IN ({_marks(sample)})", sample)
        for frame_id, blob in rows.fetchall():
            stored = index.vectors([frame_id])
            if stored is None or not np.allclose(stored[0], np.frombuffer(blob, dtype=np.float32), atol=1e-5):
                raise LibraryError(f"index file {name} holds another vector for frame {frame_id} than the database "
                                   "(a file of another library?)")

    def _sync(self) -> None:
        """Bring the in-memory index up to the database's state (another process may have written)."""
        if self._generation != self._db_generation():
            self._reconcile()

    def _reconcile(self, report_as: str | None = None) -> None:
        """Make the index hold exactly the database's frames: add the missing, drop the extra."""
        dim = self.dim
        if dim is None:
            self._generation = self._db_generation()
            return
        if self._index is None:
            self._rebuild(report_as or "no index in memory", report=report_as is not None)
            return
        with self._snapshot() as conn:
            generation = self._db_generation(conn)
            db_ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM frames")), dtype=np.int64)
            index_ids = self._index.ids()
            missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
            extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
            if len(extra) and not self._index.supports_remove:
                vectors = None
            else:
                vectors = self._embeddings(conn, missing, dim)
        if vectors is None:
            self._rebuild(report_as or "vectors to remove from an index that cannot remove", report=report_as is not None)
            return
        if len(extra):
            self._index.remove(extra)
        self._index.add(missing, vectors)
        self._generation = generation
        if len(missing) or len(extra):
            self._dirty = True
            if report_as is not None:
                self._note(IndexRepair(
                    f"{report_as}: {len(missing)} vectors missing, {len(extra)} stale", "caught up",
                    self._index.ntotal,
                ))

    def _rebuild(self, reason: str, *, report: bool) -> None:
        dim = self.dim
        if dim is None:
            self._index, self._generation = None, self._db_generation()
            return
        index: FrameIndex = (
            make_frame_index(self.index_kind, dim, **self.index_options)
            if not self._custom_index
            else self._index  # type: ignore[assignment]
        )
        if self._custom_index and index.ntotal:
            index.remove(index.ids())
        with self._snapshot() as conn:
            generation = self._db_generation(conn)
            batch_ids, batch = [], []
            for frame_id, blob in conn.execute("SELECT id, embedding FROM frames ORDER BY id"):
                batch_ids.append(frame_id)
                batch.append(np.frombuffer(blob, dtype=np.float32))
                if len(batch) == 65536:
                    index.add(np.asarray(batch_ids, dtype=np.int64), np.stack(batch))
                    batch_ids, batch = [], []
            if batch:
                index.add(np.asarray(batch_ids, dtype=np.int64), np.stack(batch))
        self._index, self._generation, self._dirty = index, generation, True
        if report:
            self._note(IndexRepair(reason, "rebuilt", index.ntotal))

    def _note(self, repair: IndexRepair) -> None:
        self.repairs.append(repair)
        what = "" if repair.action.startswith("database") else "frame index "
        logger.warning("library %s: %s%s (%s); %d vectors", self.path, what, repair.action, repair.reason, repair.vectors)

    @staticmethod
    def _embeddings(conn: sqlite3.Connection, ids: np.ndarray, dim: int) -> np.ndarray:
        vectors = np.zeros((len(ids), dim), dtype=np.float32)
        where = {int(i): n for n, i in enumerate(ids)}
        for chunk in _chunks([int(i) for i in ids]):
            for frame_id, blob in conn.execute(
                f"SELECT id, embedding FROM frames WHERE id IN ({_marks(chunk)})", chunk
            ):
                vectors[where[frame_id]] = np.frombuffer(blob, dtype=np.float32)
        return vectors

    def _apply_to_index(self, new_ids: np.ndarray, old_ids: np.ndarray, vectors: np.ndarray | None) -> None:
        """After a commit: the same change in the in-memory index."""
        if self._index is None and vectors is not None:
            self._index = make_frame_index(self.index_kind, int(vectors.shape[1]), **self.index_options)
        if self._index is None:
            self._generation = self._db_generation()
            return
        if len(old_ids) and not self._index.supports_remove:
            self._rebuild("re-indexed or removed videos in an index that cannot remove", report=False)
            return
        if len(old_ids):
            self._index.remove(old_ids)
        if vectors is not None:
            self._index.add(new_ids, vectors)
        self._generation = self._db_generation()
        self._dirty = True

    def _save_due(self) -> bool:
        if self._index is None:
            return False
        small = self._index.ntotal * self._index.dim * 4 <= _SAVE_EACH_BELOW_BYTES
        return small or time.monotonic() - self._last_save >= _SAVE_EVERY_S

    def _save_index(self) -> None:
        """Write the index and its manifest atomically (call with the write lock held)."""
        if self._custom_index or self._index is None or not isinstance(self._index, FaissFrameIndex):
            self._dirty = False
            return
        generation = self._generation
        name = f"index-{generation}-{uuid.uuid4().hex[:8]}.faiss"
        final = self.path / name
        tmp = self.path / f".tmp-{name}"
        try:
            self._index.save(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            ids = self._index.ids()
            manifest = {
                "format": 1,
                "file": name,
                "kind": self.index_kind,
                "options": self.index_options,
                "dim": self._index.dim,
                "count": self._index.ntotal,
                "max_id": int(ids.max()) if len(ids) else 0,
                "identity": self.guide_identity,
                "generation": generation,
                "checksum": hash_file(final),
                "checksum_algorithm": "blake2b-160",
                "saved_at": time.time(),
            }
            _atomic_write_text(self.path / _MANIFEST, json.dumps(manifest, indent=2))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LibraryError(f"cannot save the frame index of library {self.path}: {exc}") from exc
        for old in self.path.glob("index-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
        for old in self.path.glob(".tmp-*"):
            if old != tmp:
                old.unlink(missing_ok=True)
        self._dirty = False
        self._last_save = time.monotonic()

    # -- the journal: redundancy for the database -------------------------------------------

    def _journal(self, record: dict[str, Any]) -> None:
        """Append one committed change to the journal (with the write lock held, after the commit)."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            with open(self.path / _JOURNAL, "ab+") as handle:
                if handle.seek(0, os.SEEK_END) > 0:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        line = b"\n" + line  # end the line a killed writer tore
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # the database has the change; the next open rewrites the journal
            logger.warning("library %s: cannot append to its journal (%s)", self.path, exc)

    def _check_journal(self) -> None:
        """Rebuild a database that lost commits its journal holds; rewrite a journal that is behind."""
        journal = self.path / _JOURNAL
        if _journal_generation(journal) == self._db_generation():
            return
        with self._write_lock():
            logged, current = _journal_generation(journal), self._db_generation()
            if logged is not None and logged > current:
                self._recover_database(
                    f"the database is behind its journal (generation {current}, the journal's {logged})"
                )
            elif logged != current:
                try:
                    self._rewrite_journal()
                except OSError as exc:  # redundancy only: the database is sound, so opening goes on
                    logger.warning("library %s: cannot rewrite its journal (%s)", self.path, exc)

    def _rewrite_journal(self) -> None:
        """Write the journal afresh from the database (with the write lock held)."""
        with self._snapshot() as conn:
            generation = self._db_generation(conn)
            meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta") if k != "generation"}
            sequence = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
            lines = [{"op": "meta", "gen": generation, "values": meta, "seq": sequence}]
            rows = conn.execute(f"SELECT id, path, {', '.join(_ROW_FIELDS)} FROM videos ORDER BY id").fetchall()
            for row in rows:
                frames = conn.execute(
                    "SELECT id, frame_index, timestamp FROM frames WHERE video_id = ? ORDER BY position", (row[0],)
                ).fetchall()
                lines.append({
                    "op": "put", "gen": generation, "video": dict(zip(("id", "path", *_ROW_FIELDS), row)),
                    "frames": {"ids": [f[0] for f in frames], "indices": [f[1] for f in frames],
                               "timestamps": [f[2] for f in frames]},
                })
        _atomic_write_text(self.path / _JOURNAL, "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))

    def _drop_connection(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None

    def _healthy(self) -> bool:
        """Whether the database opens and answers the queries opening asks (False: damaged)."""
        self._drop_connection()
        try:
            conn = self._connect()
            conn.execute("SELECT key, value FROM meta").fetchall()
            conn.execute("SELECT COUNT(*) FROM videos").fetchone()
            conn.execute("SELECT COUNT(*) FROM frames").fetchone()
            return True
        except (sqlite3.DatabaseError, LibraryError) as exc:
            if _damage(exc) is None:
                raise
            self._drop_connection()
            return False

    def _recover_database(self, reason: str) -> None:
        """Move the database aside and rebuild it from the journal (or, without one, from what the
        old file still gives); embeddings from the old file, the frame index file or the cache.
        With the write lock held."""
        self._drop_connection()
        db = self.path / _DB_NAME
        aside = db.with_name(f"{_DB_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{db}{suffix}"):
                os.replace(f"{db}{suffix}", f"{aside}{suffix}")
        old = _Salvage(aside)
        try:
            journal = _read_journal(self.path / _JOURNAL)
            meta = {k: v for k, v in {**old.meta, **journal.meta}.items() if not k.startswith("seq:")}
            records = journal.videos if journal.generation is not None else old.videos()
            with self._transaction() as conn:
                for key, value in meta.items():
                    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
            identities = {str(r["video"].get("guide_identity")) for r in records.values()}
            identity = meta.get("guide_identity") or (identities.pop() if len(identities) == 1 else None)
            index = _intact_index(self.path, identity, meta.get("dim"))
            kept, frames, dim, dropped = 0, 0, None, []
            restored_all = {video_id: self._restore_frames(records[video_id], old, index) for video_id in records}
            with self._transaction() as conn:
                for table in ("videos", "frames"):  # ids are never reused, not even lost ones
                    floor = max(journal.max_ids[table], int(old.meta.get(f"seq:{table}", 0)),
                                _manifest_max_id(self.path) if table == "frames" else 0)
                    conn.execute("INSERT OR IGNORE INTO sqlite_sequence (name, seq) VALUES (?, 0)", (table,))
                    conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (floor, table))
                # frames that keep their ids first; those given new ids (from the cache) after them
                order = sorted(records, key=lambda v: (restored_all[v] is not None and None in restored_all[v][0], v))
                for video_id in order:
                    video, restored = records[video_id]["video"], restored_all[video_id]
                    columns = [c for c in ("id", "path", *_ROW_FIELDS) if c in video]
                    if restored is None or len(columns) != 2 + len(_ROW_FIELDS):
                        dropped.append(str(video.get("path")))
                        continue
                    ids, indices, timestamps, vectors = restored
                    conn.execute("SAVEPOINT video")
                    try:
                        conn.execute(
                            f"INSERT INTO videos ({', '.join(columns)}) VALUES ({_marks(columns)})",
                            [video[c] for c in columns],
                        )
                        conn.execute("UPDATE videos SET indexed_frames = ? WHERE id = ?", (len(vectors), video["id"]))
                        conn.executemany(
                            "INSERT INTO frames (id, video_id, position, frame_index, timestamp, embedding) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            [(ids[n], video["id"], n, int(indices[n]), float(timestamps[n]), vectors[n].tobytes())
                             for n in range(len(vectors))],
                        )
                    except sqlite3.Error:  # a garbled record (a path or an id twice): not restored
                        conn.execute("ROLLBACK TO video")
                        dropped.append(str(video.get("path")))
                        continue
                    finally:
                        conn.execute("RELEASE video")
                    kept, frames, dim = kept + 1, frames + len(vectors), int(vectors.shape[1])
                if kept and identity:  # what the first commit records, in case the old meta did not read
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('guide_identity', ?)", (identity,))
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(dim),))
                generation = max(journal.generation or 0, old.generation) + 1
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation),))
        finally:
            old.close()
        self._rewrite_journal()
        self._note(IndexRepair(
            f"{reason}: moved it to {aside.name} and rebuilt it; {kept} of {len(records)} videos restored"
            + (f", dropped {len(dropped)}: {', '.join(map(os.path.basename, dropped))}" if dropped else ""),
            "database rebuilt", frames, tuple(dropped),
        ))

    def _restore_frames(
        self, record: dict[str, Any], old: _Salvage, index: FaissFrameIndex | None
    ) -> tuple[list[int | None], list[int], list[float], np.ndarray] | None:
        """A video's frame ids, indices, times and embeddings from the first source that has them all."""
        video, frames = record["video"], record.get("frames") or {}
        ids, indices, timestamps = frames.get("ids"), frames.get("indices"), frames.get("timestamps")
        # The index file matched its checksummed manifest: trust it before a damaged database,
        # whose pages may read back garbled; salvaged embeddings must at least be unit vectors.
        vectors = index.vectors(ids) if ids and index is not None else None
        if vectors is None and ids:
            vectors = old.embeddings(ids)
            if vectors is not None and not _unit_rows(vectors):
                vectors = None
        if vectors is None and self.cache is not None:
            try:
                name = feature_name(GUIDE_POOLED, str(video["guide_identity"]), frames=int(video["requested_frames"]))
                entry = self.cache.get(str(video["content_key"]), name)
                if entry is not None and {"pooled", "indices", "timestamps"} <= set(entry.names):
                    cached = entry.array("indices").astype(np.int64).tolist()
                    if indices is None or cached == list(indices):
                        vectors = _normalise(entry.array("pooled"))
                        if indices is None:
                            indices, timestamps = cached, entry.array("timestamps").tolist()
                            ids = [None] * len(cached)  # new ids
            except (FreeVideoError, KeyError, TypeError, ValueError, OSError):
                vectors = None
        if vectors is None or indices is None or timestamps is None or not len(vectors) == len(indices) == len(ids):
            return None
        return list(ids), list(indices), list(timestamps), vectors

    def check(self) -> dict[str, Any]:
        """The index against the database: counts and whether they agree (for tests and ``inspect``)."""
        with self._mutex:
            self._sync()
            db_ids = np.fromiter((r[0] for r in self._connect().execute("SELECT id FROM frames")), dtype=np.int64)
            index_ids = self._index.ids() if self._index is not None else np.zeros(0, dtype=np.int64)
            return {
                "videos": len(self),
                "frames": int(len(db_ids)),
                "vectors": int(len(index_ids)),
                "consistent": bool(np.array_equal(np.sort(db_ids), np.sort(index_ids))),
                "index": self.index_kind,
                "guide_identity": self.guide_identity,
            }


# -- helpers ---------------------------------------------------------------------------------

_VIDEO_COLUMNS = (
    "id, path, content_key, duration, num_frames, fps, width, height, indexed_frames, guide_identity, "
    "partial, added_at"
)


def _record(row: Sequence[Any]) -> VideoRecord:
    (vid, path, key, duration, frames, fps, width, height, indexed, identity, partial, added) = row
    return VideoRecord(
        int(vid), path, key, float(duration), int(frames), float(fps), int(width), int(height),
        int(indexed), identity, bool(partial), float(added),
    )


def _moment(
    video_id: int,
    path: str,
    duration: float,
    times: np.ndarray,
    run: list[tuple[int, int, int, float]],
    score_of: dict[int, float],
) -> Moment:
    first, last = run[0][0], run[-1][0]
    start = 0.0 if first == 0 else float((times[first - 1] + times[first]) / 2)
    if last + 1 < len(times):
        end = float((times[last] + times[last + 1]) / 2)
    else:
        end = max(float(duration), float(times[last]))
    frame_scores = tuple(score_of[f[1]] for f in run)
    return Moment(
        video_id=int(video_id),
        path=path,
        start=start,
        end=end,
        score=max(frame_scores),
        frame_indices=tuple(int(f[2]) for f in run),
        timestamps=tuple(float(f[3]) for f in run),
        frame_scores=frame_scores,
        frame_ids=tuple(int(f[1]) for f in run),
    )


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise LibraryError(f"guide embeddings must be (T, D) with T >= 1, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _as_float(value: Any) -> float:
    if isinstance(value, str) and "/" in value:
        numerator, denominator = value.split("/", 1)
        return float(numerator) / float(denominator)
    return float(value)


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")


def _chunks(values: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(values), _SQL_CHUNK):
        yield values[start : start + _SQL_CHUNK]


def _marks(chunk: Sequence[Any]) -> str:
    return ",".join("?" * len(chunk))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


#: The columns of ``videos`` besides ``id`` and ``path``, in the order ``_commit_video`` writes them.
_ROW_FIELDS = (
    "content_key", "size_bytes", "mtime_ns", "inode", "guide_identity", "requested_frames", "indexed_frames",
    "num_frames", "fps", "duration", "width", "height", "info", "partial", "added_at",
)


def _truncation(db: Path) -> str | None:
    """Why the SQLite file at ``db`` is visibly truncated (None: it is not, or is not SQLite's).

    A sound file is a whole number of pages, at least as many as its header counts; SQLite itself
    rounds a cut-off last page up and reads the missing bytes as zeros.
    """
    try:
        size = db.stat().st_size
        with open(db, "rb") as handle:
            header = handle.read(100)
    except OSError:
        return None
    if size == 0 or len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None  # new, or not a database at all (SQLite says so)
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or size % page:
        return f"its {size:,} bytes are not a whole number of {page}-byte pages (truncated)"
    counted = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and size < counted * page:
        return f"it holds {size // page:,} of the {counted:,} pages its header counts (truncated)"
    return None


def _damage(exc: BaseException | None) -> str | None:
    """SQLite's words when ``exc`` (or what caused it) says the database file is damaged, else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _DamagedFile):
            return str(exc).split(" is damaged: ", 1)[-1]
        if isinstance(exc, sqlite3.DatabaseError):
            text = str(exc)
            if getattr(exc, "sqlite_errorcode", None) in (11, 26) or "malformed" in text or "not a database" in text:
                return text
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@dataclass
class _JournalState:
    generation: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    videos: dict[int, dict[str, Any]] = field(default_factory=dict)
    max_ids: dict[str, int] = field(default_factory=lambda: {"videos": 0, "frames": 0})
    bad_lines: int = 0


def _read_journal(path: Path) -> _JournalState:
    """Replay the journal: the videos it says the library holds (a torn or garbled line is skipped)."""
    state = _JournalState()
    by_path: dict[str, int] = {}
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return state
    with handle:
        for raw in handle:
            try:
                record = json.loads(raw)
                op, generation = record["op"], int(record["gen"])
                if op == "meta":
                    state.meta.update({str(k): str(v) for k, v in record["values"].items()})
                    for table, value in (record.get("seq") or {}).items():
                        if table in state.max_ids:
                            state.max_ids[table] = max(state.max_ids[table], int(value))
                elif op == "put":
                    video = record["video"]
                    video_id, path_text = int(video["id"]), str(video["path"])
                    if by_path.get(path_text, video_id) != video_id:
                        state.videos.pop(by_path[path_text], None)  # superseded at that path
                    state.videos[video_id], by_path[path_text] = record, video_id
                    state.max_ids["videos"] = max(state.max_ids["videos"], video_id)
                    state.max_ids["frames"] = max([state.max_ids["frames"], *map(int, record["frames"]["ids"])])
                elif op == "move":
                    entry = state.videos.get(int(record["id"]))
                    if entry is not None:
                        by_path.pop(entry["video"]["path"], None)
                        entry["video"]["path"] = str(record["path"])
                        entry["video"].update(zip(("size_bytes", "mtime_ns", "inode"), record["stamp"]))
                        by_path[str(record["path"])] = int(record["id"])
                elif op == "remove":
                    for video_id in map(int, record["ids"]):
                        entry = state.videos.pop(video_id, None)
                        if entry is not None:
                            by_path.pop(entry["video"]["path"], None)
                else:
                    raise ValueError(op)
            except (ValueError, KeyError, TypeError, AttributeError):
                state.bad_lines += 1
                continue
            state.generation = generation if state.generation is None else max(state.generation, generation)
    return state


def _journal_generation(path: Path) -> int | None:
    """The generation of the journal's last complete line (None: no journal); reads only its tail."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 65536))
            tail = handle.read()
    except FileNotFoundError:
        return None
    if not tail.endswith(b"\n"):
        return None  # a torn last line: the write it was part of may be missing; rewrite the journal
    for raw in reversed(tail.splitlines()):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(raw)["gen"])
    return _read_journal(path).generation if size > 65536 else None


def _manifest_max_id(folder: Path) -> int:
    """The largest frame id the last saved index held (0 when the manifest does not read)."""
    try:
        return int(json.loads((folder / _MANIFEST).read_text("utf-8"))["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _intact_index(folder: Path, identity: str | None, dim: Any) -> FaissFrameIndex | None:
    """The saved FAISS index when it matches its manifest and the library's guide, else None."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text("utf-8"))
        file = folder / os.path.basename(str(manifest["file"]))
        if manifest["identity"] != identity or (dim is not None and str(manifest["dim"]) != str(dim)):
            return None
        if hash_file(file) != manifest["checksum"]:
            return None
        return FaissFrameIndex.load(file, manifest["kind"], int(manifest["dim"]), **(manifest.get("options") or {}))
    except (OSError, ValueError, KeyError, TypeError, FreeVideoError):
        return None


def _unit_rows(vectors: np.ndarray) -> bool:
    """Every row finite with an L2 norm of 1 (what the library stores)."""
    norms = np.linalg.norm(vectors, axis=1)
    return bool(np.all(np.isfinite(vectors)) and np.allclose(norms, 1.0, atol=1e-3))


class _Salvage:
    """Reads what still reads from a damaged database file; every read fails soft."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection | None = None
        self.meta: dict[str, str] = {}
        self.generation = 0
        if not path.exists():
            return
        try:
            self.conn = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA writable_schema = ON")  # read past a header that counts lost pages
            self.conn.execute("PRAGMA query_only = ON")
        except sqlite3.Error:
            self.close()
            return
        self.meta = {str(k): str(v) for k, v in self._rows("SELECT key, value FROM meta")}
        with contextlib.suppress(ValueError):
            self.generation = int(self.meta.pop("generation", 0))
        for name, seq in self._rows("SELECT name, seq FROM sqlite_sequence"):
            self.meta[f"seq:{name}"] = str(seq)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows ``sql`` gives before SQLite hits a damaged page."""
        rows: list[tuple[Any, ...]] = []
        if self.conn is None:
            return rows
        try:
            for row in self.conn.execute(sql, params):
                rows.append(tuple(row))
        except sqlite3.Error:
            pass
        return rows

    def embeddings(self, ids: Sequence[int]) -> np.ndarray | None:
        """The stored embeddings of frames ``ids``, or None when one of them does not read."""
        found: dict[int, bytes] = {}
        for chunk in _chunks([int(i) for i in ids]):
            rows = self._rows(f"SELECT id, embedding FROM frames WHERE id IN ({_marks(chunk)})", chunk)
            if len(rows) < len(chunk):  # some page is gone: try the rest one by one
                rows = [r for i in chunk for r in self._rows("SELECT id, embedding FROM frames WHERE id = ?", (i,))]
            found.update((int(r[0]), r[1]) for r in rows if isinstance(r[1], bytes))
        if len(found) < len(ids) or len({len(found[int(i)]) for i in ids}) > 1:
            return None
        return np.stack([np.frombuffer(found[int(i)], dtype=np.float32) for i in ids]) if ids else None

    def videos(self) -> dict[int, dict[str, Any]]:
        """Without a journal: the video rows that still read, with their frames where those read whole."""
        columns = ("id", "path", *_ROW_FIELDS)
        select = f"SELECT {', '.join(columns)} FROM videos ORDER BY id"
        rows = {r[0]: r for r in self._rows(select) + self._rows(select + " DESC")}
        out: dict[int, dict[str, Any]] = {}
        for video_id, row in rows.items():
            video = dict(zip(columns, row))
            frames = self._rows(
                "SELECT id, frame_index, timestamp FROM frames WHERE video_id = ? ORDER BY position", (video_id,)
            )
            if len(frames) != video["indexed_frames"]:  # the index is damaged: scan the table itself
                rows = self._rows("SELECT position, id, frame_index, timestamp FROM frames NOT INDEXED WHERE video_id = ?",
                                  (video_id,))
                frames = [r[1:] for r in sorted(rows)]
            whole = len(frames) == video["indexed_frames"]
            out[int(video_id)] = {"video": video, "frames": {
                "ids": [f[0] for f in frames] if whole else None,
                "indices": [f[1] for f in frames] if whole else None,
                "timestamps": [f[2] for f in frames] if whole else None,
            }}
        return out

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None


def default_library_dir() -> Path:
    """``FREEVLLM_LIBRARY`` when set, else ``library`` in the platform's user data directory."""
    env = os.environ.get("FREEVLLM_LIBRARY")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("freevllm")) / "library"
