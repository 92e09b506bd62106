"""The method arena: one feedback source through every method that can use it, with a matched
budget, then one `evaluate` stage per method and seed, side by side with the no-training
conditions (base, feedback in the prompt, MemPrompt memory).

An arena file is an ordinary pipeline file (its `stages:` produce the feedback) plus an
`arena:` block. `expand` turns it into an ordinary pipeline, adding

    views                feedback_views over the c3po_data stage (verbal), span_views over the
                         qa-feedback file (spans): the same examples for every method
    <method>_s<seed>     one training stage per method (or variant) and seed: budget + settings
    eval_base            evaluate: base / in_context / memory (their replies are reused below)
    eval_<method>_s<seed>  evaluate: that adapter, on the held-out prompts

and, when `arena.grid` tunes a method, in place of its `<method>_s<seed>`:

    validation           (verbal) validation_split: c3po_data's training rows into fit + validation;
                         (spans) span_views keeps the validation questions out of the views itself
    <m>_g<k>_s<seed>     grid point k trained on the fit part
    val_<m>_g<k>_s<seed> evaluate: point k on the validation prompts only
    select_<m>_s<seed>   arena_select: the best point by validation score; its adapter goes on to
                         eval_<m>_s<seed>, the only stage of the method that sees held-out prompts

Selection is a stage rather than a choice made between two runs so that the run stays one static
graph: skipping, resuming, Ray scheduling, `heedful status` and lineage work unchanged, and the
choice is on disk beside the adapter (stages/arena_select.py has the rule). With a grid every
method, tuned or not, trains on the same fit part (the same examples). A failing method (or grid
point) blocks only its own evaluation. `collect` reads the finished run into the arena table
(`arena.json`, `arena.csv`; with a grid, `grid` lists every point's validation scores);
`report_section` draws it in report.html.
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
SOURCES = ("verbal", "users", "spans", "custom")
#: how each method reads each feedback source: input name -> reference ({train}/{views}/{users} filled in;
#: {train} is the c3po_data rows trained on: `<data>.train`, or its fit part when a grid is tuned)
WIRING: dict[str, dict[str, dict[str, str]]] = {
    "verbal": {
        "dpo": {"preferences": "{views}.preferences"},
        "coh": {"preferences": "{views}.preferences"},
        "cut": {"judgments": "{views}.judgments"},
        "kto": {"feedback": "{views}.unpaired"},
        "c3po": {"data": "{train}"},
        "sft": {"data": "{train}"},
    },
    "users": {
        "dpo": {"preferences": "{users}.preferences"},
        "coh": {"preferences": "{users}.preferences"},
        "cut": {"feedback": "{users}.verbal_feedback"},
        "kto": {"feedback": "{users}.reactions"},
        "sft": {"preferences": "{users}.preferences"},
    },
    "spans": {
        "dpo": {"preferences": "{views}.preferences"},
        "coh": {"preferences": "{views}.preferences"},
        "cut": {"judgments": "{views}.judgments"},
        "kto": {"feedback": "{views}.unpaired"},
        "sft": {"preferences": "{views}.preferences"},
    },
    "custom": {},
}
#: every method that can use the source (those whose stage is not installed are left out)
DEFAULT_METHODS = {
    "verbal": ["dpo", "kto", "c3po", "cut", "coh", "sft"],
    "users": ["dpo", "kto", "cut", "coh", "sft"],
    "spans": ["dpo", "kto", "cut", "coh", "sft"],
    "custom": [],
}
#: the validation metric a grid is tuned on, per source (arena.select_by changes it)
SELECT_BY = {"verbal": "adherence", "spans": "ref_loglik"}
#: metrics the evaluate stage measures only with drift on (teacher-forced on reference answers)
DRIFT_METRICS = ("kl_to_base", "ref_loglik")
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
COST_FIELDS = [
    "train_seconds",
    "steps",
    "samples_per_second",
    "tokens_per_second",
    "peak_memory_mb",
    "eval_seconds",
    "tuning_seconds",
]


class Variant(BaseModel):
    """A method under its own name with settings of its own, e.g. dpo_rpo: {method: dpo, settings: {rpo_alpha: 1.0}}."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="the stage type it trains with")
    settings: dict[str, Any] = Field(default_factory=dict, description="on top of the budget and the method's settings")


