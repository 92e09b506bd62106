"""`heedful deploy RUN_OR_ADAPTER_DIR --to URL [--canary SHARE]`, `heedful deploy promote|rollback|stats --to URL`.

Why a client command and not a server restart: the server loads the adapter as a new
version beside the one it serves and switches without dropping a request
(`serving.versions`); with `--canary` it serves the new version to that share of users
only, until `promote` (everyone) or `rollback` (nobody). `stats` shows the live reaction
counts per version that decide it. The folder is given to the server by path, so it must
be readable on the server's machine (the same machine, or a shared file system). The
admin token comes from `--token-file` (mode 0600) or `HEEDFUL_TOKEN`; it is never printed.

The same acts for Python callers (the loop): `active_version`, `deploy`, `promote`, `rollback`,
`version_stats`, `completion`; each raises a HeedfulError with the server's message when
the server refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console

from pipeline.errors import HeedfulError

console = Console(highlight=False)
TOKEN_ENV = "HEEDFUL_TOKEN"


def resolve_adapter(target: Path) -> Path:
    """An adapter folder as given, or the export stage's output of a run folder (exactly one)."""
    target = target.expanduser().resolve()
    if not target.is_dir():
        raise HeedfulError(f"{target}: not a folder (give an exported adapter folder or a run folder)")
    if (target / "adapter_config.json").is_file():
        return target
    exports, adapters = [], []
    for manifest in sorted(target.glob("*/manifest.json")):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HeedfulError(f"{manifest}: unreadable manifest ({exc})") from None
        for out in (data.get("outputs") or {}).values():
            path = manifest.parent / str(out.get("path", ""))
            if out.get("kind") == "export" and (path / "adapter_config.json").is_file():
                exports.append(path)
            elif out.get("kind") == "adapter":
                adapters.append(path)
    if len(exports) == 1:
        return exports[0]
    if len(exports) > 1:
        raise HeedfulError(
            f"{target}: the run has {len(exports)} export outputs; give one of them: " + ", ".join(str(p) for p in exports)
        )
    hint = f" (its adapters: {', '.join(str(p) for p in adapters)})" if adapters else ""
    raise HeedfulError(
        f"{target}: neither a PEFT adapter folder (no adapter_config.json) nor a run with an "
        f"export stage output{hint}; run the export stage, or give an adapter folder"
    )


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        from .identity import IdentityError, load_token

        try:
            return load_token(token_file)
        except IdentityError as exc:
            raise HeedfulError(str(exc)) from None
    return os.environ.get(TOKEN_ENV) or None


def server_root(url: str) -> str:
    """The server a URL names: `http://h:8000`, `http://h:8000/` and `http://h:8000/v1` (an OpenAI
    client's base URL) are one server, whose endpoints this module and `serve_pull` call."""
    return url.rstrip("/").removesuffix("/v1")


