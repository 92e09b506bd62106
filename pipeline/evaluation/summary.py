"""The evaluation's summary JSON: every metric per condition with its interval, and the cost.

Why one module owns the format: the arena's leaderboard, the run report, the quickstart's
checks and the lead's deploy gate all read this file. `build_summary` writes it,
`read_summary` and `metric_value` read it, `flat_metrics` turns it into manifest metrics.

Format (`summary` output, JSON):
    {"feedback": str | null, "metric": {...} | null,
     "adapter": {"label", "stage", "path"} | null,
     "conditions": {condition: {metric: {"value", "n", "lo", "hi"} | number | {scope: estimate}}},
     "cost": {"training": {...} | null, "evaluation_seconds", "evaluation_peak_memory_mb"},
     "counts": {scope: prompts},
     "outcomes": {condition: {metric: {item: bool}}},   yes/no metrics item by item (prompt or
         need id), for comparisons paired on the same items (the arena's `vs_base`)
     "scores": {condition: {metric: {item: float}}}}    the same for scores (reward/<kind> per
         reply, ref_loglik per reference answer)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary"
#: metrics where a lower value is better (the report marks them with ↓)
LOWER_IS_BETTER = {"overgen_near", "overgen_out", "kl_to_base", "unfinished", "repeated_ngrams", "rounds"}
#: neither: closer to the base is better
NEUTRAL = {"length", "length_vs_base"}
#: manifest order: satisfaction and adherence first (the run summary shows the first few)
FLAT_ORDER = [
    "first_reply_satisfied",
    "adherence",
    "overgen_out",
    "overgen_near",
    "satisfied",
    "rounds",
    "kl_to_base",
    "ref_loglik",
    "unfinished",
    "repeated_ngrams",
    "length",
    "length_vs_base",
    "judge_win_rate",
]


def arrow(metric: str) -> str:
    """' ↑' / ' ↓' after a metric's name: which way is better ('' when closer to the base is)."""
    return "" if metric in NEUTRAL else (" ↓" if metric in LOWER_IS_BETTER else " ↑")


def adapter_info(adapter: Path | None, label: str | None) -> dict[str, Any] | None:
    """Which adapter was evaluated, under which condition name (default: its stage folder)."""
    if adapter is None:
        return None
    from .conditions import adapter_label

    return {"label": adapter_label(adapter, label), "stage": adapter.parent.name, "path": str(adapter)}