class ArenaSpec(BaseModel):
    """The `arena:` block of an arena file."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["verbal", "users", "spans", "custom"] = Field(
        default="verbal",
        description="verbal: a c3po_data stage; users: a simulate stage; spans: a qa-feedback file; custom: give every input",
    )
    data: str | None = Field(default=None, description="verbal: the c3po_data stage's name")
    users: str | None = Field(default=None, description="users: the simulate stage's name")
    spans: str | None = Field(default=None, description="spans: the qa-feedback file (a path or data:...)")
    methods: list[str] | None = Field(default=None, description="default: every method that can use the source, and the variants")
    variants: dict[str, Variant] = Field(default_factory=dict, description="more rows: a method under another name and settings")
    seeds: list[int] = Field(default_factory=lambda: [0])
    budget: dict[str, Any] = Field(default_factory=dict, description="training settings every method gets (max_steps, lora, ...)")
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per method: its own settings")
    grid: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per method or variant: setting -> values to tune on the validation split"
    )
    validation: float = Field(
        default=0.25, gt=0, lt=1, description="with a grid: share of the training prompts kept out of training to tune on"
    )
    select_by: str | None = Field(default=None, description="validation metric a grid is tuned on (verbal: adherence)")
    inputs: dict[str, dict[str, str]] = Field(default_factory=dict, description="per method: extra or replaced inputs")
    prompts: str | None = Field(default=None, description="held-out prompts (verbal default: <data>.eval_prompts)")
    needs: str | None = Field(default=None, description="held-out information needs for simulated users")
    memory: str | None = Field(default=None, description="prompts the feedback was given on (verbal default: <data>.train)")
    views: dict[str, Any] = Field(default_factory=dict, description="verbal/spans: the views stage's `with`")
    conditions: list[str] = Field(default_factory=lambda: ["base", "in_context", "memory"])
    evaluate: dict[str, Any] = Field(default_factory=dict, description="every evaluate stage's `with`")
    evaluate_inputs: dict[str, str] = Field(
        default_factory=dict, description="extra evaluate inputs (reward models, general set)"
    )


def stage_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest (the listed order)."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(
    data: dict[str, Any], methods: list[str] | None = None, seeds: list[int] | None = None, file: str = "<arena>"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline dict, plan) from an arena file's dict; `methods`/`seeds` override the file's.

    Stages added (see the module docstring): `views` (verbal, spans), `validation` (verbal with a
    grid), `eval_base`, and per method (or variant) and seed either `<m>_s<seed>` or, with a grid,
    `<m>_g<k>_s<seed>` + `val_<m>_g<k>_s<seed>` per point and `select_<m>_s<seed>`; then
    `eval_<m>_s<seed>` on the held-out prompts.
    """
    from stages.arena_select import MAX_POINTS

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
    listed = ", ".join(sorted(map(str, names))) or "none"
    tuned = bool(spec.grid)
    if tuned and spec.source not in SELECT_BY:
        raise problem(
            "grid",
            f"a grid is tuned on a validation split of the training prompts, which the arena makes for sources "
            f"{' and '.join(SELECT_BY)}; source '{spec.source}' has none yet (drop arena.grid)",
        )
    select_by = spec.select_by or SELECT_BY.get(spec.source, "adherence")
    if select_by not in TABLE_METRICS and not select_by.startswith("reward/"):
        raise problem("select_by", f"unknown metric '{select_by}': one of {', '.join(TABLE_METRICS)} or reward/<kind>")
    fill: dict[str, str | None] = {}  # None only when some stage has no name (None is then in `names`)
    validation_inputs: dict[str, str] = {}
    added: list[dict[str, Any]] = []
    if spec.source == "verbal":
        if spec.data not in names:
            raise problem("data", f"source verbal needs `data:` naming the c3po_data stage (stages: {listed})")
        train = f"{spec.data}.train"
        if tuned:  # held out by c3po_data; validation taken from its training rows only
            added.append(
                {
                    "name": "validation",
                    "uses": "validation_split",
                    "inputs": {"data": train},
                    "with": {"fraction": spec.validation},
                }
            )
            train = "validation.fit"
            validation_inputs = {"prompts": "validation.validation"}
        fill = {"data": spec.data, "views": "views", "train": train}
        added.append({"name": "views", "uses": "feedback_views", "inputs": {"data": train}, "with": spec.views})
    elif spec.source == "users":
        if spec.users not in names:
            raise problem("users", f"source users needs `users:` naming the simulate stage (stages: {listed})")
        fill = {"users": spec.users}
    elif spec.source == "spans":
        if not spec.spans:
            raise problem("spans", "source spans needs `spans:` naming the qa-feedback file (e.g. data/qa_feedback.json)")
        if "validation_fraction" in spec.views:
            raise problem("views.validation_fraction", "set arena.validation instead (used only with a grid)")
        views_with = {**spec.views, "validation_fraction": spec.validation if tuned else 0.0}
        added.append({"name": "views", "uses": "span_views", "inputs": {"qa_feedback": spec.spans}, "with": views_with})
        fill = {"views": "views"}
        validation_inputs = {"prompts": "views.validation_prompts", "general": "views.validation_answers"}
    for stage in added:
        if stage["name"] in names:
            raise problem("source", f"the arena adds a stage named '{stage['name']}': rename your stage of that name")
    stages += added

    def uses_of(arm: str) -> str:
        return spec.variants[arm].method if arm in spec.variants else arm

    for name, variant in spec.variants.items():
        if registry.get(name) is not None:
            raise problem(f"variants.{name}", f"'{name}' is a method's own name: give the variant another (e.g. {name}_v2)")
        if registry.get(variant.method) is None:
            raise problem(
                f"variants.{name}.method", f"unknown method '{variant.method}' (stage types: {', '.join(registry.names())})"
            )
    if spec.methods:
        chosen = spec.methods
    else:  # every installed method that can use the source, then the variants
        chosen = [m for m in DEFAULT_METHODS[spec.source] if registry.get(m) is not None] + list(spec.variants)
    if not chosen:
        raise problem("methods", "no methods: list them (e.g. [dpo, kto])")
    for arm in chosen:
        method = uses_of(arm)
        if registry.get(method) is None:
            raise problem(
                "methods",
                f"unknown method '{arm}' (stage types: {', '.join(registry.names())}; variants: {', '.join(spec.variants) or 'none'})",
            )
        if method not in WIRING[spec.source] and method not in spec.inputs:
            raise problem(
                "methods",
                f"method '{method}' cannot use source '{spec.source}' on its own: give its inputs under arena.inputs.{method}",
            )
    for method in list(spec.method_settings) + list(spec.inputs):  # settings of methods left out by --methods are kept idle
        if registry.get(method) is None:
            raise problem(f"method_settings.{method}", f"unknown method '{method}'")
    points_of: dict[str, list[dict[str, Any]]] = {}
    for arm, grid in spec.grid.items():
        cls = registry.get(uses_of(arm))
        if cls is None:
            raise problem(f"grid.{arm}", f"unknown method or variant '{arm}'")
        for key, values in grid.items():
            if key not in cls.Config.model_fields:
                raise problem(f"grid.{arm}.{key}", f"{uses_of(arm)} has no setting '{key}'")
            if not values:
                raise problem(f"grid.{arm}.{key}", "list at least one value")
        points_of[arm] = grid_points(grid)
        if len(points_of[arm]) > MAX_POINTS:
            raise problem(f"grid.{arm}", f"{len(points_of[arm])} points; at most {MAX_POINTS} per method")

    prompts = spec.prompts or {"verbal": f"{spec.data}.eval_prompts", "spans": "views.eval_prompts"}.get(spec.source)
    memory = spec.memory or (f"{spec.data}.train" if spec.source == "verbal" else None)
    eval_inputs = {k: v for k, v in {"prompts": prompts, "needs": spec.needs}.items() if v}
    if spec.source == "spans":
        eval_inputs["general"] = "views.eval_answers"  # ref_loglik: the corrected answers to held-out questions
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
    # a grid point is scored on the validation prompts only: the held-out ones are not among its inputs
    rm_inputs = {k: v for k, v in spec.evaluate_inputs.items() if k not in ("prompts", "needs", "general", "memory")}
    validation_with = {**spec.evaluate, "conditions": ["adapter"], "drift": select_by in DRIFT_METRICS}
    plan_methods = []
    for arm in chosen:
        method = uses_of(arm)
        cls = registry.get(method)
        assert cls is not None  # every chosen method was checked against the registry above
        fields = set(cls.Config.model_fields)
        wiring = {k: v.format(**fill) for k, v in WIRING[spec.source].get(method, {}).items()}
        wiring.update(spec.inputs.get(method, {}))
        base_settings = {k: copy.deepcopy(v) for k, v in spec.budget.items() if k in fields}
        base_settings.update(copy.deepcopy(spec.method_settings.get(method, {})))
        if arm in spec.variants:
            base_settings.update(copy.deepcopy(spec.variants[arm].settings))
        for seed in spec.seeds:
            name = stage_name(arm, seed)
            settings = copy.deepcopy(base_settings)
            if "trainer_args" in fields:  # the seed of this arm (initialisation, data order)
                settings["trainer_args"] = {**settings.get("trainer_args", {}), "seed": seed, "data_seed": seed}
            arm_plan: dict[str, Any] = {"method": arm, "uses": method, "seed": seed, "label": name}
            if arm in points_of:
                select = f"select_{name}"
                select_inputs: dict[str, str] = {}
                grid_plan = []
                for k, point in enumerate(points_of[arm]):
                    point_name = f"{arm}_g{k}_s{seed}"
                    stages.append({"name": point_name, "uses": method, "inputs": wiring, "with": {**settings, **point}})
                    stages.append(
                        {
                            "name": f"val_{point_name}",
                            "uses": "evaluate",
                            "inputs": {**validation_inputs, **rm_inputs, "adapter": f"{point_name}.adapter"},
                            "with": {**validation_with, "label": point_name},
                        }
                    )
                    select_inputs[f"validation_{k}"] = f"val_{point_name}.summary"
                    select_inputs[f"adapter_{k}"] = f"{point_name}.adapter"
                    grid_plan.append({"point": k, "settings": point, "stage": point_name, "validation": f"val_{point_name}"})
                stages.append(
                    {
                        "name": select,
                        "uses": "arena_select",
                        "inputs": select_inputs,
                        "with": {"metric": select_by, "settings": points_of[arm]},
                    }
                )
                adapter = f"{select}.adapter"
                arm_plan.update(stage=select, grid=grid_plan)
            else:
                stages.append({"name": name, "uses": method, "inputs": wiring, "with": settings})
                adapter = f"{name}.adapter"
                arm_plan["stage"] = name
            stages.append(
                {
                    "name": f"eval_{name}",
                    "uses": "evaluate",
                    "inputs": {**eval_inputs, "adapter": adapter, "reference": "eval_base.evaluation"},
                    "with": {**spec.evaluate, "conditions": ["adapter"], "label": name},
                }
            )
            arm_plan["evaluation"] = f"eval_{name}"
            plan_methods.append(arm_plan)
    data["stages"] = stages
    plan = {
        "source": spec.source,
        "methods": plan_methods,
        "baseline": "eval_base",
        "conditions": list(spec.conditions),
        "budget": spec.budget,
        "seeds": spec.seeds,
        "variants": {k: v.model_dump() for k, v in spec.variants.items()},
        "tuning": {"validation": spec.validation, "select_by": select_by} if tuned else None,
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
    """The arena table of a run: one row per no-training condition and per method (or variant) and
    seed; with a grid, each row is the chosen point and `grid` lists every point's validation scores."""
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
                "chosen": None,
                "metrics": metrics or {},
                "cost": {"eval_seconds": (base or {}).get("cost", {}).get("evaluation_seconds")},
            }
        )
    grids = []
    for arm in plan["methods"]:
        label = arm.get("label", arm["stage"])
        points = arm.get("grid") or []
        train_state, train_error = chain_status([p["stage"] for p in points] + [p["validation"] for p in points], status)
        if train_state == "done":
            train_state, train_error = status(arm["stage"])
        eval_state, eval_error = status(arm["evaluation"])
        # a failed or blocked stage's folder may hold an older run's results: those are not this run's
        result = summary(arm["evaluation"]) if train_state == "done" and eval_state == "done" else None
        state = train_state if train_state != "done" else ("done" if result else f"evaluation {eval_state}")
        metrics = (result or {}).get("conditions", {}).get(label, {})
        training = (result or {}).get("cost", {}).get("training") or {}
        cost = {
            "train_seconds": training.get("seconds"),
            "steps": training.get("steps"),
            "samples_per_second": training.get("samples_per_second"),
            "tokens_per_second": training.get("tokens_per_second"),
            "peak_memory_mb": training.get("peak_memory_mb"),
            "eval_seconds": (result or {}).get("cost", {}).get("evaluation_seconds"),
            "tuning_seconds": None,
        }
        chosen = None
        if points:
            grid = grid_entry(run, arm, label, status, summary)
            grids.append(grid)
            if grid["chosen"] is not None and state == "done":
                point = points[grid["chosen"]]
                chosen = {"point": point["point"], "settings": point["settings"], "stage": point["stage"]}
                cost.update(training_cost(run.manifest(point["stage"]) or {}))
            cost["tuning_seconds"] = grid["tuning_seconds"]
        rows.append(
            {
                "condition": label,
                "method": arm["method"],
                "seed": arm["seed"],
                "status": state,
                "error": train_error or eval_error,
                "chosen": chosen,
                "metrics": metrics,
                "cost": cost,
            }
        )
    table: dict[str, Any] = {"source": plan["source"], "budget": plan.get("budget", {}), "rows": rows}
    if plan.get("tuning"):
        table["tuning"] = plan["tuning"]
        table["grid"] = grids
    return table