def call(url: str, path: str, token: str | None, body: dict | None = None, timeout: float = 600, method: str = "POST") -> dict:
    """Ask the server; a refusal becomes a HeedfulError with the server's message and status."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = server_root(url) + path
    try:
        if method == "GET":
            response = httpx.get(endpoint, params=body, headers=headers, timeout=timeout)
        else:
            response = httpx.post(endpoint, json=body or {}, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise HeedfulError(f"cannot reach the server at {url}: {exc}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code >= 400:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        hint = {401: " (give an admin token: --token-file or HEEDFUL_TOKEN)", 403: " (the token is not an admin's)"}.get(
            response.status_code, ""
        )
        raise HeedfulError(f"the server refused ({response.status_code}): {message or response.text[:300]}{hint}")
    return data


def active_version(url: str, token: str | None) -> tuple[str | None, str | None]:
    """(id, adapter folder) of the version the server serves to everyone now, from `/v1/models`;
    the folder is None for the base model. One reader for the loop and the deploy stage."""
    data = call(url, "/v1/models", token, method="GET")
    active = data.get("active_version")
    for model in data.get("data") or []:
        for version in model.get("versions") or []:
            if version.get("id") == active:
                return active, version.get("adapter")
    return active, None


def deploy(url: str, adapter: str | Path, token: str | None, canary: float | None = None) -> dict:
    """Load `adapter` (a PEFT folder, or a run folder with one export output) on the server and switch
    to it, or with `canary` (0..1) serve it to that share of users. The server's answer:
    `{"active", "canary", "previous", "changed"}`."""
    body: dict = {"adapter": str(resolve_adapter(Path(adapter)))}
    if canary is not None:
        body["canary"] = canary
    return call(url, "/v1/admin/adapters", token, body)


def promote(url: str, token: str | None) -> dict:
    """Make the running canary the active version for every user."""
    return call(url, "/v1/admin/adapters/promote", token)


def rollback(url: str, token: str | None) -> dict:
    """Drop the running canary, or (with none) switch back to the previously active version."""
    return call(url, "/v1/admin/adapters/rollback", token)


def version_stats(url: str, token: str | None, since: float | None = None) -> list[dict]:
    """Per version: completions, reactions, love, dislike, neutral, love_rate, serving, share."""
    params = {"since": since} if since is not None else None
    return call(url, "/v1/admin/versions/stats", token, params, method="GET")["data"]


def completion(url: str, token: str | None, completion_id: str) -> dict:
    """The version, adapter, conversation, time and user hash of one served completion."""
    from urllib.parse import quote

    return call(url, f"/v1/admin/completions/{quote(completion_id, safe='')}", token, method="GET")


ACTIONS = ("promote", "rollback", "stats")


def deploy_command(
    target: str = typer.Argument(
        ..., help="exported adapter folder, a run folder with an export stage, or 'promote', 'rollback', 'stats'"
    ),
    to: str = typer.Option(..., "--to", help="server URL, e.g. http://127.0.0.1:8000"),
    token_file: Path | None = typer.Option(None, "--token-file", help=f"admin token file, mode 0600 (else ${TOKEN_ENV})"),
    canary: float | None = typer.Option(None, "--canary", help="serve the adapter to this share of users only (0..1)"),
):
    """Hot-deploy an adapter to a running `heedful serve` (optionally as a canary); promote, roll back, stats."""
    token = read_token(token_file)
    action = target if target in ACTIONS and not Path(target).is_dir() else "deploy"
    if canary is not None and action != "deploy":
        raise HeedfulError(f"--canary goes with an adapter to deploy, not with '{action}'")
    if action == "stats":
        show_stats(version_stats(to, token))
        return
    if action == "deploy":
        result = deploy(to, Path(target), token, canary)
        action = "canary" if canary is not None else ("deployed" if result.get("changed") else "already active:")
    else:
        result = {"promote": promote, "rollback": rollback}[action](to, token)
        action = {"promote": "promoted", "rollback": "rolled back; active"}[action]
    show_result(action, result)


def show_result(action: str, result: dict) -> None:
    active, running = result.get("active") or {}, result.get("canary")
    if action == "canary" and running:
        console.print(
            f"canary version [bold]{running.get('id')}[/] ({running.get('adapter')}) for {running.get('canary'):.0%} of users"
        )
    else:
        console.print(f"{action} version [bold]{active.get('id')}[/] ({active.get('adapter') or 'base model'})")
    console.print(
        f"active: {active.get('id')}; previous: {result.get('previous')}; canary: {running.get('id') if running else 'none'}"
    )


def show_stats(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="versions: live reactions", title_justify="left")
    table.add_column("version", no_wrap=True)
    for column in ("serving", "share", "completions", "reactions", "love", "dislike", "love_rate"):
        table.add_column(column)
    for row in rows:
        rate = row.get("love_rate")
        table.add_row(
            str(row["version"]),
            row.get("serving") or "",
            f"{row.get('share', 0):.0%}",
            *(str(row[k]) for k in ("completions", "reactions", "love", "dislike")),
            "" if rate is None else f"{rate:.2f}",
        )
    console.print(table)
