"""`heedful serve --model BASE [--adapter DIR] [--memory PATH]`: the MemPrompt chat server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(highlight=False, stderr=True)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    model: str = typer.Option("smollm2-135m", "--model", help="base model: alias, folder or hub id"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder (e.g. an exported run)"),
    memory: Optional[Path] = typer.Option(None, "--memory", help="memory file (default ~/.cache/heedful/memory/memory.db)"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback by default)"),
    port: int = typer.Option(8000, "--port"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="bearer token file, mode 0600"),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="model id clients send (default: --model)"),
    template: Optional[str] = typer.Option(None, "--template", help="prompt template with {query} and {clarification(s)}"),
    threshold: float = typer.Option(0.8, "--threshold", help="minimum cosine similarity for a memory hit"),
    k: int = typer.Option(1, "--k", help="clarifications attached at most"),
    key_mask: Optional[str] = typer.Option(None, "--key-mask", help="regex blanked from keys before embedding, e.g. '<[^>]*>'"),
    scope: str = typer.Option("global", "--scope", help="global | user: whose memories a request may use"),
    no_lexical: bool = typer.Option(False, "--no-lexical", help="turn off the word-overlap fallback"),
    no_memory: bool = typer.Option(False, "--no-memory", help="serve without memory (feedback is still logged)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu / cuda (default: cuda when available)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="deploy on this Ray cluster with Ray Serve"),
    replicas: int = typer.Option(1, "--replicas", help="Ray Serve replicas (with --ray-address)"),
):
    """Serve an OpenAI-compatible chat endpoint with MemPrompt memory and a feedback endpoint."""
    from pipeline.errors import HeedfulError

    from .app import TokenFileError, load_token
    from .prompting import TemplateError
    from .retrieval import RetrievalSettings
    from .service import ServeSettings, default_memory_path

    try:
        settings = ServeSettings(
            model=model, adapter=str(adapter.resolve()) if adapter else None, served_name=served_name,
            memory=str((memory or default_memory_path()).expanduser().resolve()), memory_enabled=not no_memory,
            retrieval=RetrievalSettings(threshold=threshold, k=k, key_mask=key_mask, scope=scope,
                                        lexical_fallback=not no_lexical),
            device=device, token_file=str(token_file.expanduser().resolve()) if token_file else None,
            **({"template": template} if template else {}),
        )
        if settings.token_file:
            load_token(settings.token_file)  # fail now, with the reason, not at the first request
    except (TokenFileError, TemplateError) as exc:
        raise HeedfulError(str(exc)) from None
    except ValueError as exc:  # pydantic
        raise HeedfulError(f"invalid serve settings: {exc}") from None
    if adapter and not (adapter / "adapter_config.json").is_file():
        raise HeedfulError(f"--adapter {adapter}: no adapter_config.json (expected a PEFT adapter folder)")
    if host not in LOOPBACK and not token_file:
        console.print(f"[yellow]warning:[/] binding {host} without --token-file: anyone who can reach this "
                      "machine can use the model and write to its memory")
    console.print(f"serving [bold]{settings.name}[/] on http://{host}:{port}/v1 (memory: {settings.memory}"
                  f"{', auth: bearer token' if settings.token_file else ''})")
    if ray_address:
        from .ray_app import deploy

        deploy(settings, ray_address, host, port, replicas)
        return
    import uvicorn

    from .app import build_app

    uvicorn.run(build_app(settings), host=host, port=port, log_level="info", access_log=True)
