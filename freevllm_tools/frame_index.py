"""The frame index: vectors by id, searched by inner product, behind one small interface.

FAISS is the embedded default (:class:`FaissFrameIndex`); anything with the methods of
:class:`FrameIndex` (a vector-database client, say) can take its place in a ``VideoLibrary``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import InputError, LibraryError

__all__ = ["FrameIndex", "FaissFrameIndex", "make_frame_index", "INDEX_KINDS"]

#: Kinds of FAISS index the library builds by name.
INDEX_KINDS = ("flat", "hnsw")


@runtime_checkable
class FrameIndex(Protocol):
    """Vectors by integer id, searched by inner product: what the library needs of an index.

    :class:`FaissFrameIndex` is the embedded default; a vector database client with these
    methods can take its place (``VideoLibrary(..., index=my_index)``). Vectors are
    L2-normalised float32 ``(N, dim)``; ids are int64 and never reused by the library.
    """

    kind: str
    dim: int
    supports_remove: bool

    @property
    def ntotal(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(
        self, vectors: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k), ids (Q, k))``, best first; missing results have id -1."""
        ...

    def ids(self) -> np.ndarray: ...


class FaissFrameIndex:
    """A FAISS ``IndexIDMap2`` over an exact inner-product index (``"flat"``) or HNSW (``"hnsw"``).

    HNSW cannot remove vectors: ``supports_remove`` is False and the library rebuilds it
    from SQLite instead. ``options``: ``m`` (HNSW links per node, 32), ``ef_construction``
    (200), ``ef_search`` (128, raised to ``k`` when smaller).
    """

    def __init__(self, kind: str, dim: int, *, index: Any = None, **options: Any) -> None:
        import faiss

        if kind not in INDEX_KINDS:
            raise InputError(f"index must be one of {INDEX_KINDS} (or a FrameIndex object), got {kind!r}")
        if dim < 1:
            raise InputError(f"index dimension must be positive, got {dim}")
        unknown = set(options) - {"m", "ef_construction", "ef_search"}
        if unknown:
            raise InputError(f"unknown index options {sorted(unknown)}; expected m, ef_construction, ef_search")
        self.kind, self.dim = kind, dim
        self.options = {"m": 32, "ef_construction": 200, "ef_search": 128, **options} if kind == "hnsw" else {}
        self.supports_remove = kind == "flat"
        if index is None:
            if kind == "flat":
                inner = faiss.IndexFlatIP(dim)
            else:
                inner = faiss.IndexHNSWFlat(dim, int(self.options["m"]), faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efConstruction = int(self.options["ef_construction"])
            index = faiss.IndexIDMap2(inner)
        self._index = index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids):
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if not self.supports_remove:
            raise NotImplementedError(f"a {self.kind} index cannot remove vectors; rebuild it")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids):
            self._index.remove_ids(ids)

    def search(
        self, vectors: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        params = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(self.options["ef_search"]), k)
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            params = params or faiss.SearchParameters()
            params.sel = selector
        if params is None:
            return self._index.search(vectors, k)
        return self._index.search(vectors, k, params=params)

    def ids(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def vectors(self, ids: Sequence[int]) -> np.ndarray | None:
        """The stored vectors of ``ids`` ``(N, dim)``, or None when one of them is missing."""
        try:
            rows = [self._index.reconstruct(int(i)) for i in ids]
        except RuntimeError:  # an id the index does not hold
            return None
        return np.asarray(rows, dtype=np.float32).reshape(-1, self.dim)

    def save(self, path: Path) -> None:
        """Write the index to ``path`` (the caller renames it into place)."""
        import faiss

        faiss.write_index(self._index, os.fspath(path))

    @classmethod
    def load(cls, path: Path, kind: str, dim: int, **options: Any) -> FaissFrameIndex:
        """Read an index written by :meth:`save`; LibraryError when it is not one of ours."""
        import faiss

        try:
            index = faiss.read_index(os.fspath(path))
        except Exception as exc:  # faiss raises RuntimeError for any damage
            raise LibraryError(f"cannot read frame index {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            raise LibraryError(f"frame index {path} is not an id-mapped index of dimension {dim}")
        inner = faiss.downcast_index(index.index)  # read_index already gives the outer type
        expected = faiss.IndexFlatIP if kind == "flat" else faiss.IndexHNSWFlat
        if not isinstance(inner, expected):
            raise LibraryError(f"frame index {path} holds a {type(inner).__name__}, expected a {kind} index")
        return cls(kind, dim, index=index, **options)


def make_frame_index(kind: str, dim: int, **options: Any) -> FaissFrameIndex:
    """A new, empty FAISS frame index: ``"flat"`` (exact) or ``"hnsw"`` (approximate)."""
    return FaissFrameIndex(kind, dim, **options)
