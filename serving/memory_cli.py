"""`heedful memory ...`: inspect, seed, prune and export the MemPrompt memory; run the stream evaluation."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="The MemPrompt memory: list, add, remove, share, import, export, stats, eval.", no_args_is_help=True)
console = Console(highlight=False)

MemoryOpt = typer.Option(None, "--memory", "-m", help="memory file (default ~/.cache/heedful/memory/memory.db)")


def _path(memory: Path | None) -> Path:
    from .service import default_memory_path

    return (memory or default_memory_path()).expanduser()


def _store(memory: Path | None, must_exist: bool = True):
    from pipeline.errors import HeedfulError

    from .store import MemoryStore

    path = _path(memory)
    if must_exist and not path.is_file():
        raise HeedfulError(f"{path}: no memory file (start `heedful serve --memory {path}` or `heedful memory add`)")
    return MemoryStore(path)


def _retriever(memory: Path | None):
    from .embedder import MiniLMEmbedder
    from .retrieval import Retriever
    from .store import MemoryStore

    path = _path(memory)
    embedder = MiniLMEmbedder()
    store = MemoryStore(path, embedder_name=embedder.name, dim=embedder.dim)
    return Retriever(store, embedder)


@app.command("list")
def list_entries(memory: Path | None = MemoryOpt, limit: int = typer.Option(50), user: str | None = None):
    """Memory entries, oldest first."""
    store = _store(memory)
    table = Table(title=f"{store.count()} entries in {store.path}", title_justify="left")
    for col in ("id", "key query", "clarification", "user", "shared", "hits", "model/adapter"):
        table.add_column(col)
    for e in store.entries(limit=limit, user=user):
        table.add_row(
            str(e.id),
            e.key_query[:60],
            e.clarification[:60],
            e.user or "-",
            "yes" if e.shared else "-",
            str(e.hits),
            (e.adapter or e.model or "-")[-30:],
        )
    console.print(table)


@app.command()
def add(
    query: str = typer.Option(..., "--query", help="the misunderstood request"),
    clarification: str = typer.Option(..., "--clarification", help="what the user meant"),
    user: str | None = typer.Option(None, help="owner: only this user's requests retrieve it"),
    shared: bool = typer.Option(False, "--shared", help="every user's requests may retrieve it"),
    memory: Path | None = MemoryOpt,
):
    """Add one clarification (embedded now). On a several-user server give --user or --shared."""
    from .prompting import clean_text

    text = clean_text(clarification)
    if not text:
        raise typer.BadParameter("clarification is empty", param_hint="--clarification")
    entry = _retriever(memory).add(query, text, user=user, shared=shared)
    console.print(f"added memory entry {entry.id}")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="JSONL/JSON/CSV rows with key_query and clarification"), memory: Path | None = MemoryOpt
):
    """Bulk-add clarifications; rows are validated first (file:line on error), then added in one transaction."""
    from pipeline.records import load_rows

    from .prompting import clean_text

    rows = load_rows(file, required=["key_query", "clarification"], what="memory entries")
    for i, row in enumerate(rows):
        if not str(row["clarification"]).strip() or not str(row["key_query"]).strip():
            from pipeline.errors import DataError

            raise DataError(f"{file} row {i}: key_query and clarification must be non-empty")
    retriever = _retriever(memory)
    clean = [
        {
            "key_query": str(r["key_query"]),
            "clarification": clean_text(str(r["clarification"])),
            "user": r.get("user"),
            "shared": bool(r.get("shared", False)),
        }
        for r in rows
    ]
    vectors = retriever.embed([r["key_query"] for r in clean])
    ids = retriever.store.add_many(clean, vectors)
    console.print(f"imported {len(ids)} entries into {retriever.store.path}")


@app.command()
def remove(entry_id: int = typer.Argument(...), memory: Path | None = MemoryOpt):
    """Deactivate an entry (kept for the record, never retrieved again)."""
    from pipeline.errors import HeedfulError

    if not _store(memory).remove(entry_id):
        raise HeedfulError(f"no active memory entry {entry_id}")
    console.print(f"removed memory entry {entry_id}")


@app.command()
def share(
    entry_id: int = typer.Argument(...),
    memory: Path | None = MemoryOpt,
    undo: bool = typer.Option(False, "--undo", help="back to its owner only"),
    force: bool = typer.Option(False, "--force", help="share even what the quarantine check flags"),
):
    """Let every user's requests retrieve this entry (shared memory is curated by whoever runs the server)."""
    from feedback.quarantine import instruction_findings
    from pipeline.errors import HeedfulError

    store = _store(memory)
    entry = store.get([entry_id]).get(entry_id)
    if entry is None:
        raise HeedfulError(f"no active memory entry {entry_id}")
    findings = [] if undo else instruction_findings(entry.clarification, clarification=True)
    if findings and not force:
        raise HeedfulError(
            f"entry {entry_id} reads like an instruction, not a clarification ({'; '.join(findings)}); "
            "look at it with `heedful memory list`, then --force to share it anyway"
        )
    store.share(entry_id, not undo)
    console.print(f"memory entry {entry_id} is {'no longer ' if undo else ''}shared with every user")


