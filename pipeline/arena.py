"""The method arena: one feedback source through every method that can use it, with a matched
budget, then one `evaluate` stage per method and seed, side by side with the no-training
conditions (base, feedback in the prompt, MemPrompt memory).

An arena file is an ordinary pipeline file (its `stages:` produce the feedback) plus an
`arena:` block. `expand` turns it into an ordinary pipeline, adding

    views                feedback_views over the c3po_data stage (source: verbal)
    <method>_s<seed>     one training stage per method and seed, budget + method settings
    eval_base            evaluate: base / in_context / memory (their replies are reused below)
    eval_<method>_s<seed>  evaluate: that adapter

so skipping, resuming, Ray scheduling and `heedful status` work as for any run, and a method
that fails blocks only its own evaluation. `collect` reads the finished run into the arena
table (`arena.json`, `arena.csv`); `report_section` draws it in report.html.
"""

from __future__ import annotations

import copy
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PLAN_FILE = "arena_plan.json"
SOURCES = ("verbal", "users", "custom")
#: how each method reads each feedback source: input name -> reference ({data}/{views}/{users} filled in)
WIRING: dict[str, dict[str, dict[str, str]]] = {
    "verbal": {
        "dpo": {"preferences": "{views}.preferences"},
        "coh": {"preferences": "{views}.preferences"},
        "cut": {"judgments": "{views}.judgments"},
        "kto": {"feedback": "{views}.unpaired"},
        "c3po": {"data": "{data}.train"},
    },
    "users": {
        "dpo": {"preferences": "{users}.preferences"},
        "coh": {"preferences": "{users}.preferences"},
        "cut": {"feedback": "{users}.verbal_feedback"},
        "kto": {"feedback": "{users}.reactions"},
    },
    "custom": {},
}
DEFAULT_METHODS = {"verbal": ["dpo", "kto", "c3po", "cut", "coh"], "users": ["dpo", "kto", "cut", "coh"], "custom": []}
#: the table's metrics, in order (each a {value, n, lo, hi} estimate or a number)
TABLE_METRICS = [
    "adherence",
    "overgen_near",
    "overgen_out",
    "first_reply_satisfied",
    "satisfied",
    "rounds",
    "kl_to_base",
    "ref_loglik",
    "unfinished",
    "repeated_ngrams",
    "length_vs_base",
    "judge_win_rate",
]
COST_FIELDS = ["train_seconds", "steps", "samples_per_second", "tokens_per_second", "peak_memory_mb", "eval_seconds"]


