"""Trained rows against each other: which method did better on the same held-out items.

Why: the arena's paired sections answer "did this method beat the base, and the feedback in the
prompt?". A team choosing between two methods that both did (CUT or SFT?) needs the two compared
directly, on the same items: two rows whose intervals against the base overlap can still differ
item by item, and two that look apart may not. Every pair of finished trained rows of one seed is
paired here the way a row is paired with the base (`arena_table.paired_with`: McNemar for yes/no
outcomes, the sign-flip test for scores). Comparing every pair makes many tests, so each metric's
p-values over the pairs of a seed also get Holm's adjustment (`p_holm`): read a finding from that.

Rows of one seed only: the seeds of a method are separate adapters, and pairing seed 0 of one
method with seed 1 of another would mix the seed's effect into the method's. A mean over seeds is
not paired here (the seeds of both sides would each need their own resampling); each seed's pairs are.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

#: arena.json's key, and the CSV written beside arena.csv
KEY = "head_to_head"
CSV_FILE = "head_to_head.csv"
FIELDS = ("value", "lo", "hi", "n", "better", "worse", "p", "p_holm")


def head_to_head(rows: list[dict[str, Any]], items: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """[{"a", "b", "seed", "paired": {metric: difference a - b with better / worse from a's side, p,
    p_holm}}] for every two finished trained rows of the same seed, in table order (a listed
    before b); a pair with no metric on a shared item is left out. `items`: each row's `paired_items`."""
    from .arena_table import paired_with
    from .stats import holm

    trained = [r for r in rows if r["method"] is not None and r["status"] == "done" and items.get(r["condition"])]
    pairs = []
    for i, a in enumerate(trained):
        for b in trained[i + 1 :]:
            if a["seed"] == b["seed"] and (paired := paired_with(items[a["condition"]], items[b["condition"]])):
                methods = [a["method"], b["method"]]
                pairs.append({"a": a["condition"], "b": b["condition"], "seed": a["seed"], "methods": methods, "paired": paired})
    families: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for pair in pairs:
        for metric, difference in pair["paired"].items():
            families.setdefault((pair["seed"], metric), []).append(difference)
    for family in families.values():
        for difference, adjusted in zip(family, holm([d["p"] for d in family]), strict=True):
            difference["p_holm"] = adjusted
    return pairs


def compare(run_root: Path, a: str, b: str) -> dict[str, Any]:
    """Row `a` against row `b` of an arena run on their shared held-out items: {"a", "b", "paired":
    {metric: difference a - b}}, with `p_holm` when both are trained rows of one seed (adjusted over
    all that seed's pairs, as the report shows it). Any two finished rows can be compared (e.g.
    memory against a method); a name that is no finished row is a ValueError listing those that are."""
    from .arena_table import PLAN_FILE, collect_with_items, paired_with

    collected = collect_with_items(Path(run_root))
    if collected is None:
        raise ValueError(f"{run_root}: no {PLAN_FILE} (not an arena run)")
    table, items = collected
    rows = {row["condition"]: row for row in table["rows"] if row["status"] == "done"}
    for name in (a, b):
        if name not in rows:
            seeds = [row for row in rows if row.rsplit("_s", 1)[0] == name]
            hint = f" (one row per seed: {', '.join(seeds)})" if seeds else ""
            raise ValueError(f"{run_root}: no finished arena row {name!r}{hint}; finished rows: {', '.join(rows)}")
        if not items.get(name):
            raise ValueError(f"{run_root}: row {name!r} has no per-item outcomes (evaluated before evaluate v2: rerun the arena)")
    if a == b:
        raise ValueError(f"compare two different rows, not {a!r} with itself")
    notes = []
    first, second = rows[a], rows[b]
    if first["method"] and second["method"] and first["method"] != second["method"] and first["seed"] != second["seed"]:
        notes.append(
            f"{a} and {b} are different methods of different seeds: the difference mixes the seed's effect into "
            "the method's (compare rows of one seed)"
        )
    for pair in table.get(KEY) or []:
        if (pair["a"], pair["b"]) in ((a, b), (b, a)):
            paired = pair["paired"] if pair["a"] == a else flipped(pair["paired"])
            return {"a": a, "b": b, "seed": pair["seed"], "paired": paired, "notes": notes}
    paired = paired_with(items[a], items[b])
    if not paired:
        notes.append(f"{a} and {b} share no held-out item with a metric both have: nothing to compare")
    return {"a": a, "b": b, "seed": None, "paired": paired, "notes": notes}


def flipped(paired: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """b - a from a - b: the difference and its interval negated, up/down and better/worse swapped (p unchanged)."""
    out = {}
    for metric, d in paired.items():
        swapped = {
            **d,
            "turned_yes": d["turned_no"],
            "turned_no": d["turned_yes"],
            "better": d["worse"],
            "worse": d["better"],
        }
        if d.get("value") is not None:  # a bound may be None (no interval: stats.no_spread, null in JSON)
            swapped.update(value=-d["value"], lo=_negated(d.get("hi")), hi=_negated(d.get("lo")))
        out[metric] = swapped
    return out


def _negated(bound: float | None) -> float | None:
    return None if bound is None else -bound


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of head_to_head.csv: one line per pair and metric (a, b, seed, metric, then
    FIELDS), cells unformatted (numbers stay numbers, for trackers); no rows without pairs."""
    from .arena_table import metric_order

    rows = [
        [pair["a"], pair["b"], pair["seed"], metric, *(pair["paired"][metric].get(f) for f in FIELDS)]
        for pair in table.get(KEY) or []
        for metric in metric_order(set(pair["paired"]))
    ]
    return ["a", "b", "seed", "metric", *FIELDS], rows


def csv_text(table: dict[str, Any]) -> str | None:
    """head_to_head.csv's text; None without pairs."""
    from .arena_table import num

    header, rows = table_rows(table)
    if not rows:
        return None
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([num(cell) for cell in row] for row in rows)
    return out.getvalue()


def findings(table: dict[str, Any], level: float = 0.05) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(pair, metric, difference) with a Holm-adjusted p below `level`, in table and metric order."""
    from .arena_table import metric_order

    return [
        (pair, metric, pair["paired"][metric])
        for pair in table.get(KEY) or []
        for metric in metric_order(set(pair["paired"]))
        if (p := pair["paired"][metric].get("p_holm")) is not None and p < level
    ]


def replication(table: dict[str, Any], pair: dict[str, Any], metric: str, level: float = 0.05) -> str:
    """With several seeds, in how many of the seeds that paired the same two methods on `metric`
    the difference holds the same way (Holm p below `level`, same sign): 'seeds 0, 1 of 0, 1'. A
    finding of one seed that the others do not repeat is that seed's adapters, not the method's.
    '' with one seed."""
    same = [
        other
        for other in table.get(KEY) or []
        if other.get("methods") == pair.get("methods") and metric in other["paired"] and pair.get("methods")
    ]
    if len(same) < 2:
        return ""
    sign = (pair["paired"][metric]["value"] or 0.0) > 0

    def holds(other: dict[str, Any]) -> bool:
        d = other["paired"][metric]
        p = d.get("p_holm")
        return p is not None and p < level and d.get("value") is not None and (d["value"] > 0) == sign

    held = [str(o["seed"]) for o in same if holds(o)]
    return f"seeds {', '.join(held) or 'none'} of {', '.join(str(o['seed']) for o in same)}"