def chain_status(names: list[str], status) -> tuple[str, str | None]:
    """The first failure among `names` (with its error), else the first that is not done, else done."""
    states = [(name, *status(name)) for name in names]
    for _, state, error in states:
        if state == "failed":
            return state, error
    for name, state, error in states:
        if state != "done":
            return state, error or f"{name}: {state}"
    return "done", None


def training_cost(manifest: dict[str, Any]) -> dict[str, Any]:
    """A training stage's cost from its manifest (the fields the evaluate stage reports)."""
    metrics = manifest.get("metrics", {})
    return {
        "train_seconds": manifest.get("timings", {}).get("seconds"),
        "steps": metrics.get("steps"),
        "samples_per_second": metrics.get("train_samples_per_second"),
        "tokens_per_second": metrics.get("train_tokens_per_second"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
    }


def grid_entry(run, arm: dict[str, Any], label: str, status, summary) -> dict[str, Any]:
    """One arm's grid: every point's settings, status and validation metrics, and the chosen point
    (as the select stage recorded it: None until it ran)."""
    from .artifacts import read_json

    select = run.stage_dir(arm["stage"]) / "selection"
    selection = read_json(select) if status(arm["stage"])[0] == "done" and select.is_file() else None
    points, tuning = [], 0.0
    for point in arm["grid"]:
        state, error = chain_status([point["stage"], point["validation"]], status)
        validation = summary(point["validation"]) if state == "done" else None
        for stage in (point["stage"], point["validation"]):
            tuning += ((run.manifest(stage) or {}).get("timings") or {}).get("seconds") or 0.0
        points.append(
            {
                "point": point["point"],
                "settings": point["settings"],
                "stage": point["stage"],
                "status": state,
                "error": error,
                "validation": (validation or {}).get("conditions", {}).get(point["stage"], {}),
            }
        )
    return {
        "condition": label,
        "method": arm["method"],
        "seed": arm["seed"],
        "metric": (selection or {}).get("metric"),
        "rule": (selection or {}).get("rule"),
        "chosen": (selection or {}).get("chosen"),
        "tuning_seconds": round(tuning, 3),
        "points": points,
    }


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
    header = ["condition", "method", "seed", "status", "chosen"]
    for m in names:
        header += [m, f"{m}_lo", f"{m}_hi", f"{m}_n"]
    writer.writerow(header + COST_FIELDS + ["error"])
    for row in table["rows"]:
        line = [row["condition"], row["method"] or "", "" if row["seed"] is None else row["seed"], row["status"]]
        line.append(json.dumps(row["chosen"]["settings"]) if row.get("chosen") else "")
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
            f"<tr><td>{html.escape(row['condition'])}{chosen_note(row)}</td>"
            f"<td class={state.split()[0]}{note}>{html.escape(state)}</td>{cells}</tr>"
        )
    parts = [
        f"<h2>Arena ({html.escape(table['source'])} feedback)</h2>"
        f"<p>value [95% interval] n per method and condition; ↑ higher is better, ↓ lower. Budget: "
        f"<code>{html.escape(json.dumps(table['budget']))}</code>. A failed method's row shows its status "
        f"(hover for the error); the others are unaffected.</p>",
        f"<table><tr><th>condition</th><th>status</th>{head}</tr>{''.join(body)}</table>",
    ]
    if table.get("grid"):
        parts.append(grid_section(table))
    for x, y, title in (
        ("overgen_out", "adherence", "adherence vs out-of-scope firing (up and left is better)"),
        ("overgen_near", "adherence", "adherence vs near-scope firing (up and left is better)"),
        ("kl_to_base", "first_reply_satisfied", "satisfaction vs drift (up and left is better)"),
        ("kl_to_base", "ref_loglik", "reference (corrected) answers' log-likelihood vs drift (up and left is better)"),
    ):
        figure = pareto_figure(table, x, y, title)
        if figure:
            parts.append(figure)
    parts.append(side_by_side(Path(run_root)))
    return "\n".join(parts)


