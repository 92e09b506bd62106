"""The MemPrompt memory and the serving log, persisted in one SQLite file.

Why SQLite: one file to back up, safe for several writers (the server's request threads,
`heedful memory add` from a shell, a second replica) through WAL journaling and short
`BEGIN IMMEDIATE` transactions; readers never block writers. Each thread gets its own
connection. Embeddings are stored next to their entry so an index can be rebuilt after a
restart without re-encoding anything.

Tables: `memory` (key query -> clarification, with its owner (`user`), a `shared` flag an
admin sets, time, hits, model/adapter),
`conversations` (what was asked, what was sent to the model, the reply, which memory
entries were used) and `feedback` (heedful feedback records, as JSON, for export).

Every conversation and all feedback is in this file, so it is created 0600 before SQLite
opens it (SQLite gives the -wal and -shm files the database file's mode), in a folder
created 0700; an existing file readable by others is tightened (see `secure_memory_files`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = "1"
log = logging.getLogger("heedful.serving")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memory (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_query TEXT NOT NULL,
    clarification TEXT NOT NULL,
    user TEXT,
    created REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    last_hit REAL,
    model TEXT,
    adapter TEXT,
    conversation_id TEXT,
    embedding BLOB,
    active INTEGER NOT NULL DEFAULT 1,
    shared INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS memory_user ON memory(user);
CREATE VIRTUAL TABLE IF NOT EXISTS memory_fts USING fts5(key_query, content='memory', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS memory_ai AFTER INSERT ON memory BEGIN
    INSERT INTO memory_fts(rowid, key_query) VALUES (new.id, new.key_query);
END;
CREATE TRIGGER IF NOT EXISTS memory_ad AFTER DELETE ON memory BEGIN
    INSERT INTO memory_fts(memory_fts, rowid, key_query) VALUES ('delete', old.id, old.key_query);
END;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    user TEXT,
    model TEXT,
    adapter TEXT,
    messages TEXT NOT NULL,
    sent_messages TEXT NOT NULL,
    response TEXT NOT NULL,
    memory_ids TEXT NOT NULL DEFAULT '[]',
    client_user TEXT,
    conversation TEXT,
    adapter_version TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    conversation_id TEXT,
    kind TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_conversation ON feedback(conversation_id);
"""
_INDEXES = "CREATE INDEX IF NOT EXISTS conversations_thread ON conversations(conversation, created);"


#: columns added after schema 1 shipped, added to older files when they are opened: (table, column, declaration)
_ADDED_COLUMNS = [("memory", "shared", "INTEGER NOT NULL DEFAULT 0"), ("conversations", "client_user", "TEXT")]
#: columns added with completion/conversation ids and adapter versions (no owner rewrite: owners were verified)
_ADDED_COLUMNS_V3 = [("conversations", "conversation", "TEXT"), ("conversations", "adapter_version", "TEXT")]
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal", ".hnsw", ".hnsw.json")
UNVERIFIED_PREFIX = "unverified:"  # owners recorded before identities were checked (never a valid user name)


def secure_memory_files(path: Path) -> None:
    """Create the memory file 0600 (its folder 0700) before SQLite does; tighten existing ones.

    A folder that exists already is tightened to 0700 only when it holds nothing but this
    memory's files (a folder of its own); a folder shared with other files is left as it is,
    with a warning, since the files in it are 0600 anyway.
    """
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)
    else:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            own = all(p.name.startswith(path.name) for p in folder.iterdir())
            if own and folder.stat().st_uid == os.getuid():
                os.chmod(folder, 0o700)
            else:
                log.warning("memory folder %s is accessible by others (mode %04o); the memory files in it are 0600", folder, mode)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for p in [path] + [path.with_name(path.name + s) for s in _SIDE_SUFFIXES]:
        try:
            if stat.S_IMODE(p.stat().st_mode) & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise StoreError(f"{p} is readable by others and not ours to tighten; run: chmod 600 {p}") from None


class StoreError(RuntimeError):
    """The memory file cannot be used as asked (wrong embedder, not a heedful store, ...)."""


