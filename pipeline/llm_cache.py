"""A persistent cache of LLM calls, so rerunning a simulation does not regenerate.

SQLite (stdlib, atomic commits, safe across processes) under $HEEDFUL_HOME/cache. Keys
hash everything that determines an output: the client's identity (model, adapter or
endpoint), the messages, the sampling settings, the seed and a per-request salt
(conversation id, round, purpose). Each batch is committed as soon as it is generated, so
an interrupted run resumes where it stopped. `CachedLLM` wraps any `pipeline.llm` client:
only misses reach the model.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chat import Messages
from .generation import Completion, SamplingSettings


def cache_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class LLMCache:
    """key -> JSON value. `get_many` / `put_many` so a batch costs one query and one commit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self._db.execute(f"SELECT key, value FROM calls WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(value)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO calls (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()]
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedLLM:
    """Looks every request up in the cache; sends only the misses to the client, in one batch."""

    def __init__(self, inner, cache: LLMCache | None):
        self.inner = inner
        self.cache = cache
        self.identity = inner.identity
        self.hits = 0
        self.misses = 0
        self.generated_tokens = 0

    def _through(self, keys: list[str], compute: Callable[[list[int]], list[Any]]) -> list[Any]:
        """Cached values for `keys`; `compute(indices)` fills the misses (JSON values)."""
        found = self.cache.get_many(keys) if self.cache is not None else {}
        # a key asked twice in one batch (two conditions' identical turns) is computed once: the same
        # request, salt and seed get the same value, as they would from the cache
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = [i for i, k in enumerate(keys) if k not in found and first[k] == i]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            new = dict(zip([keys[i] for i in todo], compute(todo)))
            if self.cache is not None:
                self.cache.put_many(new)
            found.update(new)
        return [found[k] for k in keys]

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingSettings,
        seed: int,
        salts: list[str],
        adapters: list[str] | None = None,
    ) -> list[Completion]:
        """`adapters`: per conversation, the PEFT adapter its reply is written with on a client that
        takes them (`HFClient.generate`); part of each reply's key, so a base row and an adapter row
        with the same request and salt are two replies. Not with a cache on disk: the names
        ("default") do not say which weights they were, so another adapter would find these replies."""
        if adapters is not None and self.cache is not None:
            raise ValueError("per-row adapters are not cached on disk: their names do not identify the weights")

        def compute(todo: list[int]) -> list[dict[str, Any]]:
            per_row = {} if adapters is None else {"adapters": [adapters[i] for i in todo]}
            fresh = self.inner.generate([conversations[i] for i in todo], sampling, seed, **per_row)
            self.generated_tokens += sum(c.num_tokens for c in fresh)
            return [{"text": c.text, "num_tokens": c.num_tokens, "finished": c.finished} for c in fresh]

        # without adapters the keys are the ones replies were cached under before they existed
        extra = [[]] * len(conversations) if adapters is None else [[adapter] for adapter in adapters]
        keys = [
            cache_key("generate", self.identity, salt, msgs, sampling.model_dump(), seed, *more)
            for salt, msgs, more in zip(salts, conversations, extra)
        ]
        return [Completion(v["text"], v["num_tokens"], v["finished"]) for v in self._through(keys, compute)]

    @property
    def has_likelihood(self) -> bool:
        return hasattr(self.inner, "reply_logprob")

    def reply_logprob(self, contexts: list[Messages], replies: list[str], salts: list[str]) -> list[float]:
        keys = [cache_key("logprob", self.identity, salt, ctx, reply) for salt, ctx, reply in zip(salts, contexts, replies)]
        values = self._through(
            keys,
            lambda todo: [float(v) for v in self.inner.reply_logprob([contexts[i] for i in todo], [replies[i] for i in todo])],
        )
        return [float(v) for v in values]

    def yes_probability(self, conversations: list[Messages], salts: list[str]) -> list[float]:
        keys = [cache_key("yes", self.identity, salt, msgs) for salt, msgs in zip(salts, conversations)]
        values = self._through(
            keys, lambda todo: [float(p) for p in self.inner.yes_probability([conversations[i] for i in todo])]
        )
        return [float(v) for v in values]