def chosen_note(row: dict[str, Any]) -> str:
    """Under a tuned row's name: the grid setting it was chosen with."""
    if not row.get("chosen"):
        return ""
    text = ", ".join(f"{k}={v}" for k, v in row["chosen"]["settings"].items())
    return f"<br><small>chosen: {html.escape(text)}</small>"


def grid_section(table: dict[str, Any]) -> str:
    """Every grid point's validation scores; the chosen one in bold. Held-out numbers are in the table above only."""
    from stages.evaluate import arrow, fmt_estimate

    tuning = table["tuning"]
    parts = [
        f"<h3>Tuning grid</h3><p>Each method's grid points were trained on the training prompts less a validation "
        f"share of {tuning['validation']:.0%} and scored on that share only; the point with the best validation "
        f"<code>{html.escape(tuning['select_by'])}</code> is the row above (ties: lower overgeneralization, then fewer "
        f"unfinished replies, then the first listed). The held-out prompts were used for the chosen point only.</p>"
    ]
    for grid in table["grid"]:
        names = [m for m in TABLE_METRICS if any(m in p["validation"] for p in grid["points"])]
        head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)
        body = []
        for point in grid["points"]:
            settings = html.escape(", ".join(f"{k}={v}" for k, v in point["settings"].items()))
            if point["point"] == grid["chosen"]:
                settings = f"<b>{settings} (chosen)</b>"
            cells = "".join(f"<td>{html.escape(fmt_estimate(point['validation'].get(m)))}</td>" for m in names)
            body.append(f"<tr><td>{settings}</td><td>{html.escape(point['status'])}</td>{cells}</tr>")
        parts.append(
            f"<p><b>{html.escape(grid['condition'])}</b> (tuning took {_num(grid['tuning_seconds']) or '–'} s)</p>"
            f"<table><tr><th>setting</th><th>status</th>{head}</tr>{''.join(body)}</table>"
        )
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
        chosen = row.get("chosen")
        out.add_row(
            row["condition"] + (" (" + ", ".join(f"{k}={v}" for k, v in chosen["settings"].items()) + ")" if chosen else ""),
            row["status"],
            *[fmt_estimate(row["metrics"].get(m)) for m in names],
            _num(row["cost"].get("train_seconds")) or "-",
        )
    console.print(out)