@dataclass
class MemoryEntry:
    id: int
    key_query: str
    clarification: str
    user: str | None = None
    created: float = 0.0
    hits: int = 0
    last_hit: float | None = None
    model: str | None = None
    adapter: str | None = None
    conversation_id: str | None = None
    shared: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key_query": self.key_query,
            "clarification": self.clarification,
            "user": self.user,
            "created": self.created,
            "hits": self.hits,
            "model": self.model,
            "adapter": self.adapter,
            "conversation_id": self.conversation_id,
            "shared": bool(self.shared),
        }


@dataclass
class Conversation:
    id: str
    created: float
    user: str | None
    model: str | None
    adapter: str | None
    messages: list[dict[str, str]]
    sent_messages: list[dict[str, str]]
    response: str
    memory_ids: list[int] = field(default_factory=list)
    client_user: str | None = None  # the request's `user` field: a label, never an identity
    conversation: str | None = None  # the conversation (thread of turns) this completion belongs to
    adapter_version: str | None = None  # the adapter version that wrote `response` (serving.versions)

    @property
    def last_user_message(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message.get("content", "")
        return ""


_ENTRY_COLUMNS = "id, key_query, clarification, user, created, hits, last_hit, model, adapter, conversation_id, shared"


class _Connection(sqlite3.Connection):
    """sqlite3's connection, made weakly referenceable: the store keeps track of every thread's
    connection (to close them all) without keeping an exited thread's alive."""


class MemoryStore:
    """Thread-safe, multi-process-safe access to one memory file."""

    def __init__(self, path: str | Path, embedder_name: str | None = None, dim: int | None = None):
        self.path = Path(path)
        secure_memory_files(self.path)
        self._local = threading.local()
        # every live thread's connection, so `close` closes them all (a server's request threads, a pool's
        # workers); weak: an exited thread's connection goes with it, as before
        self._opened: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._opened_lock = threading.Lock()
        try:
            self._conn().executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            self._add_columns()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a heedful memory file ({exc})") from None
        self._check_meta(embedder_name, dim)

    def _add_columns(self) -> None:
        """Upgrade a file written before per-user memory. Its `user` values were whatever clients claimed,
        so they are kept as `unverified:NAME`: no token's user owns them (an admin sees, shares or removes them)."""
        with self.transaction() as conn:
            for table, column, decl in _ADDED_COLUMNS:
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    conn.execute(f"UPDATE {table} SET user = '{UNVERIFIED_PREFIX}' || user WHERE user IS NOT NULL")
            for table, column, decl in _ADDED_COLUMNS_V3:
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            conn.execute(_INDEXES)

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False, factory=_Connection)
            conn.execute("PRAGMA busy_timeout=30000")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not enable WAL journaling (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._opened_lock:
                self._opened.add(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so writers queue instead of deadlocking."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection (call it once no thread is using the store; a later call
        from any thread opens a fresh one)."""
        with self._opened_lock:
            opened, self._opened = list(self._opened), weakref.WeakSet()
            self._local = threading.local()
        for conn in opened:
            conn.close()

    def checkpoint(self, passive: bool = False) -> None:
        """Fold the WAL into the main file (so a copy or a hash of the .db alone is complete).

        PASSIVE never waits for other connections (it may leave pages behind while they read);
        TRUNCATE waits for them and empties the WAL.
        """
        self._conn().execute(f"PRAGMA wal_checkpoint({'PASSIVE' if passive else 'TRUNCATE'})")

    def _check_meta(self, embedder_name: str | None, dim: int | None) -> None:
        with self.transaction() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "schema" not in meta:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif meta["schema"] != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: memory schema {meta['schema']}, this heedful reads {SCHEMA_VERSION}")
            for key, value in (("embedder", embedder_name), ("dim", None if dim is None else str(dim))):
                if value is None:
                    continue
                if key not in meta:
                    conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
                elif meta[key] != value:
                    raise StoreError(
                        f"{self.path}: memory was built with {key}={meta[key]}, asked to use {value}; "
                        "use another --memory file or re-embed it (`heedful memory reindex`)"
                    )

    def hash_label(self, label: str | None) -> str | None:
        """A client-chosen user label (OpenAI's `user`, often an e-mail or account id) as a salted hash:
        the same label gives the same value in this file (so one end user's turns can be grouped), the
        label itself is never stored, and another memory file (another salt) gives another value."""
        if label is None:
            return None
        import hashlib
        import hmac

        salt = getattr(self, "_label_salt", None)
        if salt is None:  # per memory file: the same label hashes differently elsewhere
            salt = self._label_salt = self.salt("label_salt")
        return "salted-sha256:" + hmac.new(salt.encode(), label.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def salt(self, key: str) -> str:
        """A random secret kept in the meta table under `key` (made on first use): fixed for this memory
        file, so hashes keyed by it stay the same across restarts (labels, canary buckets)."""
        import secrets

        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, secrets.token_hex(16)))
            return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def meta(self) -> dict[str, str]:
        return dict(self._conn().execute("SELECT key, value FROM meta").fetchall())

    # ------------------------------------------------------------------ memory

    def add(
        self,
        key_query: str,
        clarification: str,
        embedding: np.ndarray | None = None,
        user: str | None = None,
        model: str | None = None,
        adapter: str | None = None,
        conversation_id: str | None = None,
        created: float | None = None,
        shared: bool = False,
    ) -> MemoryEntry:
        blob = None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()
        created = time.time() if created is None else created
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO memory (key_query, clarification, user, created, model, adapter, conversation_id, embedding,"
                " shared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_query, clarification, user, created, model, adapter, conversation_id, blob, int(shared)),
            )
            new_id = cur.lastrowid
            assert new_id is not None  # always set after a successful INSERT
        return MemoryEntry(new_id, key_query, clarification, user, created, 0, None, model, adapter, conversation_id, shared)

    def add_many(self, rows: list[dict[str, Any]], embeddings: np.ndarray | None = None) -> list[int]:
        """Bulk insert in one transaction (imports, benchmarks)."""
        now = time.time()
        ids: list[int] = []
        with self.transaction() as conn:
            for i, row in enumerate(rows):
                blob = None if embeddings is None else np.asarray(embeddings[i], dtype=np.float32).tobytes()
                cur = conn.execute(
                    "INSERT INTO memory (key_query, clarification, user, created, model, adapter, conversation_id,"
                    " embedding, shared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row["key_query"],
                        row["clarification"],
                        row.get("user"),
                        row.get("created", now),
                        row.get("model"),
                        row.get("adapter"),
                        row.get("conversation_id"),
                        blob,
                        int(bool(row.get("shared"))),
                    ),
                )
                assert cur.lastrowid is not None  # always set after a successful INSERT
                ids.append(cur.lastrowid)
        return ids

    def get(self, ids: list[int]) -> dict[int, MemoryEntry]:
        """Active entries by id (removed ones are simply absent)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = (
            self._conn()
            .execute(f"SELECT {_ENTRY_COLUMNS} FROM memory WHERE active = 1 AND id IN ({marks})", list(ids))
            .fetchall()
        )
        return {row[0]: MemoryEntry(*row) for row in rows}

    @staticmethod
    def _owner_filter(user: str | None) -> tuple[str, list[Any]]:
        return (" AND user = ?", [user]) if user is not None else ("", [])

    def entries(self, limit: int | None = None, offset: int = 0, user: str | None = None) -> list[MemoryEntry]:
        """Active entries, oldest first; with `user`, only the entries that user owns."""
        where, args = self._owner_filter(user)
        sql = f"SELECT {_ENTRY_COLUMNS} FROM memory WHERE active = 1{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [limit, offset]
        return [MemoryEntry(*row) for row in self._conn().execute(sql, args).fetchall()]

    def count(self, user: str | None = None) -> int:
        where, args = self._owner_filter(user)
        return self._conn().execute(f"SELECT count(*) FROM memory WHERE active = 1{where}", args).fetchone()[0]

    def visible_ids(self, user: str | None) -> set[int]:
        """Ids a user's requests may retrieve: their own active entries and the shared ones."""
        rows = self._conn().execute("SELECT id FROM memory WHERE active = 1 AND (shared = 1 OR user = ?)", (user,)).fetchall()
        return {r[0] for r in rows}

    def share(self, entry_id: int, shared: bool = True) -> bool:
        """Make an entry retrievable by every user (or only by its owner again). An admin's act."""
        with self.transaction() as conn:
            cur = conn.execute("UPDATE memory SET shared = ? WHERE id = ? AND active = 1", (int(shared), entry_id))
            return cur.rowcount > 0

    def max_id(self) -> int:
        return self._conn().execute("SELECT coalesce(max(id), 0) FROM memory").fetchone()[0]

    def embeddings_after(
        self, after_id: int, up_to: int, batch: int = 50_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
        """(ids, vectors, ids_without_embedding) for after_id < id <= up_to, in id order."""
        last = after_id
        while True:
            rows = (
                self._conn()
                .execute(
                    "SELECT id, embedding FROM memory WHERE id > ? AND id <= ? AND active = 1 ORDER BY id LIMIT ?",
                    (last, up_to, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            last = rows[-1][0]
            with_vec = [(i, b) for i, b in rows if b is not None]
            missing = [i for i, b in rows if b is None]
            ids = np.fromiter((i for i, _ in with_vec), dtype=np.int64, count=len(with_vec))
            vecs = (
                np.frombuffer(b"".join(b for _, b in with_vec), dtype=np.float32).reshape(len(with_vec), -1)
                if with_vec
                else np.zeros((0, 0), dtype=np.float32)
            )
            yield ids, vecs, missing

    def set_embeddings(self, ids: list[int], vectors: np.ndarray) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE memory SET embedding = ? WHERE id = ?",
                [(np.asarray(v, dtype=np.float32).tobytes(), int(i)) for i, v in zip(ids, vectors)],
            )

    def record_hits(self, ids: list[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self.transaction() as conn:
            conn.executemany("UPDATE memory SET hits = hits + 1, last_hit = ? WHERE id = ?", [(now, i) for i in ids])

    def remove(self, entry_id: int, owner: str | None = None) -> bool:
        """Deactivate an entry; with `owner`, only if that user owns it (False otherwise)."""
        where, args = self._owner_filter(owner)
        with self.transaction() as conn:
            cur = conn.execute(f"UPDATE memory SET active = 0 WHERE id = ? AND active = 1{where}", [entry_id, *args])
            return cur.rowcount > 0

    def lexical_candidates(
        self, query_terms: list[str], limit: int = 20, scoped: bool = False, user: str | None = None
    ) -> list[MemoryEntry]:
        """Entries whose key query shares words with the query, best BM25 first (SQLite FTS5).

        `scoped`: only the entries `user` may retrieve (as `visible_ids`: own and shared; user None: shared
        only), filtered before the limit, so other users' many copies of a common question cannot crowd
        the user's own entry out of the top `limit`."""
        terms = ['"' + t.replace('"', '""') + '"' for t in query_terms if t]
        if not terms:
            return []
        where, args = (" AND (m.shared = 1 OR m.user = ?)", [user]) if scoped else ("", [])
        rows = (
            self._conn()
            .execute(
                "SELECT m.id, m.key_query, m.clarification, m.user, m.created, m.hits, m.last_hit, m.model, m.adapter,"
                " m.conversation_id, m.shared FROM memory_fts JOIN memory m ON m.id = memory_fts.rowid"
                f" WHERE memory_fts MATCH ? AND m.active = 1{where} ORDER BY bm25(memory_fts) LIMIT ?",
                [" OR ".join(terms), *args, limit],
            )
            .fetchall()
        )
        return [MemoryEntry(*row) for row in rows]

    # ------------------------------------------------------------------ conversations and feedback

    def log_conversation(self, conv: Conversation) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO conversations (id, created, user, model, adapter, messages, sent_messages, response,"
                " memory_ids, client_user, conversation, adapter_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conv.id,
                    conv.created,
                    conv.user,
                    conv.model,
                    conv.adapter,
                    json.dumps(conv.messages),
                    json.dumps(conv.sent_messages),
                    conv.response,
                    json.dumps(conv.memory_ids),
                    conv.client_user,
                    conv.conversation,
                    conv.adapter_version,
                ),
            )

    _CONV_COLUMNS = (
        "id, created, user, model, adapter, messages, sent_messages, response, memory_ids, client_user,"
        " conversation, adapter_version"
    )

    @staticmethod
    def _conv(row) -> Conversation:
        return Conversation(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            json.loads(row[5]),
            json.loads(row[6]),
            row[7],
            json.loads(row[8]),
            row[9],
            row[10],
            row[11],
        )

    def conversation(self, conv_id: str) -> Conversation | None:
        """One completion, by its id."""
        row = self._conn().execute(f"SELECT {self._CONV_COLUMNS} FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        return None if row is None else self._conv(row)

    def last_in_conversation(self, conversation: str) -> Conversation | None:
        """The latest completion of a conversation (thread), or None."""
        row = (
            self._conn()
            .execute(
                f"SELECT {self._CONV_COLUMNS} FROM conversations WHERE conversation = ?"
                " ORDER BY created DESC, rowid DESC LIMIT 1",
                (conversation,),
            )
            .fetchone()
        )
        return None if row is None else self._conv(row)

    def conversations(self) -> list[Conversation]:
        rows = self._conn().execute("SELECT id FROM conversations ORDER BY created, id").fetchall()
        return [c for (cid,) in rows if (c := self.conversation(cid)) is not None]

    def log_feedback(self, conversation_id: str | None, kind: str, record: dict[str, Any]) -> int:
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO feedback (created, conversation_id, kind, record) VALUES (?, ?, ?, ?)",
                (time.time(), conversation_id, kind, json.dumps(record)),
            )
            assert cur.lastrowid is not None  # always set after a successful INSERT
            return cur.lastrowid

    def feedback(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [record for _, record in self.feedback_rows(kind)]

    def feedback_rows(self, kind: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        """(time received, record) in the order received."""
        sql, args = "SELECT created, record FROM feedback", []
        if kind:
            sql += " WHERE kind = ?"
            args.append(kind)
        return [(r[0], json.loads(r[1])) for r in self._conn().execute(sql + " ORDER BY id", args).fetchall()]

    def feedback_after(self, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Feedback rows with id > `after`, in id order: {id, created, completion_id, kind, record}.
        The row id is the watermark an incremental reader keeps (ids only grow)."""
        rows = (
            self._conn()
            .execute(
                "SELECT id, created, conversation_id, kind, record FROM feedback WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            )
            .fetchall()
        )
        return [{"id": r[0], "created": r[1], "completion_id": r[2], "kind": r[3], "record": json.loads(r[4])} for r in rows]

    def version_stats(self, since: float | None = None) -> list[dict[str, Any]]:
        """Per adapter version: completions served (since `since`, unix seconds) and their reactions.

        A completion counts once, with its latest reaction (a user who reacts twice, or changes
        their mind, is one vote), so `love_rate` = completions whose reaction is love / completions
        with a reaction. Completions logged before versions were recorded are left out.
        """
        rows = (
            self._conn()
            .execute(
                """
                WITH last AS (SELECT max(id) AS id FROM feedback WHERE kind = 'reaction' GROUP BY conversation_id),
                latest AS (
                    SELECT f.conversation_id, json_extract(f.record, '$.reaction') AS reaction
                    FROM feedback f JOIN last ON f.id = last.id
                )
                SELECT c.adapter_version, count(*), count(l.reaction),
                       coalesce(sum(l.reaction = 'love'), 0), coalesce(sum(l.reaction = 'dislike'), 0),
                       coalesce(sum(l.reaction = 'neutral'), 0), min(c.created), max(c.created)
                FROM conversations c LEFT JOIN latest l ON l.conversation_id = c.id
                WHERE c.adapter_version IS NOT NULL AND c.created >= ?
                GROUP BY c.adapter_version ORDER BY min(c.created)
                """,
                (since if since is not None else float("-inf"),),
            )
            .fetchall()
        )
        return [
            {
                "version": version,
                "completions": completions,
                "reactions": reactions,
                "love": love,
                "dislike": dislike,
                "neutral": neutral,
                "love_rate": round(love / reactions, 4) if reactions else None,
                "first": first,
                "last": last,
            }
            for version, completions, reactions, love, dislike, neutral, first, last in rows
        ]

    def stats(self) -> dict[str, Any]:
        conn = self._conn()
        kinds = dict(conn.execute("SELECT kind, count(*) FROM feedback GROUP BY kind").fetchall())
        return {
            "entries": self.count(),
            "removed": conn.execute("SELECT count(*) FROM memory WHERE active = 0").fetchone()[0],
            "hits": conn.execute("SELECT coalesce(sum(hits), 0) FROM memory WHERE active = 1").fetchone()[0],
            "conversations": conn.execute("SELECT count(*) FROM conversations").fetchone()[0],
            "feedback": kinds,
            **{f"meta.{k}": v for k, v in self.meta().items() if not k.endswith("_salt")},  # secrets stay in the file
        }
