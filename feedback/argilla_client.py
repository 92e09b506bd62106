"""Connecting to Argilla: the local stack by default, a real deployment when configured.

Stages take an `argilla:` block (`ArgillaConnection`). Resolution order:
- URL: `argilla.api_url`, else $HEEDFUL_ARGILLA_API_URL / $ARGILLA_API_URL, else the local stack.
- key: the env var named by `argilla.api_key_env` (default ARGILLA_API_KEY), else the file
  `argilla.api_key_file`, else $HEEDFUL_ARGILLA_API_KEY_FILE, else the local stack's 0600 key file.
The key itself never goes into a config, a manifest or a log: only where it came from.

`api()` is the raw-endpoint escape hatch (through the SDK's own HTTP client) for what the
SDK does not expose: response timestamps, and the `/me/...` endpoints annotators must use.
Every server refusal becomes an `ArgillaError` with a sentence a person can act on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import HeedfulError
from pipeline.paths import ConfigPath


class ArgillaError(HeedfulError):
    """Argilla refused or failed a request (the message says what to do)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ArgillaPermissionError(ArgillaError):
    """The API key's user may not do this (an annotator asked for an owner/admin action)."""


class ArgillaConnection(BaseModel):
    """Where the Argilla server is and how to authenticate (never the key itself)."""

    model_config = ConfigDict(extra="forbid")
    api_url: str | None = Field(default=None, description="e.g. https://argilla.example.org; default: env or local stack")
    api_key_env: str = Field(default="ARGILLA_API_KEY", description="environment variable holding the API key")
    api_key_file: ConfigPath | None = Field(default=None, description="file holding the API key (keep it mode 0600)")
    workspace: str = "heedful"
    timeout: int = Field(default=120, ge=1)

    def credential_fields(self) -> tuple[str, ...]:
        """Where the key is read: not part of what a stage computes (pipeline/fingerprint.py)."""
        return ("api_key_file",)


def resolve(conn: ArgillaConnection | None = None) -> tuple[str, str, str]:
    """(url, api_key, where the key came from)."""
    from .argilla_stack import local_url, stack_home

    conn = conn or ArgillaConnection()
    url = conn.api_url or os.environ.get("HEEDFUL_ARGILLA_API_URL") or os.environ.get("ARGILLA_API_URL")
    local = False
    if not url:
        url, local = local_url(), True
        if not url:
            raise ArgillaError(
                "no Argilla server: start the local one with `heedful argilla up`, "
                "or set argilla.api_url (or HEEDFUL_ARGILLA_API_URL) to your deployment"
            )
    key, where = os.environ.get(conn.api_key_env), f"${conn.api_key_env}"
    key_file = conn.api_key_file or os.environ.get("HEEDFUL_ARGILLA_API_KEY_FILE")
    if not key and key_file:
        key, where = _read_key(Path(key_file).expanduser()), key_file
    if not key and local:
        path = stack_home() / "api_key"
        if path.is_file():
            key, where = _read_key(path), str(path)
    if not key:
        raise ArgillaError(f"no API key for {url}: set ${conn.api_key_env} or argilla.api_key_file")
    return url.rstrip("/"), key, where


def _read_key(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ArgillaError(f"cannot read the API key file {path}: {exc.strerror}") from None


def connect(conn: ArgillaConnection | None = None, api_key: str | None = None, api_url: str | None = None):
    """An `argilla.Argilla` client; `api_key`/`api_url` override (e.g. to act as an annotator)."""
    import argilla as rg

    if api_key and api_url:
        url, key, where = api_url, api_key, "argument"
    else:
        url, key, where = resolve(conn)
        url, key, where = api_url or url, api_key or key, "argument" if api_key else where
    timeout = (conn or ArgillaConnection()).timeout
    with errors(f"connect to {url} (key from {where})"):
        return rg.Argilla(api_url=url, api_key=key, timeout=timeout)


@contextlib.contextmanager
def errors(action: str) -> Iterator[None]:
    """Turn SDK/HTTP failures into ArgillaError with the action and a hint (no traceback)."""
    import httpx
    from argilla._exceptions import ArgillaAPIError, ArgillaCredentialsError

    try:
        yield
    except ArgillaError:
        raise
    except ArgillaCredentialsError as exc:
        raise ArgillaError(
            f"{action}: the API key was rejected ({exc.message if hasattr(exc, 'message') else exc})", 401
        ) from None
    except ArgillaAPIError as exc:
        from argilla._exceptions import ForbiddenError, NotFoundError, UnauthorizedError

        by_class = {ForbiddenError: 403, UnauthorizedError: 401, NotFoundError: 404}
        status = next((code for cls, code in by_class.items() if isinstance(exc, cls)), getattr(exc, "status_code", None))
        raise _from_status(action, status, str(exc)) from None
    except httpx.HTTPStatusError as exc:
        raise _from_status(action, exc.response.status_code, exc.response.text[:300]) from None
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ArgillaError(f"{action}: cannot reach the server ({exc}); is it running? `heedful argilla status`") from None


def _from_status(action: str, status: int | None, detail: str) -> ArgillaError:
    if status == 403:
        return ArgillaPermissionError(
            f"{action}: forbidden (403). This API key belongs to a user whose role may not do this; "
            "creating datasets and reading or writing all records needs an owner or admin key "
            "(annotators can only submit their own responses, e.g. with feedback.argilla_annotate.annotate)",
            403,
        )
    if status == 401:
        return ArgillaError(f"{action}: unauthorized (401): the API key is wrong or the user was deleted", 401)
    if status == 404:
        return ArgillaError(f"{action}: not found (404): {detail}", 404)
    return ArgillaError(f"{action}: the server answered {status}: {detail}", status)


def api(client, method: str, path: str, action: str, **kwargs) -> Any:
    """Call a raw endpoint through the SDK's HTTP client; JSON back, ArgillaError on failure.

    Retries once on a dropped keep-alive connection (the server resets it after a 500)."""
    import httpx

    http = client.api.http_client
    for attempt in (1, 2):
        try:
            resp = http.request(method, path, **kwargs)
            break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if attempt == 2:
                raise ArgillaError(f"{action}: the connection was reset twice") from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise _from_status(action, resp.status_code, str(detail)[:300])
    return resp.json() if resp.content else None


def role_of(client) -> str:
    me = api(client, "GET", "/api/v1/me", "who am I")
    return me["role"]


def get_dataset(client, name: str, workspace: str):
    """The dataset or None (the SDK's lookup, with errors made readable)."""
    with errors(f"look up dataset {workspace}/{name}"):
        return client.datasets(name=name, workspace=workspace)
