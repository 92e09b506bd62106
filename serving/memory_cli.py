"""`heedful memory ...`: inspect, seed, prune and export the MemPrompt memory; run the stream evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="The MemPrompt memory: list, add, remove, import, export, stats, eval.", no_args_is_help=True)
console = Console(highlight=False)

MemoryOpt = typer.Option(None, "--memory", "-m", help="memory file (default ~/.cache/heedful/memory/memory.db)")


def _path(memory: Optional[Path]) -> Path:
    from .service import default_memory_path

    return (memory or default_memory_path()).expanduser()


def _store(memory: Optional[Path], must_exist: bool = True):
    from pipeline.errors import HeedfulError

    from .store import MemoryStore

    path = _path(memory)
    if must_exist and not path.is_file():
        raise HeedfulError(f"{path}: no memory file (start `heedful serve --memory {path}` or `heedful memory add`)")
    return MemoryStore(path)


def _retriever(memory: Optional[Path]):
    from .embedder import MiniLMEmbedder
    from .retrieval import Retriever
    from .store import MemoryStore

    path = _path(memory)
    embedder = MiniLMEmbedder()
    store = MemoryStore(path, embedder_name=embedder.name, dim=embedder.dim)
    return Retriever(store, embedder)


@app.command("list")
def list_entries(memory: Optional[Path] = MemoryOpt, limit: int = typer.Option(50), user: Optional[str] = None):
    """Memory entries, oldest first."""
    store = _store(memory)
    table = Table(title=f"{store.count()} entries in {store.path}", title_justify="left")
    for col in ("id", "key query", "clarification", "user", "hits", "model/adapter"):
        table.add_column(col)
    for e in store.entries(limit=limit, user=user):
        table.add_row(str(e.id), e.key_query[:60], e.clarification[:60], e.user or "-", str(e.hits),
                      (e.adapter or e.model or "-")[-30:])
    console.print(table)


@app.command()
def add(query: str = typer.Option(..., "--query", help="the misunderstood request"),
        clarification: str = typer.Option(..., "--clarification", help="what the user meant"),
        user: Optional[str] = typer.Option(None), memory: Optional[Path] = MemoryOpt):
    """Add one clarification (embedded now)."""
    from .prompting import clean_text

    text = clean_text(clarification)
    if not text:
        raise typer.BadParameter("clarification is empty", param_hint="--clarification")
    entry = _retriever(memory).add(query, text, user=user)
    console.print(f"added memory entry {entry.id}")


@app.command("import")
def import_(file: Path = typer.Argument(..., help="JSONL/JSON/CSV rows with key_query and clarification"),
            memory: Optional[Path] = MemoryOpt):
    """Bulk-add clarifications; rows are validated first (file:line on error), then added in one transaction."""
    from pipeline.records import load_rows

    from .prompting import clean_text

    rows = load_rows(file, required=["key_query", "clarification"], what="memory entries")
    for i, row in enumerate(rows):
        if not str(row["clarification"]).strip() or not str(row["key_query"]).strip():
            from pipeline.errors import DataError

            raise DataError(f"{file} row {i}: key_query and clarification must be non-empty")
    retriever = _retriever(memory)
    clean = [{"key_query": str(r["key_query"]), "clarification": clean_text(str(r["clarification"])),
              "user": r.get("user")} for r in rows]
    vectors = retriever.embed([r["key_query"] for r in clean])
    ids = retriever.store.add_many(clean, vectors)
    console.print(f"imported {len(ids)} entries into {retriever.store.path}")


@app.command()
def remove(entry_id: int = typer.Argument(...), memory: Optional[Path] = MemoryOpt):
    """Deactivate an entry (kept for the record, never retrieved again)."""
    from pipeline.errors import HeedfulError

    if not _store(memory).remove(entry_id):
        raise HeedfulError(f"no active memory entry {entry_id}")
    console.print(f"removed memory entry {entry_id}")


@app.command()
def stats(memory: Optional[Path] = MemoryOpt):
    """Counts: entries, hits, conversations, feedback by kind."""
    for key, value in _store(memory).stats().items():
        console.print(f"{key:18s} {value}")


@app.command()
def export(to: Path = typer.Option(..., "--to", help="destination folder"), memory: Optional[Path] = MemoryOpt):
    """Write reactions / verbal_feedback / preferences datasets for the next training round."""
    from .export import export_memory

    counts = export_memory(_path(memory), to)
    console.print(f"exported to {to}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@app.command("eval")
def eval_(model: str = typer.Option("smollm2-135m", "--model"),
          adapter: Optional[Path] = typer.Option(None, "--adapter"),
          tasks: str = typer.Option("data:memprompt/wordnet_stream.jsonl", "--tasks",
                                    help="wordnet_raw-style JSONL (meta.word1/word2, type)"),
          n: int = typer.Option(200, "--n", help="queries in the stream"),
          seed: int = typer.Option(0, "--seed"),
          clarify_prob: float = typer.Option(1.0, "--clarify-prob", help="chance the simulated user clarifies"),
          threshold: float = typer.Option(0.9, "--threshold"),
          key_mask: Optional[str] = typer.Option("<[^>]*>", "--key-mask", help="'' for none"),
          conditions: str = typer.Option("no_memory,memory,oracle", "--conditions",
                                         help="comma-separated: no_memory, memory, oracle"),
          max_tokens: int = typer.Option(12, "--max-tokens"),
          out: Optional[Path] = typer.Option(None, "--out", help="write per-query results and the summary here (JSON)")):
    """Streaming evaluation: accuracy over a query stream with memory vs. without (simulated user)."""
    from pipeline.paths import resolve_data_ref

    from .stream_eval import StreamEvalSettings, run_stream_eval

    path = resolve_data_ref(tasks) if tasks.startswith("data:") else Path(tasks)
    settings = StreamEvalSettings(model=model, adapter=str(adapter) if adapter else None, n=n, seed=seed,
                                  clarify_prob=clarify_prob, threshold=threshold, key_mask=key_mask or None,
                                  conditions=[c.strip() for c in conditions.split(",") if c.strip()],
                                  max_tokens=max_tokens)
    report = run_stream_eval(path, settings, out=out, progress=lambda m: console.print(m))
    console.print_json(data=report["summary"])
    if out is not None:
        from .stream_eval import plot_stream

        console.print(f"results: {out}, plot: {plot_stream(report['results'], out.with_suffix('.png'))}")