class ArenaSpec(BaseModel):
    """The `arena:` block of an arena file."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["verbal", "users", "custom"] = Field(
        default="verbal", description="verbal: a c3po_data stage; users: a simulate stage; custom: give every input"
    )
    data: str | None = Field(default=None, description="verbal: the c3po_data stage's name")
    users: str | None = Field(default=None, description="users: the simulate stage's name")
    methods: list[str] | None = Field(default=None, description="default: every method that can use the source")
    seeds: list[int] = Field(default_factory=lambda: [0])
    budget: dict[str, Any] = Field(default_factory=dict, description="training settings every method gets (max_steps, lora, ...)")
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per method: its own settings")
    inputs: dict[str, dict[str, str]] = Field(default_factory=dict, description="per method: extra or replaced inputs")
    prompts: str | None = Field(default=None, description="held-out prompts (verbal default: <data>.eval_prompts)")
    needs: str | None = Field(default=None, description="held-out information needs for simulated users")
    memory: str | None = Field(default=None, description="prompts the feedback was given on (verbal default: <data>.train)")
    views: dict[str, Any] = Field(default_factory=dict, description="verbal: the feedback_views stage's `with`")
    conditions: list[str] = Field(default_factory=lambda: ["base", "in_context", "memory"])
    evaluate: dict[str, Any] = Field(default_factory=dict, description="every evaluate stage's `with`")
    evaluate_inputs: dict[str, str] = Field(
        default_factory=dict, description="extra evaluate inputs (reward models, general set)"
    )


def stage_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def expand(
    data: dict[str, Any], methods: list[str] | None = None, seeds: list[int] | None = None, file: str = "<arena>"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline dict, plan) from an arena file's dict; `methods`/`seeds` override the file's."""
    from . import registry
    from .errors import ConfigError, Problem

    data = copy.deepcopy(data)
    raw = data.pop("arena", None)
    if not isinstance(raw, dict):
        raise ConfigError([Problem(file, None, "arena", "an arena file needs an `arena:` block (source, methods, budget, ...)")])
    try:
        spec = ArenaSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            [Problem(file, None, "arena." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        ) from None
    if methods:
        spec.methods = methods
    if seeds:
        spec.seeds = seeds

    def problem(path: str, message: str) -> ConfigError:
        return ConfigError([Problem(file, None, f"arena.{path}", message)])

    stages: list[dict[str, Any]] = list(data.get("stages") or [])
    names = {s.get("name") for s in stages if isinstance(s, dict)}
    fill: dict[str, str | None] = {}  # None only when some stage has no name (None is then in `names`)
    if spec.source == "verbal":
        if spec.data not in names:
            raise problem(
                "data", f"source verbal needs `data:` naming the c3po_data stage (stages: {', '.join(sorted(map(str, names)))})"
            )
        fill = {"data": spec.data, "views": "views"}
        stages.append({"name": "views", "uses": "feedback_views", "inputs": {"data": f"{spec.data}.train"}, "with": spec.views})
    elif spec.source == "users":
        if spec.users not in names:
            raise problem(
                "users", f"source users needs `users:` naming the simulate stage (stages: {', '.join(sorted(map(str, names)))})"
            )
        fill = {"users": spec.users}
    chosen = spec.methods or DEFAULT_METHODS[spec.source]
    if not chosen:
        raise problem("methods", "no methods: list them (e.g. [dpo, kto])")
    for method in chosen:
        if registry.get(method) is None:
            raise problem("methods", f"unknown method '{method}' (stage types: {', '.join(registry.names())})")
        if method not in WIRING[spec.source] and method not in spec.inputs:
            raise problem(
                "methods",
                f"method '{method}' cannot use source '{spec.source}' on its own: give its inputs under arena.inputs.{method}",
            )
    for method in list(spec.method_settings) + list(spec.inputs):  # settings of methods left out by --methods are kept idle
        if registry.get(method) is None:
            raise problem(f"method_settings.{method}", f"unknown method '{method}'")

    prompts = spec.prompts or (f"{spec.data}.eval_prompts" if spec.source == "verbal" else None)
    memory = spec.memory or (f"{spec.data}.train" if spec.source == "verbal" else None)
    eval_inputs = {k: v for k, v in {"prompts": prompts, "needs": spec.needs}.items() if v}
    eval_inputs.update(spec.evaluate_inputs)
    base_inputs = dict(eval_inputs)
    if memory and "memory" in spec.conditions:
        base_inputs["memory"] = memory
    stages.append(
        {
            "name": "eval_base",
            "uses": "evaluate",
            "inputs": base_inputs,
            "with": {**spec.evaluate, "conditions": list(spec.conditions)},
        }
    )
    plan_methods = []
    for method in chosen:
        cls = registry.get(method)
        assert cls is not None  # every chosen method was checked against the registry above
        fields = set(cls.Config.model_fields)
        wiring = {k: v.format(**fill) for k, v in WIRING[spec.source].get(method, {}).items()}
        wiring.update(spec.inputs.get(method, {}))
        for seed in spec.seeds:
            name = stage_name(method, seed)
            settings = {k: copy.deepcopy(v) for k, v in spec.budget.items() if k in fields}
            settings.update(copy.deepcopy(spec.method_settings.get(method, {})))
            if "trainer_args" in fields:  # the seed of this arm (initialisation, data order)
                settings["trainer_args"] = {**settings.get("trainer_args", {}), "seed": seed, "data_seed": seed}
            stages.append({"name": name, "uses": method, "inputs": wiring, "with": settings})
            stages.append(
                {
                    "name": f"eval_{name}",
                    "uses": "evaluate",
                    "inputs": {**eval_inputs, "adapter": f"{name}.adapter", "reference": "eval_base.evaluation"},
                    "with": {**spec.evaluate, "conditions": ["adapter"], "label": name},
                }
            )
            plan_methods.append({"method": method, "seed": seed, "stage": name, "evaluation": f"eval_{name}"})
    data["stages"] = stages
    plan = {
        "source": spec.source,
        "methods": plan_methods,
        "baseline": "eval_base",
        "conditions": list(spec.conditions),
        "budget": spec.budget,
        "seeds": spec.seeds,
    }
    return data, plan


def load_arena(
    path: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None, overrides: list[str] | None = None
):
    """The arena file at `path` as a validated Pipeline plus its plan. `--set arena.X=...`
    changes the arena block; other overrides apply to the expanded pipeline (e.g. stages.dpo_s0.with.beta)."""
    from .config import apply_override, build_pipeline
    from .yaml_source import YamlSource

    source = YamlSource.load(path)
    if not isinstance(source.data, dict):
        from .errors import ConfigError

        raise ConfigError([source.problem((), "expected a mapping with run_name, model, stages and arena")])
    arena_sets = [o for o in overrides or [] if o.startswith("arena.")]
    for assignment in arena_sets:
        apply_override(source.data, assignment)
    expanded, plan = expand(source.data, methods, seeds, str(path))
    pipeline = build_pipeline(
        YamlSource(expanded, source.lines, str(path)),
        Path(path).resolve().parent,
        [o for o in overrides or [] if o not in arena_sets],
        Path(path),
    )
    return pipeline, plan


def save_plan(run_root: Path, plan: dict[str, Any]) -> None:
    from .artifacts import atomic_write_json

    run_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_root / PLAN_FILE, plan)


