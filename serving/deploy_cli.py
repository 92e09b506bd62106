"""`heedful deploy RUN_OR_ADAPTER_DIR --to URL` and `heedful deploy rollback --to URL`.

Why a client command and not a server restart: the server loads the adapter as a new
version beside the one it serves and switches without dropping a request
(`serving.versions`). The folder is given to the server by path, so it must be readable
on the server's machine (the same machine, or a shared file system). The admin token
comes from `--token-file` (mode 0600) or `HEEDFUL_TOKEN`; it is never printed.
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


def call(url: str, path: str, token: str | None, body: dict | None = None, timeout: float = 600) -> dict:
    """POST to the server; a refusal becomes a HeedfulError with the server's message and status."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/").removesuffix("/v1") + path
    try:
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


def deploy(
    target: str = typer.Argument(..., help="exported adapter folder, a run folder with an export stage, or 'rollback'"),
    to: str = typer.Option(..., "--to", help="server URL, e.g. http://127.0.0.1:8000"),
    token_file: Path | None = typer.Option(None, "--token-file", help=f"admin token file, mode 0600 (else ${TOKEN_ENV})"),
):
    """Hot-deploy an adapter to a running `heedful serve` (or roll back to the previous version)."""
    token = read_token(token_file)
    if target == "rollback" and not Path(target).is_dir():
        result = call(to, "/v1/admin/adapters/rollback", token)
        action = "rolled back to"
    else:
        adapter = resolve_adapter(Path(target))
        result = call(to, "/v1/admin/adapters", token, {"path": str(adapter)})
        action = "deployed" if result.get("changed") else "already active:"
    active = result.get("active") or {}
    console.print(
        f"{action} version [bold]{active.get('id')}[/] ({active.get('adapter') or 'base model'}); "
        f"previous: {result.get('previous')}"
    )
