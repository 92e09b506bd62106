"""The arena table: a finished (or partly finished) arena run read into rows, `arena.json` and `arena.csv`.

Why apart from the plan (pipeline/arena.py): the plan decides which stages run, the table only
reads what they left on disk (the plan file, manifests, evaluate summaries), so it can be
rebuilt at any time, from any run folder, without the arena file.

Rows: one per no-training condition (base, in_context, memory) and per method (or variant) and
seed. With several seeds a method also gets an **aggregate** row (`table["aggregates"]`):
    rates (a share of yes/no outcomes: adherence, firing, unfinished, satisfaction)
        pooled over the seeds (successes and n summed) with the Wilson interval of the pooled share;
    means (KL, log-likelihood, repeated n-grams, length and length vs the base, win rate, rewards)
        the n-weighted mean of the seeds' means, with the envelope of their 95% intervals (lowest
        lo, highest hi): wider than either seed's, so seed-to-seed spread is not hidden; no
        envelope (NaN bounds) when a seed has no interval (its values all alike: stats.no_spread);
    bare numbers (length_vs_base of older runs) the mean over seeds.
Each aggregate estimate also lists `per_seed` values and their `seed_min`/`seed_max`, because a
pooled interval counts replies, not seeds: with two seeds, the spread is the honest check.
Single-seed runs have no aggregates (their table is unchanged).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .evaluation.summary import FLAT_ORDER
from .stats import finite_number

PLAN_FILE = "arena_plan.json"
#: the no-training conditions the other rows are paired with item by item, each under its row key:
#: the base model, and the feedback in the prompt (what a trained method has to beat as well). A
#: reference is paired only with those listed before it (in_context with the base).
REFERENCES = {"base": "vs_base", "in_context": "vs_in_context"}
#: a chained arm (a variant with `after`, e.g. sft_ppo) is also paired with the arm it continued,
#: seed by seed (`vs_start`): did the second method improve on the adapter it was given?
START = "vs_start"
#: every paired row key, in the order the views show them
PAIRED = (*REFERENCES.values(), START)
#: metrics built with `pipeline.stats.rate` (Wilson): their counts can be pooled over seeds
RATES = {"adherence", "overgen_near", "overgen_out", "first_reply_satisfied", "satisfied", "unfinished"}
COST_FIELDS = [
    "train_seconds",
    "steps",
    "samples_per_second",
    "tokens_per_second",
    "peak_memory_mb",
    "eval_seconds",
    "tuning_seconds",
]


def collect(run_root: Path) -> dict[str, Any] | None:
    """The arena table of a run: one row per no-training condition and per method (or variant) and
    seed; with a grid, each row is the chosen point and `grid` lists every point's validation scores;
    with several seeds, `aggregates` has one row per method (module docstring); with two trained
    rows of a seed or more, `head_to_head` pairs them (pipeline/arena_head_to_head.py)."""
    collected = collect_with_items(run_root)
    return None if collected is None else collected[0]


def collect_with_items(run_root: Path) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]] | None:
    """`collect`'s table and every finished row's items by condition (`paired_items`: the yes/no
    outcomes and scores per held-out item that paired comparisons read)."""
    from .arena_head_to_head import head_to_head
    from .artifacts import RunDir, read_json
    from .evaluation.summary import read_summary

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

    def summary(name: str) -> dict[str, Any] | None:
        return read_summary(run_root / name) if run.manifest(name) else None

    rows = []
    base_state, base_error = status(plan["baseline"])
    base = summary(plan["baseline"]) if base_state == "done" else None
    references = {name: paired_items(base, name) for name in REFERENCES}
    items = {}  # every finished row's, for the head-to-head and `heedful compare`
    for condition in plan["conditions"]:
        metrics = (base or {}).get("conditions", {}).get(condition)
        if base is not None and metrics is None:
            continue  # skipped by the evaluate stage (e.g. memory without remembered prompts)
        items[condition] = paired_items(base, condition)
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
                **versus(condition, base, references),
            }
        )
    grids = []
    outcomes: dict[str, dict[str, dict[str, bool]]] = {}  # each arm's, for the seed means' pairing
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
        outcomes[label] = paired_items(result, label)
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
                "cost": cost,  # a chained arm's (variant `after`) is its own stage's; the arm it started from has a row
                **({"after": arm["after"]} if arm.get("after") else {}),
                **versus(label, result, references),
            }
        )
    for row in rows:
        if row.get("after") and (paired := paired_with(outcomes.get(row["condition"]) or {}, outcomes.get(row["after"]) or {})):
            row[START] = paired
    table: dict[str, Any] = {"source": plan["source"], "budget": plan.get("budget", {}), "rows": rows}
    if plan.get("tuning"):
        table["tuning"] = plan["tuning"]
        table["grid"] = grids
    aggregates = aggregate_seeds(rows, outcomes, references)
    if aggregates:
        table["aggregates"] = aggregates
    items.update({row["condition"]: outcomes[row["condition"]] for row in rows if row["status"] == "done" and row["method"]})
    if pairs := head_to_head(rows, items):
        table["head_to_head"] = pairs
    return table, items


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


# ----------------------------------------------------------------------------- seeds


def directed(metric: str, paired: dict[str, Any]) -> dict[str, Any]:
    """A paired difference with `better` / `worse`: the items that moved the right / wrong way for
    this metric (turned no is better for a lower-is-better rate: firing, unfinished)."""
    from .evaluation.summary import LOWER_IS_BETTER

    up, down = paired["turned_yes"], paired["turned_no"]
    better, worse = (down, up) if metric in LOWER_IS_BETTER else (up, down)
    return {**paired, "better": better, "worse": worse}


def paired_items(summary: dict[str, Any] | None, condition: str) -> dict[str, dict[str, Any]]:
    """A condition's items by metric from an evaluation summary: its yes/no outcomes and its scores
    (reward/<kind>, ref_loglik; summaries of evaluate v5 on), what `paired_with` compares."""
    summary = summary or {}
    outcomes = (summary.get("outcomes") or {}).get(condition) or {}
    return {**outcomes, **((summary.get("scores") or {}).get(condition) or {})}


def is_score(metric: str) -> bool:
    """A score (the summary's `scores`: reward/<kind>, ref_loglik) rather than a yes/no outcome:
    compared by its mean difference, not as a rate."""
    return metric == "ref_loglik" or metric.startswith("reward/")


def versus(condition: str, summary: dict[str, Any] | None, references: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"vs_base": {metric: paired difference}, "vs_in_context": ...} of a condition's yes/no outcomes
    against each reference's (REFERENCES) on the same items (pipeline.stats.paired_difference), with
    `better` / `worse`: the items that moved the right / wrong way (turned no is better for a
    lower-is-better rate: firing, unfinished). None against itself or a reference listed after it,
    nor without outcomes (summaries written before evaluate v2, a reference not evaluated)."""
    outcomes = paired_items(summary, condition)
    out = {}
    for reference, key in REFERENCES.items():
        if reference == condition:
            break
        if paired := paired_with(outcomes, references.get(reference) or {}):
            out[key] = paired
    return out


def paired_with(outcomes: dict[str, dict[str, bool]], against: dict[str, dict[str, bool]]) -> dict[str, Any]:
    """{metric: paired difference with better / worse} of one condition's item outcomes against
    another's, for each metric both have on at least one shared item: a rate's difference for yes/no
    outcomes (`paired_difference`), the mean difference for scores (`paired_score_difference`)."""
    from .stats import paired_difference, paired_score_difference

    compared = {
        metric: paired_score_difference([items], against[metric])
        if is_score(metric)
        else paired_difference(items, against[metric])
        for metric, items in outcomes.items()
        if metric in against and any(k in against[metric] for k in items)
    }
    return {metric: directed(metric, d) for metric, d in compared.items() if d["n"]}  # no finite score shared: nothing to say


def aggregate_seeds(
    rows: list[dict[str, Any]],
    outcomes: dict[str, dict[str, dict[str, bool]]] | None = None,
    references: dict[str, dict[str, dict[str, bool]]] | None = None,
) -> list[dict[str, Any]]:
    """One aggregate row per method (or variant) run with two seeds or more, over its finished seeds
    (status `done` when all are, else `k/n seeds done`); none for single-seed methods. With each
    row's item `outcomes` (by condition) and the references' (REFERENCES), the row has `vs_base` and
    `vs_in_context` too: the seed mean against each item by item (`seeds_versus`)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] is not None:
            by_method.setdefault(row["method"], []).append(row)
    out = []
    for method, seed_rows in by_method.items():
        if len(seed_rows) < 2:
            continue
        done = [r for r in seed_rows if r["status"] == "done"]
        names = [m for m in metric_order({m for r in done for m in r["metrics"]}) if m != "memory_retrieved"]
        metrics = {}
        for name in names:
            merged = aggregate_metric(name, [r["metrics"].get(name) for r in done])
            if merged is not None:
                metrics[name] = merged
        cost = {}
        for field in COST_FIELDS:
            values = [r["cost"].get(field) for r in done if isinstance(r["cost"].get(field), (int, float))]
            cost[field] = sum(values) / len(values) if values else None
        errors = [f"seed {r['seed']}: {r['error']}" for r in seed_rows if r.get("error")]
        # a chained arm's rows name the stage each seed started from (sft_s0, sft_s1): the aggregate names the arm
        after = sorted({r["after"].removesuffix(f"_s{r['seed']}") for r in seed_rows if r.get("after")})
        out.append(
            {
                "condition": f"{method} (mean over seeds {', '.join(str(r['seed']) for r in done) or 'none done'})",
                "method": method,
                "seeds": [r["seed"] for r in done],
                "seed": None,
                "status": "done" if len(done) == len(seed_rows) else f"{len(done)}/{len(seed_rows)} seeds done",
                "error": "; ".join(errors) or None,
                "chosen": None,
                "metrics": metrics,
                "cost": cost,
                **({"after": ", ".join(after)} if after else {}),
                **seeds_versus([(outcomes or {}).get(r.get("condition", "")) or {} for r in done], references or {}),
            }
        )
    return out


def seeds_versus(per_seed: list[dict[str, dict[str, bool]]], references: dict[str, dict[str, dict[str, bool]]]) -> dict[str, Any]:
    """{"vs_base": {metric: ...}, "vs_in_context": ...} of a method's finished seeds against each
    reference on the same items: each item's share of seeds that said yes less the reference's
    (`pipeline.stats.paired_mean_difference`: Newcombe's interval on the seed-averaged table, an exact
    permutation test), `better`
    / `worse` by the metric's direction; {} with fewer than two seeds' outcomes."""
    from .stats import paired_mean_difference, paired_score_difference

    if len(per_seed) < 2:
        return {}
    out = {}
    for reference, key in REFERENCES.items():
        against = references.get(reference) or {}
        compared = {
            metric: (paired_score_difference if is_score(metric) else paired_mean_difference)(
                [o[metric] for o in per_seed], against[metric]
            )
            for metric in against
            if all(o.get(metric) for o in per_seed)
        }
        paired = {metric: directed(metric, d) for metric, d in compared.items() if d["n"]}  # no shared item: nothing to say
        if paired:
            out[key] = paired
    return out


def aggregate_metric(name: str, values: list[Any]) -> dict[str, Any] | float | None:
    """One metric over seeds (module docstring): pooled Wilson for rates, n-weighted mean and the
    envelope of the seeds' intervals for means, the mean for bare numbers; None if no seed has it."""
    from .stats import wilson

    estimates = [v for v in values if isinstance(v, dict) and finite_number(v.get("value")) and v.get("n")]
    if not estimates:
        numbers = [float(v) for v in values if finite_number(v)]
        return sum(numbers) / len(numbers) if numbers else None
    per_seed = [e["value"] for e in estimates]
    n = sum(int(e["n"]) for e in estimates)
    if name in RATES:
        successes = sum(round(e["value"] * e["n"]) for e in estimates)
        out = {**wilson(successes, n), "interval": "wilson, pooled over seeds"}
    else:
        mean = sum(e["value"] * e["n"] for e in estimates) / n
        los = [e["lo"] for e in estimates if finite_number(e.get("lo"))]
        his = [e["hi"] for e in estimates if finite_number(e.get("hi"))]
        if len(los) == len(his) == len(estimates):
            lo, hi, interval = min(los + [mean]), max(his + [mean]), "envelope of the seeds' 95% intervals"
        else:  # a seed without an interval: an envelope of the others would be narrower than the truth
            lo, hi, interval = math.nan, math.nan, "none: a seed has no interval (its values all alike)"
        out = {"value": mean, "n": n, "lo": lo, "hi": hi, "interval": interval}
    return {**out, "seeds": len(estimates), "per_seed": per_seed, "seed_min": min(per_seed), "seed_max": max(per_seed)}


# ----------------------------------------------------------------------------- outputs


def metric_order(present: set[str]) -> list[str]:
    """`present` in the evaluate summary's order (pipeline/evaluation/summary.py), the rest sorted after."""
    ordered = [m for m in FLAT_ORDER if m in present]
    return ordered + sorted(present - set(ordered))


def metric_names(table: dict[str, Any]) -> list[str]:
    """The table's metric columns (memory_retrieved, a per-scope diagnostic, left out)."""
    return metric_order({m for row in table["rows"] for m in row["metrics"] if m != "memory_retrieved"})


def paired_names(table: dict[str, Any], key: str = "vs_base") -> list[str]:
    """The metrics some row has a paired comparison for under `key` (one of PAIRED)."""
    return metric_order({m for row in display_rows(table) for m in row.get(key) or {}})


def fmt_paired(d: dict[str, Any] | None) -> str:
    """'+0.17 [+0.04, +0.29] 10 better, 2 worse, p = 0.04' for a paired difference ('[no interval]'
    where every item's difference was alike: stats.no_spread); '–' for none."""
    if not d or d.get("value") is None or not finite_number(d["value"]):
        return "–"
    if finite_number(d.get("lo")) and finite_number(d.get("hi")):
        interval = f"[{d['lo']:+.2f}, {d['hi']:+.2f}]"
    else:
        interval = "[no interval]"
    return f"{d['value']:+.2f} {interval} {d['better']} better, {d['worse']} worse, p = {d['p']:.2g}"


def display_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the order every view shows them: conditions, then per method its aggregate (when it
    has several seeds) followed by its seeds' rows."""
    aggregates = {a["method"]: a for a in table.get("aggregates") or []}
    out, shown = [], set()
    for row in table["rows"]:
        method = row["method"]
        if method in aggregates and method not in shown:
            out.append(aggregates[method])
            shown.add(method)
        out.append(row)
    return out


def write_outputs(run_root: Path) -> dict[str, Any] | None:
    """arena.json and arena.csv (one column per metric, its lo/hi/n beside it, then cost). An
    aggregate row has the seeds it pooled in the `seed` column (e.g. `0+1`). With trained rows
    paired head to head, head_to_head.csv too (one line per pair and metric)."""
    from .arena_head_to_head import CSV_FILE, csv_text
    from .artifacts import atomic_write_json, atomic_write_text
    from .stats import clean

    table = collect(run_root)
    if table is None:
        return None
    atomic_write_json(Path(run_root) / "arena.json", clean(table))
    header, rows = table_rows(table)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([num(cell) for cell in row] for row in rows)
    atomic_write_text(Path(run_root) / "arena.csv", out.getvalue())
    if (pairs := csv_text(table)) is not None:
        atomic_write_text(Path(run_root) / CSV_FILE, pairs)
    else:
        (Path(run_root) / CSV_FILE).unlink(missing_ok=True)  # an older run's pairs are not this table's
    return table


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of arena.csv, cells unformatted (numbers stay numbers, for trackers): per
    metric its value, lo, hi and n; an aggregate row has the seeds it pooled as `seed` (`0+1`)."""
    names = metric_names(table)
    paired = [(key, m) for key in PAIRED for m in paired_names(table, key)]
    header = ["condition", "method", "seed", "status", "chosen"]
    for m in names:
        header += [m, f"{m}_lo", f"{m}_hi", f"{m}_n"]
    for key, m in paired:
        header += [f"{m}_{key}{part}" for part in ("", "_lo", "_hi", "_better", "_worse", "_p")]
    rows = []
    for row in display_rows(table):
        seed = "+".join(map(str, row["seeds"])) if "seeds" in row else row["seed"]
        line = [row["condition"], row["method"] or "", seed, row["status"]]
        line.append(json.dumps(row["chosen"]["settings"]) if row.get("chosen") else "")
        for m in names:
            value = row["metrics"].get(m)
            if isinstance(value, dict):
                line += [value.get("value"), value.get("lo"), value.get("hi"), value.get("n")]
            else:
                line += [value, None, None, None]
        for key, m in paired:
            d = (row.get(key) or {}).get(m) or {}
            line += [d.get(k) for k in ("value", "lo", "hi", "better", "worse", "p")]
        line += [row["cost"].get(f) for f in COST_FIELDS]
        rows.append(line + [(row["error"] or "")[:300]])
    return header + COST_FIELDS + ["error"], rows


def num(value: Any) -> str:
    """A cell: 6 significant digits for floats, '' for nothing (or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
