"""`heedful`: run pipelines and single stages, inspect runs, export adapters."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, DataError, HeedfulError, is_user_error

app = typer.Typer(
    help="heedful: feedback-driven alignment on Ray.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
models_app = typer.Typer(help="Model aliases and the local model cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(highlight=False)

#: optional command groups contributed by other packages: (module, attribute, name)
SUBCOMMANDS = [
    ("feedback.argilla_cli", "app", "argilla"),
    ("serving.cli", "serve", "serve"),
    ("serving.memory_cli", "app", "memory"),
    ("serving.users_cli", "app", "users"),
    ("serving.deploy_cli", "deploy_command", "deploy"),
    ("pipeline.loop_cli", "loop", "loop"),
    ("ray_jobs.cli", "submit_app", "submit"),
    ("ray_jobs.cli", "jobs_app", "jobs"),
    ("feedback.simulator.cli", "app", "simulate"),
    ("pipeline.trace", "trace", "trace"),
]

ICONS = {
    "done": "[green]✓[/]",
    "skipped": "[dim]↷[/]",
    "failed": "[red]✗[/]",
    "blocked": "[red]⊘[/]",
    "interrupted": "[yellow]‖[/]",
    "started": "[cyan]▶[/]",
}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _key_metrics(metrics: dict[str, Any], n: int = 4) -> str:
    preferred = ["pairs", "responses", "last_loss", "rewards/margins", "rewards/accuracies", "files", "accuracy", "auroc"]
    keys = [k for k in preferred if k in metrics] + [k for k in metrics if k not in preferred]
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys[:n])


def _on_event(kind: str, record, text: str) -> None:
    if kind == "started":
        console.print(f"{ICONS['started']} {text} started")
        return
    line = f"{ICONS.get(kind, '?')} {record.name} ({record.uses}) {kind}"
    if kind == "done":
        line += f" in {record.seconds:.1f}s" + (" (resumed)" if record.resumed else "")
    elif kind == "skipped":
        line += ": up to date"
    console.print(line)
    if kind in ("failed", "blocked") and text:
        tail = "\n".join(text.strip().splitlines()[-12:])
        console.print(f"[red]{tail}[/]", markup=True)


def _summary(result, pipeline) -> None:
    table = Table(title=f"run {pipeline.config.run_name}", title_justify="left")
    for col in ("stage", "uses", "status", "time", "metrics"):
        table.add_column(col)
    for r in result.records:
        style = {"done": "green", "skipped": "dim", "failed": "red", "blocked": "red"}.get(r.status, "")
        table.add_row(
            r.name,
            r.uses,
            f"[{style}]{r.status}[/]" if style else r.status,
            f"{r.seconds:.1f}s" if r.seconds else "-",
            r.error or _key_metrics(r.metrics),
        )
    console.print(table)
    root = result.run_dir
    for stage in pipeline.stages:
        for out_name, out in stage.cls.outputs.items():
            if out.kind == "export" and (root / stage.name / out_name).exists():
                console.print(f"adapter: [bold]{root / stage.name / out_name}[/]")
    console.print(f"report:  {root / 'report.html'}")
    console.print(f"total {result.seconds:.1f}s; `heedful status {root}` for details")


def _run(pipeline, runs_dir: Path, no_ray: bool, address: str | None, force: list[str]) -> None:
    from .report import build_report
    from .runner import Runner

    for name in force:
        if name not in {s.name for s in pipeline.stages}:
            raise HeedfulError(f"--force {name}: no such stage")
    runner = Runner(pipeline, runs_dir, use_ray=not no_ray, address=address, force=set(force), on_event=_on_event)
    try:
        result = runner.execute()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: finished stages are kept; rerun to resume[/]")
        raise typer.Exit(130) from None
    build_report(result.run_dir)
    _summary(result, pipeline)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def run(
    pipeline_file: Path = typer.Argument(..., help="pipeline YAML"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. stages.align.with.max_steps=2"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders live"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run stages in this process (debugging)"),
    force: list[str] = typer.Option([], help="rerun this stage (and its dependents) even if up to date"),
):
    """Run a pipeline: skip up-to-date stages, run the rest as Ray tasks."""
    from .config import load_pipeline

    pipeline = load_pipeline(pipeline_file, set_)
    _run(pipeline, runs_dir, no_ray, address, force)


@app.command()
def arena(
    arena_file: Path = typer.Argument(..., help="arena YAML: a pipeline plus an `arena:` block (docs/arena.md)"),
    methods: str | None = typer.Option(None, help="comma-separated methods, e.g. dpo,c3po (default: the file's)"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds, e.g. 0,1 (default: the file's)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. arena.budget.max_steps=2 or stages.dpo_s0.with.beta=0.2"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders live"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run stages in this process (debugging)"),
    force: list[str] = typer.Option([], help="rerun this stage (and its dependents) even if up to date"),
):
    """One feedback through several methods with a matched budget, evaluated side by side (arena.json/csv, report)."""
    from .arena import run_arena

    run_arena(arena_file, methods, seeds, set_, runs_dir, address, no_ray, force)


@app.command()
def compare(
    run_ref: str = typer.Argument(..., help="arena run name or folder, e.g. arena_spans or runs/arena_spans"),
    a: str = typer.Argument(..., help="a row of its table, e.g. cut_s0 (or base, in_context, memory)"),
    b: str = typer.Argument(..., help="the row to compare it with, e.g. sft_s0"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders live"),
):
    """Two rows of an arena run on the same held-out items: A less B per metric, its 95% interval, items better / worse, p."""
    from .arena_head_to_head import compare as paired

    try:
        result = paired(_resolve_run(run_ref, runs_dir), a, b)
    except ValueError as e:
        from rich.markup import escape

        console.print(f"[red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None
    from .arena_report import print_comparison

    print_comparison(console, result)


@app.command()
def validate(pipeline_file: Path, set_: list[str] = typer.Option([], "--set")):
    """Check a pipeline (or an arena or loop file, expanded) and its input files without running anything."""
    import yaml

    from .config import load_pipeline
    from .record_schemas import check_pipeline_inputs

    try:
        data = yaml.safe_load(Path(pipeline_file).read_text())
    except (OSError, yaml.YAMLError):
        data = None  # load_pipeline reports the problem with file and line
    if isinstance(data, dict) and "arena" in data:
        from .arena import load_arena

        pipeline, _ = load_arena(pipeline_file, overrides=set_)
    elif isinstance(data, dict) and "loop" in data:
        from .loop import LoopFile, full_round

        pipeline = full_round(LoopFile(pipeline_file, set_))
    else:
        pipeline = load_pipeline(pipeline_file, set_)
    check_pipeline_inputs(pipeline)
    files = sum(1 for s in pipeline.stages for ref in s.inputs.values() if ref.stage is None)
    console.print(
        f"[green]ok[/]: {len(pipeline.stages)} stages: "
        + " → ".join(s.name for s in pipeline.stages)
        + f" ({files} input file{'s' if files != 1 else ''} checked)"
    )


@app.command()
def stage(
    name: str = typer.Argument(..., help="stage type, e.g. dpo (see `heedful stages`)"),
    config: Path = typer.Option(..., "--config", "-c", help="stage YAML: model, with, inputs (paths)"),
    run_name: str | None = typer.Option(None, help="run folder name (default: <stage>-adhoc)"),
    runs_dir: Path = typer.Option(Path("runs")),
    address: str | None = typer.Option(None),
    no_ray: bool = typer.Option(False, "--no-ray"),
    force: bool = typer.Option(False, help="rerun even if up to date"),
):
    """Run one stage alone; its inputs are given as paths in the stage YAML."""
    from .config import build_pipeline
    from .yaml_source import YamlSource

    source = YamlSource.load(config)
    data = source.data if isinstance(source.data, dict) else {}
    allowed = {"uses", "model", "seed", "with", "inputs", "resources", "run_name"}
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError([source.problem((unknown[0],), f"unknown key: expected one of {', '.join(sorted(allowed))}")])
    if data.get("uses", name) != name:
        raise ConfigError([source.problem(("uses",), f"file is for stage type '{data['uses']}', command asked for '{name}'")])
    pipeline_data = {
        "run_name": run_name or data.get("run_name") or f"{name}-adhoc",
        "model": data.get("model", "smollm2-135m"),
        "seed": data.get("seed", 0),
        "stages": [
            {
                "name": name,
                "uses": name,
                "with": data.get("with") or {},
                "inputs": data.get("inputs") or {},
                "resources": data.get("resources") or {},
            }
        ],
    }
    lines = {("stages", 0) + k: v for k, v in source.lines.items() if k and k[0] in ("with", "inputs", "resources")}
    lines.update({k: v for k, v in source.lines.items() if k and k[0] in ("model", "seed", "run_name")})
    try:
        pipeline = build_pipeline(YamlSource(pipeline_data, lines, str(config)), config.resolve().parent, [], config)
    except ConfigError as exc:
        for p in exc.problems:
            object.__setattr__(p, "path", p.path.replace("stages[0].", ""))
        raise
    _run(pipeline, runs_dir, no_ray, address, [name] if force else [])


def _resolve_run(run_ref: str, runs_dir: Path) -> Path:
    path = Path(run_ref)
    if (path / "pipeline.json").is_file() or (path / "run.json").is_file():
        return path
    if (runs_dir / run_ref).is_dir():
        return runs_dir / run_ref
    raise HeedfulError(f"no run '{run_ref}' (looked for {path} and {runs_dir / run_ref})")


@app.command()
def status(run_ref: str = typer.Argument(..., help="run name or folder"), runs_dir: Path = typer.Option(Path("runs"))):
    """Which stages are done, skipped, failed or interrupted, with timings."""
    from .artifacts import RunDir, read_json

    root = _resolve_run(run_ref, runs_dir)
    run_dir = RunDir(root)
    meta = read_json(root / "pipeline.json") if (root / "pipeline.json").is_file() else {"order": [], "fingerprints": {}}
    last = run_dir.last_invocation() or {"stages": []}
    last_by_name = {s["name"]: s for s in last.get("stages", [])}
    table = Table(
        title=f"run {root.name} (last invocation {last.get('started', '-')}, {last.get('seconds', 0):.1f}s)", title_justify="left"
    )
    for col in ("stage", "uses", "last run", "time", "outputs", "finished", "note"):
        table.add_column(col)
    for name in meta["order"]:
        manifest = run_dir.manifest(name) or {}
        rec = last_by_name.get(name, {})
        state = rec.get("status", "done" if manifest else "not run")
        note = rec.get("error") or ""
        kept = run_dir.staging_fingerprint(name)
        log_path = run_dir.log_path(name)
        if state == "failed" and str(log_path) not in note:  # a failed attempt is not offered as resumable
            note = (note + "; " if note else "") + f"log: {log_path.relative_to(root).as_posix()}"
        elif kept is not None and state == "interrupted" and kept == meta["fingerprints"].get(name):
            note = (note + "; " if note else "") + "interrupted attempt kept (rerun resumes)"
        seconds = manifest.get("timings", {}).get("seconds") if state == "skipped" else rec.get("seconds")
        table.add_row(
            name,
            manifest.get("uses", rec.get("uses", "")),
            state,
            f"{seconds:.1f}s" if seconds else "-",
            ", ".join(manifest.get("outputs", {})) or "-",
            manifest.get("timings", {}).get("finished", "-"),
            note,
        )
    console.print(table)
    if last.get("status") in ("running", "interrupted", "failed"):
        console.print(f"run status: {last['status']}")


@app.command()
def export(
    run_ref: str = typer.Argument(..., help="run name or folder"),
    to: Path = typer.Option(..., "--to", help="destination folder"),
    stage_name: str | None = typer.Option(None, "--stage", help="which stage's adapter (default: the last one)"),
    merge: bool = typer.Option(False, help="also write a merged full model under merged/"),
    runs_dir: Path = typer.Option(Path("runs")),
):
    """Copy a run's adapter out as a PEFT folder with model card and lineage."""
    from .artifacts import RunDir, read_json
    from .export import export_adapter

    root = _resolve_run(run_ref, runs_dir)
    run_dir = RunDir(root)
    order = read_json(root / "pipeline.json")["order"] if (root / "pipeline.json").is_file() else []
    candidates = []
    for name in order:
        manifest = run_dir.manifest(name)
        if not manifest:
            continue
        for out in manifest.get("outputs", {}).values():
            if out["kind"] == "adapter":
                candidates.append((name, run_dir.stage_dir(name) / out["path"]))
    if stage_name:
        candidates = [c for c in candidates if c[0] == stage_name]
    if not candidates:
        raise HeedfulError(
            f"run {root.name} has no finished stage with an adapter output" + (f" named '{stage_name}'" if stage_name else "")
        )
    name, adapter = candidates[-1]
    dest = export_adapter(adapter, to, merge=merge, name=f"{root.name}-{name}")
    console.print(f"exported [bold]{name}[/] adapter to {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))


@app.command("stages")
def list_stages():
    """Stage types you can `use`, with their inputs and outputs."""
    from . import registry

    table = Table()
    for col in ("uses", "inputs", "outputs", "what"):
        table.add_column(col)
    for name in registry.names():
        cls = registry.get(name)
        ins = ", ".join(f"{k}{'' if v.required else '?'}:{'|'.join(v.kinds)}" for k, v in cls.inputs.items())
        outs = ", ".join(f"{k}:{v.kind}" for k, v in cls.outputs.items())
        table.add_row(name, ins, outs, cls.summary)
    console.print(table)
    for module, error in registry.broken().items():
        console.print(f"not loaded: {module}: {error}", style="red", markup=False)


@models_app.command("prepare")
def models_prepare(names: list[str] = typer.Argument(None, help="aliases (default: smollm2-135m tiny)")):
    """Convert/build model aliases into the cache once (offline)."""
    from .models import resolve_model

    for name in names or ["smollm2-135m", "tiny"]:
        console.print(f"{name}: {resolve_model(name)}")


@models_app.command("list")
def models_list():
    from .models import ALIASES, models_dir

    for name, what in ALIASES.items():
        ready = (models_dir() / name / "config.json").is_file()
        console.print(f"{name:14s} {'ready' if ready else 'not prepared':13s} {what}")


@models_app.command("conversions")
def models_conversions(
    prune: bool = typer.Option(False, "--prune", help="cut the cache back to the budget now (orphans first)"),
    budget_gb: float = typer.Option(None, "--budget-gb", help="the budget for --prune (default HEEDFUL_CT2_CACHE_GB, 16)"),
):
    """The CTranslate2 conversions cached for the ct2 engine: count, size, budget; --prune to reclaim space."""
    from .ct2_cache import budget_bytes, entries, evict, gb_to_bytes
    from .paths import heedful_home

    root = heedful_home() / "ct2"
    try:
        budget = gb_to_bytes(budget_gb, "--budget-gb") if budget_gb is not None else budget_bytes()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if prune:
        removed = evict(root, budget)
        console.print(f"removed {len(removed)} conversion(s)")
    found = entries(root)
    orphans = sum(e.orphaned for e in found)
    console.print(
        f"{root}: {len(found)} conversion(s), {sum(e.size for e in found) / 1e9:.2f} GB "
        f"(budget {budget / 1e9:.2f} GB; {orphans} orphaned: their adapter is gone)",
        soft_wrap=True,
    )


def _register_subcommands() -> None:
    for module_name, attr, name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        sub = getattr(module, attr, None)
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=name)
        elif callable(sub):
            app.command(name)(sub)


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a long run (or a
    hung one) is without stopping it."""
    import faulthandler
    import signal

    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), or stderr is not a file (in-process tests)
        pass


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _stacks_on_sigusr1()
    _register_subcommands()
    try:
        app()
    except ConfigError as exc:
        console.print("[red]config error[/] (nothing was run):")
        for problem in exc.problems:
            console.print(f"  {problem}", markup=False, soft_wrap=True)
        sys.exit(2)
    except DataError as exc:
        if exc.problems:
            console.print("[red]data error[/] (nothing was run):")
            for problem in exc.problems:
                console.print(f"  {problem}", markup=False, soft_wrap=True)
        else:
            console.print(f"data error: {exc}", markup=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        if is_user_error(exc):
            console.print(f"error: {exc}", markup=False, soft_wrap=True)
            sys.exit(1)
        where = _save_traceback()
        summary = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        console.print(f"unexpected error: {summary}", markup=False, soft_wrap=True)
        console.print(
            f"full traceback in {where}" if where else "(the traceback could not be saved)", markup=False, soft_wrap=True
        )
        sys.exit(1)


def _save_traceback() -> Path | None:
    """Write the current exception's traceback to a 0600 file under the heedful cache; its path."""
    import time
    import traceback

    from .paths import heedful_home

    try:
        folder = heedful_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(traceback.format_exc())
        return path
    except OSError:
        return None


if __name__ == "__main__":
    main()