# ----------------------------------------------------------------------------- the table


def collect(run_root: Path) -> dict[str, Any] | None:
    """The arena table of a run: one row per no-training condition and per method and seed."""
    from .artifacts import RunDir, read_json

    run_root = Path(run_root)
    if not (run_root / PLAN_FILE).is_file():
        return None
    plan = read_json(run_root / PLAN_FILE)
    run = RunDir(run_root)
    last = {s["name"]: s for s in (run.last_invocation() or {}).get("stages", [])}

    def status(name: str) -> tuple[str, str | None]:
        record = last.get(name)
        if record is None:
            return ("done" if run.manifest(name) else "not run"), None
        state = record.get("status", "not run")
        return ("done" if state == "skipped" else state), record.get("error")

    from stages.evaluate import read_summary

    def summary(name: str) -> dict[str, Any] | None:
        return read_summary(run_root / name) if run.manifest(name) else None

    rows = []
    base_state, base_error = status(plan["baseline"])
    base = summary(plan["baseline"]) if base_state == "done" else None
    for condition in plan["conditions"]:
        metrics = (base or {}).get("conditions", {}).get(condition)
        if base is not None and metrics is None:
            continue  # skipped by the evaluate stage (e.g. memory without remembered prompts)
        rows.append(
            {
                "condition": condition,
                "method": None,
                "seed": None,
                "status": base_state if base is None else "done",
                "error": base_error,
                "metrics": metrics or {},
                "cost": {"eval_seconds": (base or {}).get("cost", {}).get("evaluation_seconds")},
            }
        )
    for arm in plan["methods"]:
        train_state, train_error = status(arm["stage"])
        eval_state, eval_error = status(arm["evaluation"])
        # a failed or blocked stage's folder may hold an older run's results: those are not this run's
        result = summary(arm["evaluation"]) if train_state == "done" and eval_state == "done" else None
        state = train_state if train_state != "done" else ("done" if result else f"evaluation {eval_state}")
        metrics = (result or {}).get("conditions", {}).get(arm["stage"], {})
        training = (result or {}).get("cost", {}).get("training") or {}
        cost = {
            "train_seconds": training.get("seconds"),
            "steps": training.get("steps"),
            "samples_per_second": training.get("samples_per_second"),
            "tokens_per_second": training.get("tokens_per_second"),
            "peak_memory_mb": training.get("peak_memory_mb"),
            "eval_seconds": (result or {}).get("cost", {}).get("evaluation_seconds"),
        }
        rows.append(
            {
                "condition": arm["stage"],
                "method": arm["method"],
                "seed": arm["seed"],
                "status": state,
                "error": train_error or eval_error,
                "metrics": metrics,
                "cost": cost,
            }
        )
    return {"source": plan["source"], "budget": plan.get("budget", {}), "rows": rows}