@app.command()
def stats(memory: Path | None = MemoryOpt):
    """Counts: entries, hits, conversations, feedback by kind."""
    for key, value in _store(memory).stats().items():
        console.print(f"{key:18s} {value}")


@app.command()
def export(
    to: Path = typer.Option(..., "--to", help="destination folder"),
    memory: Path | None = MemoryOpt,
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified", help="keep feedback from a server that ran without a token"
    ),
):
    """Write reactions / verbal_feedback / preferences / followups datasets for the next training round.

    Feedback passes the quarantine first; what it holds back is in TO/quarantine/quarantine.jsonl.
    """
    from feedback.quarantine import QuarantineSettings

    from .export import export_memory

    counts = export_memory(_path(memory), to, QuarantineSettings(allow_unverified=allow_unverified))
    console.print(f"exported to {to}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@app.command("eval")
def eval_(
    model: str = typer.Option("smollm2-135m", "--model"),
    adapter: Path | None = typer.Option(None, "--adapter"),
    tasks: str = typer.Option(
        "data:memprompt/wordnet_stream.jsonl", "--tasks", help="wordnet_raw-style JSONL (meta.word1/word2, type)"
    ),
    n: int = typer.Option(200, "--n", help="queries in the stream"),
    seed: int = typer.Option(0, "--seed"),
    clarify_prob: float = typer.Option(1.0, "--clarify-prob", help="chance the simulated user clarifies"),
    threshold: float = typer.Option(0.9, "--threshold"),
    key_mask: str | None = typer.Option("<[^>]*>", "--key-mask", help="'' for none"),
    conditions: str = typer.Option("no_memory,memory,oracle", "--conditions", help="comma-separated: no_memory, memory, oracle"),
    max_tokens: int = typer.Option(12, "--max-tokens"),
    engine: str = typer.Option("auto", "--engine", help="as `heedful serve --engine`: auto, hf, ct2, hf+ct2"),
    out: Path | None = typer.Option(None, "--out", help="write per-query results and the summary here (JSON)"),
):
    """Streaming evaluation: accuracy over a query stream with memory vs. without (simulated user)."""
    from pipeline.paths import resolve_data_ref

    from .stream_eval import StreamEvalSettings, run_stream_eval

    path = resolve_data_ref(tasks) if tasks.startswith("data:") else Path(tasks)
    settings = StreamEvalSettings(
        model=model,
        adapter=str(adapter) if adapter else None,
        n=n,
        seed=seed,
        clarify_prob=clarify_prob,
        threshold=threshold,
        key_mask=key_mask or None,
        conditions=[c.strip() for c in conditions.split(",") if c.strip()],
        max_tokens=max_tokens,
        engine=engine,
    )
    report = run_stream_eval(path, settings, out=out, progress=lambda m: console.print(m))
    console.print_json(data=report["summary"])
    if out is not None:
        from .stream_eval import plot_stream

        console.print(f"results: {out}, plot: {plot_stream(report['results'], out.with_suffix('.png'))}")
