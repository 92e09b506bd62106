"""One real `heedful serve` for the tests that talk to it (deploy, canary, the loop).

A users file with hashed tokens (one admin, `root`, and the named users), the admin token in
a 0600 file, and a uvicorn server on 127.0.0.1 running the `tiny` model in a thread
(`serving.local.ServerThread`). The yielded server carries `memory` (its memory file, which the
tests read with `MemoryStore`), `token_file` (the admin token file) and `root` (its folder).
Why one module: test_deploy, test_canary, test_loop and test_loop_critique built the same
setup four times; a change to how a server is started is now made once. What those tests do
against it the same way lives here too: the openai client as a user, `heedful` as a
subprocess, and the verbal feedback record the server stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

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


def module_server(folder: str, tokens: dict[str, str], max_tokens_default: int = 6) -> Any:
    """A module-scoped `live` fixture: one server for all tests of a module, its memory in a
    fresh temp folder named `folder`. Assign it in the module: `live = module_server("deploy", TOKENS)`.
    (Tests that need an empty feedback log per test start their own with `serve`.)"""

    @pytest.fixture(scope="module", name="live")
    def live(tiny_model_path, tmp_path_factory) -> Iterator:
        with serve(tmp_path_factory.mktemp(folder), tokens, max_tokens_default=max_tokens_default) as server:
            yield server

    return live


def openai_client(server, tokens: dict[str, str], name: str):
    """The openai client as user `name`; no retries, so a test sees the server's first answer."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=tokens[name], max_retries=0)


def heedful(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    """`heedful ARGS` as a subprocess from the repo root, as an operator's shell runs it; the admin
    token in HEEDFUL_TOKEN only when given (never inherited from the test's environment)."""
    env = {k: v for k, v in os.environ.items() if k != "HEEDFUL_TOKEN"}
    if token:
        env["HEEDFUL_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )


def served_verbal(
    record_id: str,
    author: str,
    request: str,
    text: str,
    *,
    feedback: str = "critique",
    response: str = "r",
    judgment: str | None = "needs_work",
    timestamp: str | None = None,
) -> dict:
    """A verbal feedback record as the server stores it from `POST /v1/feedback`: the turn's last
    user message as the prompt, the user's words as the critique, the author in
    `provenance.annotator` and `author_verified` in `provenance.extra` -- what the quarantine and
    the loop's critique stages read from a feedback export."""
    provenance: dict[str, Any] = {"source": "serving", "annotator": author}
    if timestamp is not None:
        provenance["timestamp"] = timestamp
    provenance["extra"] = json.dumps({"feedback": feedback, "author_verified": True})
    return {
        "id": record_id,
        "kind": "verbal",
        "prompt": [{"role": "user", "content": request}],
        "response": response,
        "critique": text,
        "judgment": judgment,
        "scope": None,
        "provenance": provenance,
    }


def active_version(server, tokens: dict[str, str], name: str) -> str:
    """The version the server serves to everyone now, as `name` sees it in /v1/models."""
    import httpx

    return httpx.get(server.url + "/v1/models", headers=bearer(tokens, name), timeout=60).json()["active_version"]
