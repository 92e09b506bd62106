"""`heedful loop FILE` runs the closed loop's rounds; `heedful loop status FILE` shows them.

One command with a `status` form (as `heedful deploy rollback`) rather than a typer group, so
the common call stays `heedful loop configs/loop.yaml` with the options after it.
"""

from __future__ import annotations

from pathlib import Path

import typer


def loop(
    target: str = typer.Argument(..., help="loop YAML (docs/loop.md), or 'status'"),
    loop_file: Path | None = typer.Argument(None, help="with 'status': the loop YAML or its runs folder"),
    rounds: int | None = typer.Option(None, help="stop after N rounds (default: the file's; 1 without --every)"),
    min_new_feedback: int | None = typer.Option(None, help="a round starts when K new records arrived (default: the file's)"),
    every: str | None = typer.Option(None, help="keep checking for new feedback at this interval, e.g. 10m"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. loop.gate.rules.0.min=0.5"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders live"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run stages in this process (debugging)"),
):
    """The closed loop: pull served feedback, train, evaluate, gate, hot-deploy; round after round."""
    from .cli import _on_event, console
    from .loop import Loop, LoopFile, parse_duration

    if target == "status":
        if loop_file is None:
            raise typer.BadParameter("give the loop YAML or its runs folder: heedful loop status configs/loop.yaml")
        print_status(loop_file, runs_dir)
        return
    spec_file = LoopFile(Path(target), set_)
    interval = parse_duration(every if every is not None else spec_file.spec.every)
    limit = rounds if rounds is not None else spec_file.spec.rounds
    if limit is None and interval is None:
        limit = 1
    runner = Loop(spec_file, runs_dir, use_ray=not no_ray, address=address, on_event=_on_event)
    try:
        done = runner.run(limit, min_new_feedback or spec_file.spec.min_new_feedback, interval, log=console.print)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun to resume the round where it stopped[/]")
        raise typer.Exit(130) from None
    finally:
        from .loop_report import write_loop_report

        page = write_loop_report(runner.root)
    for entry in done:
        console.print(f"round {entry['round']} ({entry['run']}): {entry.get('outcome')}")
    print_status(Path(target), runs_dir)
    if page is not None:
        console.print(f"report:  {page}")


def print_status(target: Path, runs_dir: Path) -> None:
    from rich.table import Table

    from .cli import console
    from .loop import STATE_FILE, LoopFile, status_rows

    if (target / STATE_FILE).is_file():
        root = target
    else:
        root = Path(runs_dir).resolve() / LoopFile(target).name
    if not (root / STATE_FILE).is_file():
        console.print(f"no loop state at {root / STATE_FILE}: no round has started")
        return
    table = Table(title=f"loop {root.name}", title_justify="left")
    rows = status_rows(root)
    rewards = any(row["rewards"] for row in rows)  # a column only for loops that refresh reward models
    withdrawn = any(row["withdrawn"] for row in rows)  # ... and only for loops whose annotators withdrew answers
    cols = (
        "round",
        "phase",
        "records",
        "quarantined",
        *(("withdrawn",) if withdrawn else ()),
        "before",
        "trained",
        *(("rewards",) if rewards else ()),
    )
    for col in (*cols, "gate", "deployed", "after"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            str(row["round"]),
            str(row["phase"]),
            str(row["records"]),
            str(row["quarantined"]),
            *((str(row["withdrawn"] or "-"),) if withdrawn else ()),
            str(row["version_before"] or "-"),
            str(row["trained"] or "-"),
            *((str(row["rewards"] or "-"),) if rewards else ()),
            str(row["gate"] or "-"),
            {True: "yes", False: "no", None: "-"}[row["deployed"]],
            str(row["version_after"] or "-"),
        )
    console.print(table)
