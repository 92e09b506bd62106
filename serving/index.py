"""Nearest-neighbour search over memory embeddings: exact while small, HNSW once it grows.

Brute force (one matrix-vector product) is exact and fastest for a few thousand entries;
past `ann_threshold` the index switches to hnswlib (inner product on unit vectors =
cosine), whose query time grows roughly with log(n). Vectors must be L2-normalised.
The HNSW graph can be saved next to the memory file so a restart does not rebuild it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


#: on HNSW, a filter passing at most this many ids is searched exactly over their vectors instead: a
#: filtered graph search walks the graph until it has met k allowed entries, nearly all of it for a user
#: with a handful of entries among many (30k entries, dim 384, k 24, 2 cores: 24 ms for 5 allowed ids
#: against 0.06 ms exactly, level at ~500 ids, where reading the vectors back costs as much)
EXACT_FILTERED = 256


class VectorIndex:
    """ids (int64) -> unit vectors; `search(v, k)` returns [(id, cosine similarity)], best first.

    `num_threads` is for building (-1: all cores); a query always uses one thread.
    """

    def __init__(
        self,
        dim: int,
        ann_threshold: int = 5000,
        m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        num_threads: int = -1,
    ):
        self.dim = dim
        self.ann_threshold = ann_threshold
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        self.num_threads = num_threads
        self._lock = threading.Lock()
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._hnsw = None
        self._torch_view: torch.Tensor | None = None
        self.max_id = 0

    # ------------------------------------------------------------------ state

    @property
    def backend(self) -> str:
        return "hnsw" if self._hnsw is not None else "exact"

    def __len__(self) -> int:
        return self._hnsw.get_current_count() if self._hnsw is not None else self._n

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        if len(ids) == 0:
            return
        with self._lock:
            if self._hnsw is None and self._n + len(ids) > self.ann_threshold:
                self._build_hnsw(self._n + len(ids))
            if self._hnsw is not None:
                needed = self._hnsw.get_current_count() + len(ids)
                if needed > self._hnsw.get_max_elements():
                    self._hnsw.resize_index(max(needed, 2 * self._hnsw.get_max_elements()))
                self._hnsw.add_items(vectors, ids, num_threads=self.num_threads)
            else:
                self._append_exact(ids, vectors)
            self.max_id = max(self.max_id, int(ids.max()))

    def _append_exact(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        need = self._n + len(ids)
        if need > len(self._matrix):
            cap = max(need, 2 * len(self._matrix), 64)
            matrix = np.zeros((cap, self.dim), dtype=np.float32)
            matrix[: self._n] = self._matrix[: self._n]
            id_buf = np.zeros(cap, dtype=np.int64)
            id_buf[: self._n] = self._ids[: self._n]
            self._matrix, self._ids = matrix, id_buf
        self._matrix[self._n : need] = vectors
        self._ids[self._n : need] = ids
        self._n = need

    def _build_hnsw(self, capacity: int) -> None:
        import hnswlib

        index = hnswlib.Index(space="ip", dim=self.dim)
        index.init_index(
            max_elements=max(2 * capacity, 1024), ef_construction=self.ef_construction, M=self.m, allow_replace_deleted=False
        )
        index.set_ef(self.ef_search)
        if self._n:
            index.add_items(self._matrix[: self._n], self._ids[: self._n], num_threads=self.num_threads)
        self._hnsw = index
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0

    # ------------------------------------------------------------------ search

    def search(self, vector: np.ndarray, k: int = 1, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """Top-k by cosine; `allowed` restricts the candidates (per-user memories)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._hnsw is not None:
                count = self._hnsw.get_current_count()
                if count == 0:
                    return []
                k = min(k, count)
                kwargs = {}
                if allowed is not None:
                    # hnswlib raises when fewer than k entries pass the filter (a user with 1 own entry of
                    # 100k): never ask for more than the allowed ids it holds (all ids <= max_id are indexed)
                    held = [i for i in allowed if i <= self.max_id]
                    if len(held) <= EXACT_FILTERED and (found := self._exact_among(vector, k, held)) is not None:
                        return found
                    k = min(k, len(held))
                    kwargs = {"filter": (lambda i: i in allowed)}
                while k > 0:
                    self._hnsw.set_ef(max(self.ef_search, k))
                    try:
                        labels, distances = self._hnsw.knn_query(vector, k=k, num_threads=1, **kwargs)
                    except RuntimeError:  # still fewer reachable (removed entries, a disconnected graph): ask for fewer
                        k //= 2
                        continue
                    return [(int(i), float(1.0 - d)) for i, d in zip(labels[0], distances[0])]
                return []
            if self._n == 0:
                return []
            scores = self._scores(vector)
            ids = self._ids[: self._n]
            if allowed is not None:
                keep = np.isin(ids, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
                scores, ids = scores[keep], ids[keep]
                if len(ids) == 0:
                    return []
            k = min(k, len(ids))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
            return [(int(ids[i]), float(scores[i])) for i in top]

    def _exact_among(self, vector: np.ndarray, k: int, ids: list[int]) -> list[tuple[int, float]] | None:
        """Top-k of `ids` by cosine from their vectors in the HNSW index: exact, and for a few ids far
        cheaper than a filtered graph search (`EXACT_FILTERED`). None when an id is not in the index
        (the caller searches the graph)."""
        if not ids:
            return []
        assert self._hnsw is not None  # called on the HNSW backend only
        try:
            vectors = np.asarray(self._hnsw.get_items(ids), dtype=np.float32)
        except RuntimeError:
            return None
        scores = vectors @ vector
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return [(ids[i], float(scores[i])) for i in top]

    def _scores(self, vector: np.ndarray) -> np.ndarray:
        """Matrix-vector product in torch's thread pool, not numpy's BLAS pool: alternating a BLAS
        call with the embedder's forward pass makes the two pools fight over the cores (measured:
        a whole 10k-entry lookup took 45 ms p50 with numpy's matmul vs. 14 ms with torch's, on
        2 cores, although numpy's matmul alone is faster; see bench/memory.py)."""
        import torch

        if self._torch_view is None or self._torch_view.data_ptr() != self._matrix.ctypes.data:
            self._torch_view = torch.from_numpy(self._matrix)
        return torch.mv(self._torch_view[: self._n], torch.from_numpy(np.ascontiguousarray(vector))).numpy()

    # ------------------------------------------------------------------ persistence (HNSW only)

    def save(self, path: str | Path, fingerprint: dict) -> bool:
        """Write the HNSW graph atomically with a sidecar describing what it covers."""
        if self._hnsw is None:
            return False
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with self._lock:
            _create_private(tmp)  # vectors of users' queries: 0600 from the start, as the memory file
            self._hnsw.save_index(str(tmp))  # truncates the file it is given, keeping its mode
            meta = {**fingerprint, "max_id": self.max_id, "count": self._hnsw.get_current_count(), "dim": self.dim}
        os.replace(tmp, path)
        side = path.with_name(path.name + ".json")
        side_tmp = side.with_name(side.name + ".tmp")
        _create_private(side_tmp)
        side_tmp.write_text(json.dumps(meta))
        os.replace(side_tmp, side)
        return True

    def load(self, path: str | Path, fingerprint: dict, max_id: int | None = None) -> bool:
        """Load a saved graph if it matches `fingerprint`; False means: rebuild.

        `max_id`: the highest id its store holds. A graph covering higher ids was saved from rows this
        store no longer has (an older copy of the file restored): its vectors would answer for the new
        rows that reuse those ids, so it is refused."""
        import hnswlib

        path = Path(path)
        side = path.with_name(path.name + ".json")
        if not path.is_file() or not side.is_file():
            return False
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            return False
        if meta.get("dim") != self.dim or any(meta.get(k) != v for k, v in fingerprint.items()):
            return False
        if max_id is not None and int(meta.get("max_id", 0)) > max_id:
            return False
        index = hnswlib.Index(space="ip", dim=self.dim)
        try:
            index.load_index(str(path), max_elements=max(2 * int(meta["count"]), 1024))
        except RuntimeError:
            return False
        if index.get_current_count() != meta["count"]:
            return False
        index.set_ef(self.ef_search)
        with self._lock:
            self._hnsw = index
            self.max_id = int(meta["max_id"])
        return True


def _create_private(path: Path) -> None:
    """An empty file, mode 0600 (a leftover of a crashed save is replaced: its mode may be wider)."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