def training_cost(adapter: Path | None) -> dict[str, Any] | None:
    """What the adapter's stage recorded: wall time, throughput, peak memory (None where absent)."""
    if adapter is None:
        return None
    manifest_path = adapter.parent / "manifest.json"
    if not manifest_path.is_file():
        return {"stage": adapter.parent.name, "note": "no manifest beside the adapter"}
    manifest = json.loads(manifest_path.read_text())
    metrics = manifest.get("metrics", {})
    return {
        "stage": manifest.get("stage"),
        "uses": manifest.get("uses"),
        "seconds": manifest.get("timings", {}).get("seconds"),
        "train_runtime": metrics.get("train_runtime"),
        "steps": metrics.get("steps"),
        "samples_per_second": metrics.get("train_samples_per_second"),
        "tokens_per_second": metrics.get("train_tokens_per_second"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
    }


def build_summary(
    *,
    feedback: str | None,
    metric: dict[str, Any] | None,
    adapter: Path | None,
    label: str | None,
    results: dict[str, dict[str, Any]],
    started: float,
    prompts: list[dict[str, Any]],
    outcomes: dict[str, dict[str, dict[str, bool]]] | None = None,
    scores: dict[str, dict[str, dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """The summary; `label` names the adapter's condition, `started` is the evaluation's start
    time (its `evaluation_seconds` ends now)."""
    from pipeline.stats import peak_memory_mb
    from trainers.feedback_eval import SCOPES

    return {
        "feedback": feedback,
        "metric": metric,
        "adapter": adapter_info(adapter, label),
        "conditions": results,
        "cost": {
            "training": training_cost(adapter),
            "evaluation_seconds": round(time.time() - started, 3),
            "evaluation_peak_memory_mb": peak_memory_mb(),
        },
        "counts": {scope: sum(p.get("scope") == scope for p in prompts) for scope in SCOPES},
        "outcomes": outcomes or {},
        "scores": scores or {},
    }


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """The summary as JSON at `path`, NaN/inf as null (so the JSON stays standard)."""
    from pipeline.stats import clean

    path.write_text(json.dumps(clean(summary), indent=2))


def read_summary(stage_dir: Path) -> dict[str, Any] | None:
    """An evaluate stage's summary (`stage_dir/summary`), None when it has none."""
    path = Path(stage_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def metric_value(summary: dict[str, Any], condition: str, metric: str) -> dict[str, Any] | None:
    """One condition's metric from an evaluate summary, as {"value", "n", "lo", "hi"}; None when absent.

    - `metric` is a summary key ("adherence", "kl_to_base", "reward/plove", ...); a metric
      with one estimate per scope is read as "memory_retrieved/in_scope".
    - A metric stored as a bare number (`length_vs_base` in summaries written before it had an
      interval) comes back as {"value": x, "n": None, "lo": None, "hi": None}, so a caller reads one shape.
    - An estimate over no items has "value": None (and n 0): there is a row, but nothing to
      compare; a gate should treat it as missing evidence.
    - None when the condition was not evaluated (e.g. skipped for a missing input) or the
      metric was not measured for it (no judge, no users, ...).
    Raises ValueError when `summary` is not an evaluate summary (no `conditions` mapping).
    """
    conditions = summary.get("conditions") if isinstance(summary, dict) else None
    if not isinstance(conditions, dict):
        raise ValueError("not an evaluate summary: no `conditions` mapping (read it with read_summary(stage_dir))")
    metrics = conditions.get(condition)
    if not isinstance(metrics, dict):
        return None
    value = metrics.get(metric)
    if value is None and "/" in metric:
        group, key = metric.split("/", 1)
        nested = metrics.get(group)
        value = nested.get(key) if isinstance(nested, dict) else None
    if isinstance(value, dict) and "value" in value:
        return {"value": value["value"], "n": value.get("n"), "lo": value.get("lo"), "hi": value.get("hi")}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": value, "n": None, "lo": None, "hi": None}
    return None


def flat_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Manifest metrics: `metric/condition` values (satisfaction and adherence first) plus their intervals."""
    out: dict[str, Any] = {}
    conditions = summary["conditions"]
    names = sorted(
        {m for c in conditions.values() for m in c},
        key=lambda m: (FLAT_ORDER.index(m) if m in FLAT_ORDER else len(FLAT_ORDER), m),
    )
    intervals: dict[str, Any] = {}
    for metric in names:
        for condition, metrics in conditions.items():
            value = metrics.get(metric)
            if isinstance(value, dict) and "value" in value:
                out[f"{metric}/{condition}"] = value["value"]
                intervals[f"{metric}/{condition}/lo"], intervals[f"{metric}/{condition}/hi"] = value["lo"], value["hi"]
                intervals[f"{metric}/{condition}/n"] = value["n"]
            elif isinstance(value, (int, float)):
                out[f"{metric}/{condition}"] = value
    out.update(intervals)  # values first (the run summary shows the first few), intervals after
    out["evaluation_seconds"] = summary["cost"]["evaluation_seconds"]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def summary_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the summary for a tracker's table: one row per condition and metric with
    value, lo, hi, n (None where a metric has no interval); per-scope metrics as `metric/scope`."""
    rows: list[list[Any]] = []
    for condition, metrics in summary["conditions"].items():
        for metric, value in metrics.items():
            nested = value if isinstance(value, dict) and "value" not in value else {"": value}
            for scope, estimate in nested.items():
                name = f"{metric}/{scope}" if scope else metric
                if isinstance(estimate, dict) and "value" in estimate:
                    rows.append([condition, name, estimate["value"], estimate.get("lo"), estimate.get("hi"), estimate.get("n")])
                elif isinstance(estimate, (int, float)) and not isinstance(estimate, bool):
                    rows.append([condition, name, estimate, None, None, None])
    return ["condition", "metric", "value", "lo", "hi", "n"], rows


def fmt_estimate(value: Any) -> str:
    """'0.45 [0.26, 0.66] n=20' for an estimate, the number for a float, '–' for nothing; an
    estimate without an interval (null or NaN bounds: its values all alike, stats.no_spread) as
    '2 [no interval] n=3'."""
    from pipeline.stats import finite_number

    if isinstance(value, dict) and "value" in value:
        if value.get("value") is None:
            return "–"
        if not (finite_number(value.get("lo")) and finite_number(value.get("hi"))):
            return f"{value['value']:.3g} [no interval] n={value.get('n')}"
        return f"{value['value']:.3g} [{value['lo']:.3g}, {value['hi']:.3g}] n={value['n']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}"
    return "–"