def metric_names(table: dict[str, Any]) -> list[str]:
    present = {m for row in table["rows"] for m in row["metrics"] if m != "memory_retrieved"}
    ordered = [m for m in TABLE_METRICS if m in present]
    return ordered + sorted(present - set(ordered))


def write_outputs(run_root: Path) -> dict[str, Any] | None:
    """arena.json and arena.csv (one column per metric, its lo/hi/n beside it, then cost)."""
    from .artifacts import atomic_write_json, atomic_write_text
    from .stats import clean

    table = collect(run_root)
    if table is None:
        return None
    atomic_write_json(Path(run_root) / "arena.json", clean(table))
    names = metric_names(table)
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["condition", "method", "seed", "status"]
    for m in names:
        header += [m, f"{m}_lo", f"{m}_hi", f"{m}_n"]
    writer.writerow(header + COST_FIELDS + ["error"])
    for row in table["rows"]:
        line = [row["condition"], row["method"] or "", "" if row["seed"] is None else row["seed"], row["status"]]
        for m in names:
            value = row["metrics"].get(m)
            if isinstance(value, dict):
                line += [_num(value.get("value")), _num(value.get("lo")), _num(value.get("hi")), value.get("n", "")]
            else:
                line += [_num(value), "", "", ""]
        line += [_num(row["cost"].get(f)) for f in COST_FIELDS]
        writer.writerow(line + [(row["error"] or "")[:300]])
    atomic_write_text(Path(run_root) / "arena.csv", out.getvalue())
    return table


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- report


def report_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    table = collect(run_root)
    if table is None:
        return ""
    from stages.evaluate import arrow, fmt_estimate

    names = metric_names(table)
    head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)
    head += "<th>train s</th><th>steps</th><th>samples/s</th><th>peak MB</th><th>eval s</th>"
    body = []
    for row in table["rows"]:
        cells = "".join(f"<td>{html.escape(fmt_estimate(row['metrics'].get(m)))}</td>" for m in names)
        cost = row["cost"]
        cells += "".join(
            f"<td>{html.escape(_num(cost.get(f)) or '–')}</td>"
            for f in ("train_seconds", "steps", "samples_per_second", "peak_memory_mb", "eval_seconds")
        )
        state = row["status"]
        note = f' title="{html.escape(row["error"] or "")}"' if row["error"] else ""
        body.append(
            f"<tr><td>{html.escape(row['condition'])}</td><td class={state.split()[0]}{note}>{html.escape(state)}</td>{cells}</tr>"
        )
    parts = [
        f"<h2>Arena ({html.escape(table['source'])} feedback)</h2>"
        f"<p>value [95% interval] n per method and condition; ↑ higher is better, ↓ lower. Budget: "
        f"<code>{html.escape(json.dumps(table['budget']))}</code>. A failed method's row shows its status "
        f"(hover for the error); the others are unaffected.</p>",
        f"<table><tr><th>condition</th><th>status</th>{head}</tr>{''.join(body)}</table>",
    ]
    for x, y, title in (
        ("overgen_out", "adherence", "adherence vs out-of-scope firing (up and left is better)"),
        ("overgen_near", "adherence", "adherence vs near-scope firing (up and left is better)"),
        ("kl_to_base", "first_reply_satisfied", "satisfaction vs drift (up and left is better)"),
    ):
        figure = pareto_figure(table, x, y, title)
        if figure:
            parts.append(figure)
    parts.append(side_by_side(Path(run_root)))
    return "\n".join(parts)


