"""One real `heedful serve` for the tests that talk to it (deploy, canary, the loop).

A users file with hashed tokens (one admin, `root`, and the named users), the admin token in
a 0600 file, and a uvicorn server on 127.0.0.1 running the `tiny` model in a thread
(`serving.local.ServerThread`). The yielded server carries `memory` (its memory file, which the
tests read with `MemoryStore`), `token_file` (the admin token file) and `root` (its folder).
Why one module: test_deploy, test_canary, test_loop and test_loop_critique built the same
setup four times; a change to how a server is started is now made once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ADMIN = "root"


def token_of(name: str) -> str:
    """A user's bearer token in these tests (long enough for the users file's rules)."""
    return f"{name}-token-0123456789abcdef"


def tokens_for(*names: str) -> dict[str, str]:
    """`{name: token}` for the users and the admin."""
    return {name: token_of(name) for name in (*names, ADMIN)}


def bearer(tokens: dict[str, str], name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[name]}"}


def write_credentials(root: Path, tokens: dict[str, str]) -> tuple[Path, Path]:
    """(users file, admin token file) under `root`; `ADMIN` is the admin, the others are users."""
    from serving.identity import UserEntry, hash_token, write_users

    root.mkdir(parents=True, exist_ok=True)
    users = root / "users.yaml"
    write_users(users, [UserEntry(n, "admin" if n == ADMIN else "user", hash_token(t)) for n, t in tokens.items()])
    token_file = root / "admin.token"
    token_file.write_text(tokens[ADMIN])
    os.chmod(token_file, 0o600)
    return users, token_file


@contextmanager
def serve(root: Path, tokens: dict[str, str], max_tokens_default: int = 6, **settings) -> Iterator:
    """A live server for `tokens`' users, its memory in `root`; `settings`: more ServeSettings fields."""
    from serving.local import ServerThread
    from serving.service import ServeSettings

    users, token_file = write_credentials(root, tokens)
    config = ServeSettings(
        model="tiny", memory=str(root / "memory.db"), users_file=str(users), max_tokens_default=max_tokens_default, **settings
    )
    thread: Any = ServerThread(config)  # carries the test's extras below
    with thread as server:
        server.memory = root / "memory.db"
        server.token_file = token_file
        server.root = root
        yield server


def active_version(server, tokens: dict[str, str], name: str) -> str:
    """The version the server serves to everyone now, as `name` sees it in /v1/models."""
    import httpx

    return httpx.get(server.url + "/v1/models", headers=bearer(tokens, name), timeout=60).json()["active_version"]
