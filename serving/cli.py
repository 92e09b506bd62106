"""`heedful serve --model BASE [--adapter DIR] [--memory PATH]`: the MemPrompt chat server.

Several users: `--users-file users.yaml` (a token per user, see `heedful users add`); one
user: `--token-file` (or nothing, on loopback). docs/security.md says what each may do.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(highlight=False, stderr=True)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    model: str = typer.Option("smollm2-135m", "--model", help="base model: alias, folder or hub id"),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT adapter folder (e.g. an exported run)"),
    memory: Path | None = typer.Option(None, "--memory", help="memory file (default ~/.cache/heedful/memory/memory.db)"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback by default)"),
    port: int = typer.Option(8000, "--port"),
    token_file: Path | None = typer.Option(None, "--token-file", help="one user: bearer token file, mode 0600"),
    users_file: Path | None = typer.Option(
        None, "--users-file", help="several users: names, roles, sha256 of tokens (mode 0600)"
    ),
    served_name: str | None = typer.Option(None, "--served-name", help="model id clients send (default: --model)"),
    template: str | None = typer.Option(None, "--template", help="prompt template with {query} and {clarification(s)}"),
    threshold: float = typer.Option(0.8, "--threshold", help="minimum cosine similarity for a memory hit"),
    k: int = typer.Option(1, "--k", help="clarifications attached at most"),
    key_mask: str | None = typer.Option(None, "--key-mask", help="regex blanked from keys before embedding, e.g. '<[^>]*>'"),
    scope: str = typer.Option("user", "--scope", help="user: own + admin-shared entries; global: all (one user only)"),
    no_lexical: bool = typer.Option(False, "--no-lexical", help="turn off the word-overlap fallback"),
    no_memory: bool = typer.Option(False, "--no-memory", help="serve without memory (feedback is still logged)"),
    no_log: bool = typer.Option(False, "--no-log", help="store no conversations and no feedback (answers only)"),
    device: str | None = typer.Option(None, "--device", help="cpu / cuda (default: cuda when available)"),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="auto: on this CPU what the engine probe found faster (ct2, hf, or hf+ct2: lone requests on CTranslate2, batches on HF; measured once), else HF; hf; ct2; hf+ct2 (docs/serving.md)",
    ),
    max_batch: int = typer.Option(16, "--max-batch", help="concurrent requests generated together (1: serialized)"),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", help="how long a request waits for others"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="deploy on this Ray cluster with Ray Serve"),
    replicas: int = typer.Option(1, "--replicas", help="Ray Serve replicas (with --ray-address)"),
):
    """Serve an OpenAI-compatible chat endpoint with MemPrompt memory and a feedback endpoint."""
    from pipeline.errors import HeedfulError

    from .identity import Authenticator, IdentityError
    from .prompting import TemplateError
    from .retrieval import RetrievalSettings
    from .service import ServeSettings, default_memory_path

    try:
        settings = ServeSettings(
            model=model,
            adapter=str(adapter.resolve()) if adapter else None,
            served_name=served_name,
            memory=str((memory or default_memory_path()).expanduser().resolve()),
            memory_enabled=not no_memory and not no_log,
            log=not no_log,
            retrieval=RetrievalSettings(
                threshold=threshold, k=k, key_mask=key_mask, scope=scope, lexical_fallback=not no_lexical
            ),
            device=device,
            engine=engine,
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
            token_file=str(token_file.expanduser().resolve()) if token_file else None,
            users_file=str(users_file.expanduser().resolve()) if users_file else None,
            **({"template": template} if template else {}),
        )
        Authenticator(settings.users_file, settings.token_file)  # fail now, with the reason, not at the first request
    except (IdentityError, TemplateError) as exc:
        raise HeedfulError(str(exc)) from None
    except ValueError as exc:  # pydantic
        raise HeedfulError(f"invalid serve settings: {exc}") from None
    if adapter and not (adapter / "adapter_config.json").is_file():
        raise HeedfulError(f"--adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    if host not in LOOPBACK and not (token_file or users_file):
        console.print(
            f"[yellow]warning:[/] binding {host} without --users-file or --token-file: anyone who can "
            "reach this machine can use the model and write to its memory"
        )
    auth = (
        ", auth: users file (per-user memory)" if users_file else ", auth: one bearer token (single user)" if token_file else ""
    )
    console.print(f"serving [bold]{settings.name}[/] on http://{host}:{port}/v1 (memory: {settings.memory}{auth})")
    if ray_address:
        from .ray_app import deploy

        deploy(settings, ray_address, host, port, replicas)
        return
    import uvicorn

    from .app import build_app

    uvicorn.run(build_app(settings), host=host, port=port, log_level="info", access_log=True)
