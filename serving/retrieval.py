"""MemPrompt retrieval: find remembered clarifications of queries like this one.

A query is embedded (all-MiniLM-L6-v2) and matched against the key queries of the memory;
entries at or above `threshold` cosine similarity are returned, best first. When nothing
clears the threshold and `lexical_fallback` is on, SQLite FTS5 proposes candidates that
share words with the query, accepted when their word overlap (Jaccard) reaches
`lexical_threshold`; this catches near-verbatim repeats that an embedding scores low
(rare words, typos in names).

`key_mask` (a regex) blanks parts of a key before embedding: with `<[^>]*>` the paper's
"What is like < roomy > ?" and "What is like < bin > ?" become the same key, so a
clarification about the *phrasing* transfers to new words instead of sticking to the word.

Scope: with `scope="user"` (the default) a lookup sees only the asking user's own entries
and the entries an admin shared; one user's clarification never steers another user's
prompt. `scope="global"` (every entry for every request) is only for single-user servers.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .index import VectorIndex
from .store import MemoryEntry, MemoryStore

_WORD = re.compile(r"\w+", re.UNICODE)


class RetrievalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.8, ge=-1, le=1, description="minimum cosine similarity of a key")
    k: int = Field(default=1, ge=1, le=16, description="clarifications attached at most")
    lexical_fallback: bool = True
    lexical_threshold: float = Field(default=0.6, ge=0, le=1, description="minimum word Jaccard for the fallback")
    key_mask: str | None = Field(default=None, description="regex blanked out of keys before embedding")
    scope: Literal["global", "user"] = Field(
        default="user",
        description="user: the asking user's own entries and the shared ones; global: every entry (single-user servers only)",
    )
    ann_threshold: int = Field(default=5000, ge=0, description="entries above which HNSW replaces brute force")
    ef_search: int = Field(default=64, ge=1)


@dataclass
class MemoryHit:
    entry: MemoryEntry
    score: float
    method: Literal["embedding", "lexical"]

    def public(self, viewer: str | None = None, everything: bool = False) -> dict[str, Any]:
        """What a response says about the hit. Its text only to its owner (or with `everything`, single-user
        servers): a shared entry came from another user, so its key query and clarification are not echoed."""
        out: dict[str, Any] = {
            "id": self.entry.id,
            "score": round(self.score, 4),
            "method": self.method,
            "shared": bool(self.entry.shared),
        }
        if everything or (viewer is not None and self.entry.user == viewer):
            out.update(key_query=self.entry.key_query, clarification=self.entry.clarification)
        return out


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def jaccard(a: str, b: str) -> float:
    sa, sb = set(words(a)), set(words(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


class Retriever:
    """Memory store + embedder + vector index, kept in sync with the store's rows."""

    def __init__(
        self, store: MemoryStore, embedder, settings: RetrievalSettings | None = None, index_path: str | Path | None = None
    ):
        self.store = store
        self.embedder = embedder
        self.settings = settings or RetrievalSettings()
        self._mask = re.compile(self.settings.key_mask) if self.settings.key_mask else None
        self.index = VectorIndex(embedder.dim, ann_threshold=self.settings.ann_threshold, ef_search=self.settings.ef_search)
        self.index_path = Path(index_path) if index_path else None
        self._sync_lock = threading.Lock()
        # a random id kept in the database's meta table: a saved graph is tied to the database it indexes, so
        # one that outlived it (memory.db deleted to forget everything, or replaced) is rebuilt, not loaded
        self._store_id = self.store.salt("store_id")
        if self.index_path is not None and self.index.load(self.index_path, self._fingerprint(), max_id=self.store.max_id()):
            pass  # rows added after the save are picked up by sync()
        self.sync()

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "embedder": getattr(self.embedder, "name", "?"),
            "key_mask": self.settings.key_mask or "",
            "store_id": self._store_id,
        }

    def key_text(self, query: str) -> str:
        text = self._mask.sub("< >", query) if self._mask else query
        return " ".join(text.split())

    def embed(self, queries: list[str]) -> np.ndarray:
        return self.embedder.encode([self.key_text(q) for q in queries])

    # ------------------------------------------------------------------ writes

    def add(self, key_query: str, clarification: str, **fields) -> MemoryEntry:
        vector = self.embed([key_query])[0]
        entry = self.store.add(key_query, clarification, embedding=vector, **fields)
        self.sync()
        return entry

    def sync(self) -> int:
        """Index rows written since the last sync (by this process or any other); returns how many."""
        with self._sync_lock:
            target = self.store.max_id()  # ids are assigned in serialized write transactions: no gaps appear later
            if target <= self.index.max_id:
                return 0
            added = 0
            for ids, vectors, missing in self.store.embeddings_after(self.index.max_id, target):
                if missing:  # imported without embeddings: embed now and keep them
                    rows = self.store.get(missing)
                    vecs = self.embed([rows[i].key_query for i in missing if i in rows])
                    present = [i for i in missing if i in rows]
                    self.store.set_embeddings(present, vecs)
                    self.index.add(present, vecs)
                    added += len(present)
                if len(ids):
                    self.index.add(ids, vectors)
                    added += len(ids)
            self.index.max_id = max(self.index.max_id, target)
            return added

    def save_index(self) -> bool:
        return self.index_path is not None and self.index.save(self.index_path, self._fingerprint())

    # ------------------------------------------------------------------ reads

    def lookup(self, query: str, user: str | None = None, vector: np.ndarray | None = None) -> list[MemoryHit]:
        """Clarifications for `query`, best first; empty when nothing is similar enough.

        With scope "user", only `user`'s own entries and shared ones qualify (`user=None`: shared ones only).
        """
        s = self.settings
        self.sync()
        if len(self.index) == 0:
            return []
        allowed = None
        if s.scope == "user":
            allowed = self.store.visible_ids(user)
            if not allowed:
                return []
        if vector is None:
            vector = self.embed([query])[0]
        candidates = self.index.search(vector, k=s.k * 4 + 4, allowed=allowed)
        passing = [(i, score) for i, score in candidates if score >= s.threshold]
        entries = self.store.get([i for i, _ in passing])
        hits = [MemoryHit(entries[i], score, "embedding") for i, score in passing if i in entries][: s.k]
        if not hits and s.lexical_fallback:
            hits = self._lexical(query, allowed, user)
        return hits

    def _lexical(self, query: str, allowed: set[int] | None, user: str | None = None) -> list[MemoryHit]:
        s = self.settings
        scored = []
        # scoped in the query itself: filtering after the top 20 lost the user's own entry whenever more than
        # 20 other users' entries share its words (a common question)
        for entry in self.store.lexical_candidates(words(self.key_text(query)), limit=20, scoped=allowed is not None, user=user):
            if allowed is not None and entry.id not in allowed:
                continue
            score = jaccard(self.key_text(query), self.key_text(entry.key_query))
            if score >= s.lexical_threshold:
                scored.append(MemoryHit(entry, score, "lexical"))
        scored.sort(key=lambda h: -h.score)
        return scored[: s.k]