def pareto_figure(table: dict[str, Any], x: str, y: str, title: str) -> str:
    points = []
    for row in table["rows"]:
        ex, ey = row["metrics"].get(x), row["metrics"].get(y)
        if isinstance(ex, dict) and isinstance(ey, dict) and ex.get("value") is not None and ey.get("value") is not None:
            points.append((row["condition"], ex, ey))
    if len(points) < 2:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import figure_html

    def err(e):
        v = e["value"]
        lo = e["lo"] if e.get("lo") is not None else v
        hi = e["hi"] if e.get("hi") is not None else v
        return [[max(0.0, v - lo)], [max(0.0, hi - v)]]

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, ex, ey in points:
        ax.errorbar([ex["value"]], [ey["value"]], xerr=err(ex), yerr=err(ey), fmt="o", capsize=3, label=label)
        ax.annotate(label, (ex["value"], ey["value"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{x} ↓")
    ax.set_ylabel(f"{y} ↑")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return figure_html(fig)


def side_by_side(run_root: Path, per_scope: int = 2) -> str:
    """A few held-out prompts (in-scope first) with every condition's reply."""
    from .artifacts import read_json
    from .records import load_rows

    plan = read_json(run_root / PLAN_FILE)
    replies: dict[str, dict[str, str]] = {}
    order: list[str] = []
    prompts: list[tuple[str, str]] = []
    for stage in [plan["baseline"]] + [arm["evaluation"] for arm in plan["methods"]]:
        path = run_root / stage / "evaluation"
        if not path.exists():
            continue
        for row in load_rows(path):
            if row["condition"] not in order:
                order.append(row["condition"])
            replies.setdefault(row["prompt"], {})[row["condition"]] = row["response"]
            if (row["prompt"], row["scope"]) not in prompts:
                prompts.append((row["prompt"], row["scope"]))
    if not prompts:
        return ""
    shown = []
    for scope in ("in_scope", "near_scope", "out_of_scope", "general"):
        shown += [p for p in prompts if p[1] == scope][:per_scope]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in order)
    body = "".join(
        f"<tr><td><b>{html.escape(scope)}</b>: {html.escape(prompt)}</td>"
        + "".join(f"<td>{html.escape(replies[prompt].get(c, '–'))}</td>" for c in order)
        + "</tr>"
        for prompt, scope in shown
    )
    return f"<h3>Held-out prompts, side by side</h3><table><tr><th>prompt</th>{head}</tr>{body}</table>"


# ----------------------------------------------------------------------------- command line


def parse_list(text: str | None, what: str, as_int: bool = False) -> list | None:
    from .errors import HeedfulError

    if not text:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if as_int:
        try:
            return [int(t) for t in items]
        except ValueError:
            raise HeedfulError(f"--{what} {text!r}: expected comma-separated integers, e.g. 0,1") from None
    return items


def run_arena(
    arena_file: Path,
    methods: str | None,
    seeds: str | None,
    overrides: list[str],
    runs_dir: Path,
    address: str | None,
    no_ray: bool,
    force: list[str],
) -> None:
    """`heedful arena`: expand, run as an ordinary pipeline, then write and print the arena table
    (also when a method failed: its row says so, the exit status is 1)."""
    from .cli import _run, console

    pipeline, plan = load_arena(arena_file, parse_list(methods, "methods"), parse_list(seeds, "seeds", as_int=True), overrides)
    run_root = Path(runs_dir).resolve() / pipeline.config.run_name
    save_plan(run_root, plan)
    try:
        _run(pipeline, runs_dir, no_ray, address, force)
    finally:
        table = write_outputs(run_root)
        if table is not None:
            print_table(console, table)
            console.print(f"arena:   {run_root / 'arena.csv'} and arena.json")


def print_table(console, table: dict[str, Any]) -> None:
    from rich.table import Table

    from stages.evaluate import fmt_estimate

    names = [
        m
        for m in metric_names(table)
        if m
        in ("adherence", "overgen_near", "overgen_out", "first_reply_satisfied", "kl_to_base", "unfinished", "judge_win_rate")
    ]
    out = Table(title=f"arena ({table['source']} feedback): value [95% interval] n", title_justify="left")
    for col in ["condition", "status", *names, "train s"]:
        out.add_column(col)
    for row in table["rows"]:
        out.add_row(
            row["condition"],
            row["status"],
            *[fmt_estimate(row["metrics"].get(m)) for m in names],
            _num(row["cost"].get("train_seconds")) or "-",
        )
    console.print(out)
