"""`heedful simulate ...`: evaluate the simulator, and let it annotate an Argilla dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, cast

import typer
from rich.console import Console

app = typer.Typer(help="ConvSim simulated users: quality checks and simulated annotators.", no_args_is_help=True)
console = Console(highlight=False)


def _simulator(backend: str, model: str, base_url: str | None, api_key_file: str | None, cache: bool):
    from pipeline.llm import LLMSettings, build_client
    from pipeline.llm_cache import CachedLLM, LLMCache
    from pipeline.paths import cache_dir

    settings = LLMSettings(kind=backend, model=model, base_url=base_url, api_key_file=api_key_file, batch_size=16)
    store = LLMCache(cache_dir() / "convsim.sqlite") if cache else None
    return CachedLLM(build_client(settings), store)


def _default_clariq() -> Path:
    from pipeline.paths import data_dir

    shared = os.environ.get("HEEDFUL_SHARED_DATA")
    return (Path(shared) if shared else data_dir().parent.parent / "shared" / "data") / "clariq" / "train.tsv"


@app.command("eval-cq")
def eval_clarifying_answers(
    data: Path = typer.Option(None, help="ClariQ TSV (default: ../shared/data/clariq/train.tsv)"),
    n: int = typer.Option(64, help="rows to sample"),
    seed: int = typer.Option(0),
    backend: str = typer.Option("hf", help="hf or openai"),
    model: str = typer.Option("smollm2-135m"),
    base_url: str | None = typer.Option(None),
    api_key_file: str | None = typer.Option(None),
    out: Path | None = typer.Option(None, help="write the result JSON here"),
    cache: bool = typer.Option(True, help="reuse cached generations"),
):
    """Simulator answers to ClariQ clarifying questions vs the real users' answers (MiniLM similarity),
    next to a baseline that answers with the information need verbatim."""
    from serving.embedder import MiniLMEmbedder

    from .quality import clariq_questions, evaluate_clarifying_answers

    path = data or _default_clariq()
    rows = clariq_questions(path, n, seed)
    result = evaluate_clarifying_answers(rows, _simulator(backend, model, base_url, api_key_file, cache), MiniLMEmbedder(), seed)
    result["data"] = str(path)
    console.print(f"{result['rows']} ClariQ clarifying questions, simulator {result['simulator']}:")
    console.print(
        f"  similarity to the real answer, simulator:        {result['similarity_simulator']:.3f} "
        f"± {result['similarity_simulator_stderr']:.3f}"
    )
    console.print(
        f"  similarity to the real answer, need verbatim:    {result['similarity_need_verbatim']:.3f} "
        f"± {result['similarity_need_verbatim_stderr']:.3f}"
    )
    console.print(f"  simulator closer than the baseline on {100 * result['simulator_wins']:.0f}% of rows")
    if result["polarity_agreement"] is not None:
        console.print(
            f"  yes/no agrees with the real user on {100 * result['polarity_agreement']:.0f}% of "
            f"{result['polarity_rows']} yes/no answers (majority class: "
            f"{100 * result['polarity_majority_baseline']:.0f}%)"
        )
    if out:
        from pipeline.artifacts import atomic_write_json

        atomic_write_json(out, result)
        console.print(f"written to {out}")


@app.command("annotate")
def annotate_dataset(
    dataset: str = typer.Argument(..., help="Argilla dataset name (reaction or verbal template)"),
    kind: str = typer.Option(..., help="reaction or verbal"),
    needs: Path | None = typer.Option(None, help="needs JSONL (id/prompt -> need, keywords) for grounding"),
    workspace: str | None = typer.Option(None),
    api_url: str | None = typer.Option(None, envvar="HEEDFUL_ARGILLA_API_URL"),
    api_key_file: Path | None = typer.Option(
        None, envvar="HEEDFUL_ARGILLA_API_KEY_FILE", help="the simulator's own Argilla annotator key (mode 0600)"
    ),
    model: str = typer.Option("smollm2-135m"),
    limit: int | None = typer.Option(None),
    seed: int = typer.Option(0),
):
    """Answer pending records of an Argilla dataset as a simulated annotator (the annotate hook)."""
    import argilla as rg

    from feedback.argilla_annotate import annotate
    from pipeline.llm import read_key_file

    from .protocol import Judge

    if kind not in ("reaction", "verbal"):
        raise typer.BadParameter("kind must be reaction or verbal")
    client = (
        rg.Argilla(api_url=api_url, api_key=read_key_file(api_key_file, "--api-key-file")) if api_url and api_key_file else None
    )
    simulator = _simulator("hf", model, None, None, True)
    checked_kind = cast('Literal["reaction", "verbal"]', kind)  # validated above
    annotator = build_annotator(simulator, Judge(simulator).calibrate(), checked_kind, needs, seed)
    done = annotate(dataset, annotator, client=client, workspace=workspace, limit=limit)
    console.print(f"simulated annotator submitted {done} responses to {dataset}")


def build_annotator(simulator, judge, kind: Literal["reaction", "verbal"], needs_path: Path | None, seed: int = 0):
    """A SimulatedAnnotator grounded in a needs JSONL (looked up by id and by prompt text)."""
    from pipeline.records import load_rows

    from .annotators import SimulatedAnnotator

    needs = {}
    if needs_path:
        for row in load_rows(needs_path, required=["need"], what="needs"):
            entry = {"need": row["need"], "facts": row.get("keywords") or []}
            for key in (row.get("id"), row.get("prompt")):
                if key:
                    needs[str(key)] = entry
    return SimulatedAnnotator(simulator, judge, kind, needs, seed=seed)
