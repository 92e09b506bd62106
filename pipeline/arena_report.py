"""The arena's views of its table: the section in report.html (table, tuning grid, Pareto plots,
held-out prompts side by side), the terminal table `heedful arena` prints, and the Pareto plots
as PNG files for docs.

Why apart from the table (pipeline/arena_table.py): these only draw; the numbers and their
intervals are computed once, there, and every view shows the same rows in the same order
(`display_rows`: conditions, then per method its mean over seeds, then its seeds).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .arena_head_to_head import KEY as HEAD_TO_HEAD
from .arena_head_to_head import findings, replication
from .arena_table import (
    PAIRED,
    PLAN_FILE,
    collect,
    display_rows,
    fmt_paired,
    is_score,
    metric_names,
    metric_order,
    num,
    paired_names,
)
from .evaluation.summary import FLAT_ORDER, arrow

#: the Pareto plots: (x, y, title); drawn when at least two rows have both metrics
PARETO = (
    ("overgen_out", "adherence", "adherence vs out-of-scope firing (up and left is better)"),
    ("overgen_near", "adherence", "adherence vs near-scope firing (up and left is better)"),
    ("kl_to_base", "first_reply_satisfied", "satisfaction vs drift (up and left is better)"),
    ("kl_to_base", "ref_loglik", "reference (corrected) answers' log-likelihood vs drift (up and left is better)"),
)
#: the columns `heedful arena` prints besides the scores (reward/<kind>, ref_loglik); the rest are
#: in arena.csv and the report
TERMINAL_METRICS = (
    "adherence",
    "overgen_near",
    "overgen_out",
    "first_reply_satisfied",
    "kl_to_base",
    "unfinished",
    "judge_win_rate",
)


def report_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    table = collect(run_root)
    if table is None:
        return ""
    from .evaluation.summary import fmt_estimate

    names = metric_names(table)
    head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)
    head += "<th>train s</th><th>steps</th><th>samples/s</th><th>tokens/s</th><th>peak MB</th><th>eval s</th>"
    body = []
    for row in display_rows(table):
        cells = "".join(f"<td>{html.escape(fmt_estimate(row['metrics'].get(m)))}</td>" for m in names)
        cost = row["cost"]
        cells += "".join(
            f"<td>{html.escape(num(cost.get(f)) or '–')}</td>"
            for f in ("train_seconds", "steps", "samples_per_second", "tokens_per_second", "peak_memory_mb", "eval_seconds")
        )
        state = row["status"]
        note = f' title="{html.escape(row["error"] or "")}"' if row["error"] else ""
        name = html.escape(row["condition"])
        if "seeds" in row:
            name = f"<b>{name}</b>"
        body.append(
            f"<tr><td>{name}{chosen_note(row)}</td><td class={state.split()[0]}{note}>{html.escape(state)}</td>{cells}</tr>"
        )
    seeds_note = (
        " A method run with several seeds has a <b>mean over seeds</b> row above its seeds' rows: rates pooled over "
        "the seeds with a Wilson interval, means weighted by n with the envelope of the seeds' intervals; compare "
        "the seeds' spread (arena.json: <code>per_seed</code>) before comparing methods."
        if table.get("aggregates")
        else ""
    )
    parts = [
        f"<h2>Arena ({html.escape(table['source'])} feedback)</h2>"
        f"<p>value [95% interval] n per method and condition; ↑ higher is better, ↓ lower. Budget: "
        f"<code>{html.escape(json.dumps(table['budget']))}</code>. A failed method's row shows its status "
        f"(hover for the error); the others are unaffected.{seeds_note}</p>",
        f"<table><tr><th>condition</th><th>status</th>{head}</tr>{''.join(body)}</table>",
    ]
    parts += [paired_section(table, key) for key in PAIRED if paired_names(table, key)]
    if table.get(HEAD_TO_HEAD):
        parts.append(head_to_head_section(table))
    if table.get("grid"):
        parts.append(grid_section(table))
    from .report import cached_figure

    drawn = [cached_figure(pareto_figure, table, x, y, title) for x, y, title in PARETO]
    parts += [figure for figure in drawn if figure]
    parts.append(side_by_side(Path(run_root)))
    parts.append(users_side_by_side(Path(run_root)))
    return "\n".join(parts)


#: what each paired section compares with, by its row key (arena_table.PAIRED)
AGAINST = {"vs_base": "the base", "vs_in_context": "the feedback in the prompt", "vs_start": "the arm it continued"}


def paired_section(table: dict[str, Any], key: str = "vs_base") -> str:
    """Each condition against a reference (the base, or the feedback in the prompt) on the same
    held-out items (prompts or needs)."""
    names = paired_names(table, key)
    head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)
    body = "".join(
        f"<tr><td>{html.escape(versus_label(row, key))}</td>"
        + "".join(f"<td>{html.escape(fmt_paired(row[key].get(m)))}</td>" for m in names)
        + "</tr>"
        for row in display_rows(table)
        if row.get(key)
    )
    against = AGAINST.get(key, key)
    return (
        f"<h3>Paired with {against}</h3><p>Each row against {against} on the <i>same</i> items: the "
        "difference of the rates [Newcombe's 95% interval for paired rates], how many items moved the "
        "better and the worse way (for ↓ rates an item that turned no is better), and the exact McNemar "
        "p-value. Two rates whose Wilson intervals overlap can still differ here, and a difference that the "
        "pairing does not support shows as such. A mean over seeds pairs each item's share of seeds "
        "against the reference's (Newcombe's interval on the seed-averaged table; p from an exact permutation "
        "test of the mean difference, which is McNemar's for one seed). Scores (a reward model's, ref_loglik) "
        "pair as their mean difference per item [bootstrap interval over items; no interval where every item "
        "moved alike], items up and down, and the sign-flip permutation p of the mean difference.</p>"
        f"<table><tr><th>condition</th>{head}</tr>{body}</table>"
    )


def head_to_head_section(table: dict[str, Any]) -> str:
    """Every two trained rows of a seed against each other (pipeline/arena_head_to_head.py), a
    Holm-adjusted p below 0.05 in bold."""
    pairs = table[HEAD_TO_HEAD]
    names = metric_order({m for pair in pairs for m in pair["paired"]})
    head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)

    def cell(d: dict[str, Any] | None) -> str:
        if not d:
            return "<td>–</td>"
        text = html.escape(fmt_paired(d))
        if d.get("p_holm") is None:
            return f"<td>{text}</td>"
        text += f", Holm p = {d['p_holm']:.2g}"
        return f"<td><b>{text}</b></td>" if d["p_holm"] < 0.05 else f"<td>{text}</td>"

    body = "".join(
        f"<tr><td>{html.escape(pair['a'])} vs {html.escape(pair['b'])}</td>"
        + "".join(cell(pair["paired"].get(m)) for m in names)
        + "</tr>"
        for pair in pairs
    )
    return (
        "<h3>Trained rows head to head</h3><p>Every two trained rows of one seed on the <i>same</i> items, "
        "the first less the second, paired as above (better / worse from the first row's side). With many pairs "
        "some raw p-values fall below 0.05 by chance: each metric's p-values over a seed's pairs are also "
        "adjusted by Holm's method, and a finding is a Holm p below 0.05 (bold). A method's seeds are compared "
        "seed by seed. <code>head_to_head.csv</code> has these numbers; <code>heedful compare RUN A B</code> "
        "prints one pair.</p>"
        f"<table><tr><th>pair</th>{head}</tr>{body}</table>"
    )


def versus_label(row: dict[str, Any], key: str) -> str:
    """A paired row's name; against the arm it continued, which one ("sft_ppo_s0 vs sft_s0")."""
    return f"{row['condition']} vs {row['after']}" if key == "vs_start" else row["condition"]


def chosen_note(row: dict[str, Any]) -> str:
    """Under a tuned row's name: the grid setting it was chosen with."""
    if not row.get("chosen"):
        return ""
    text = ", ".join(f"{k}={v}" for k, v in row["chosen"]["settings"].items())
    return f"<br><small>chosen: {html.escape(text)}</small>"


def grid_section(table: dict[str, Any]) -> str:
    """Every grid point's validation scores; the chosen one in bold. Held-out numbers are in the table above only."""
    from .evaluation.summary import arrow, fmt_estimate

    tuning = table["tuning"]
    parts = [
        f"<h3>Tuning grid</h3><p>Each method's grid points were trained on the training prompts less a validation "
        f"share of {tuning['validation']:.0%} and scored on that share only; the point with the best validation "
        f"<code>{html.escape(tuning['select_by'])}</code> is the row above (ties: lower overgeneralization, then fewer "
        f"unfinished replies, then the first listed). The held-out prompts were used for the chosen point only.</p>"
    ]
    for grid in table["grid"]:
        names = [m for m in FLAT_ORDER if any(m in p["validation"] for p in grid["points"])]
        head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in names)
        body = []
        for point in grid["points"]:
            settings = html.escape(", ".join(f"{k}={v}" for k, v in point["settings"].items()))
            if point["point"] == grid["chosen"]:
                settings = f"<b>{settings} (chosen)</b>"
            cells = "".join(f"<td>{html.escape(fmt_estimate(point['validation'].get(m)))}</td>" for m in names)
            body.append(f"<tr><td>{settings}</td><td>{html.escape(point['status'])}</td>{cells}</tr>")
        parts.append(
            f"<p><b>{html.escape(grid['condition'])}</b> (tuning took {num(grid['tuning_seconds']) or '–'} s)</p>"
            f"<table><tr><th>setting</th><th>status</th>{head}</tr>{''.join(body)}</table>"
        )
    return "\n".join(parts)


def plotted_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of a Pareto plot: conditions, and per method its mean over seeds when it has one
    (its seeds' points would only crowd the plot), else its single row."""
    pooled = {a["method"] for a in table.get("aggregates") or []}
    return [row for row in display_rows(table) if "seeds" in row or row["method"] not in pooled]


def pareto_figure(table: dict[str, Any], x: str, y: str, title: str):
    """A matplotlib figure of `y` against `x` with both intervals as whiskers; None with fewer than two points."""
    points = []
    for row in plotted_rows(table):
        ex, ey = row["metrics"].get(x), row["metrics"].get(y)
        if isinstance(ex, dict) and isinstance(ey, dict) and ex.get("value") is not None and ey.get("value") is not None:
            points.append((row["condition"], ex, ey))
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return fig


def pareto_figures(table: dict[str, Any]) -> list[tuple[str, Any]]:
    """The Pareto plots that have two points or more, as (`<y>_vs_<x>`, figure); the caller closes them."""
    drawn = [(f"{y}_vs_{x}", pareto_figure(table, x, y, title)) for x, y, title in PARETO]
    return [(name, figure) for name, figure in drawn if figure is not None]


def save_pareto_pngs(run_root: Path, folder: Path, prefix: str) -> list[Path]:
    """The report's Pareto plots of a run as `folder/<prefix>_<k>.png` (k counts the plots drawn),
    e.g. docs/figures/arena_demo_0.png: `python -c "from pipeline.arena_report import save_pareto_pngs;
    save_pareto_pngs('runs/arena_demo', 'docs/figures', 'arena_demo')"`."""
    import matplotlib.pyplot as plt

    table = collect(Path(run_root))
    if table is None:
        raise FileNotFoundError(f"{run_root}: no {PLAN_FILE} (not an arena run)")
    written: list[Path] = []
    Path(folder).mkdir(parents=True, exist_ok=True)
    for k, (_, fig) in enumerate(pareto_figures(table)):
        path = Path(folder) / f"{prefix}_{k}.png"
        fig.savefig(path, format="png", dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def side_by_side(run_root: Path, per_scope: int = 2) -> str:
    """A few held-out prompts (in-scope first) with every condition's reply."""
    from .artifacts import read_json
    from .records import load_rows

    plan = read_json(run_root / PLAN_FILE)
    replies: dict[str, dict[str, str]] = {}
    order: list[str] = []
    prompts: list[tuple[str, str]] = []
    for stage in evaluation_stages(plan):
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


def users_side_by_side(run_root: Path, shown: int = 4) -> str:
    """The simulated users' side-by-side (pipeline/evaluation/report.py) over the arena's evaluate stages."""
    from .artifacts import read_json
    from .evaluation.report import users_side_by_side as table

    plan = read_json(run_root / PLAN_FILE)
    return table([run_root / stage for stage in evaluation_stages(plan)], shown)


def evaluation_stages(plan: dict[str, Any]) -> list[str]:
    """The arena's evaluate stages: the no-training conditions' first, then each arm's."""
    return [plan["baseline"]] + [arm["evaluation"] for arm in plan["methods"]]


def print_table(console, table: dict[str, Any]) -> None:
    """The table `heedful arena` prints: the headline metrics and training time, means over seeds in bold."""
    from rich.table import Table

    from .evaluation.summary import fmt_estimate

    names = [m for m in metric_names(table) if m in TERMINAL_METRICS or is_score(m)]
    out = Table(title=f"arena ({table['source']} feedback): value [95% interval] n", title_justify="left")
    for col in ["condition", "status", *names, "train s"]:
        out.add_column(col)
    for row in display_rows(table):
        chosen = row.get("chosen")
        out.add_row(
            row["condition"] + (" (" + ", ".join(f"{k}={v}" for k, v in chosen["settings"].items()) + ")" if chosen else ""),
            row["status"],
            *[fmt_estimate(row["metrics"].get(m)) for m in names],
            num(row["cost"].get("train_seconds")) or "-",
            style="bold" if "seeds" in row else None,
        )
    console.print(out)
    for key in PAIRED:
        paired = [m for m in paired_names(table, key) if m in TERMINAL_METRICS or is_score(m)]
        if not paired:
            continue
        vs = Table(
            title=f"against {AGAINST.get(key, key)} on the same items: difference [95% interval], items better / worse, p "
            "(McNemar; a permutation test for seed means; sign flips for scores)"
        )
        for col in ["condition", *paired]:
            vs.add_column(col)
        for row in display_rows(table):
            if row.get(key):
                vs.add_row(versus_label(row, key), *[fmt_paired(row[key].get(m)) for m in paired])
        console.print(vs)
    print_head_to_head(console, table)


def print_head_to_head(console, table: dict[str, Any]) -> None:
    """The head-to-head findings (Holm p < 0.05) under the table, or one line saying there are none."""
    pairs = table.get(HEAD_TO_HEAD) or []
    if not pairs:
        return
    found = findings(table)
    if not found:
        console.print(
            f"head to head: {len(pairs)} pair(s) of trained rows; none differs on any metric after Holm's adjustment "
            "(head_to_head.csv; `heedful compare RUN A B` for one pair)"
        )
        return
    from rich.table import Table

    out = Table(title="head to head, trained rows of one seed: the differences with a Holm-adjusted p < 0.05")
    seeds = [replication(table, pair, metric) for pair, metric, _ in found]
    columns = ["pair", "metric", "difference [95% interval], items better / worse, p", "Holm p"]
    for col in columns + (["holds in"] if any(seeds) else []):
        out.add_column(col)
    for (pair, metric, d), held in zip(found, seeds, strict=True):
        out.add_row(f"{pair['a']} vs {pair['b']}", metric, fmt_paired(d), f"{d['p_holm']:.2g}", *([held] if any(seeds) else []))
    console.print(out)


def print_comparison(console, result: dict[str, Any]) -> None:
    """What `heedful compare` prints: one row per metric of A less B on their shared items."""
    from rich.markup import escape
    from rich.table import Table

    from .evaluation.summary import arrow

    holm = result["seed"] is not None
    out = Table(title=f"{result['a']} vs {result['b']} on the same held-out items: {result['a']} less {result['b']}")
    for col in ["metric", "difference [95% interval], items better / worse, p", "n", *(["Holm p"] if holm else [])]:
        out.add_column(col)
    for metric in metric_order(set(result["paired"])):
        d = result["paired"][metric]
        holm_p = [f"{d['p_holm']:.2g}" if d.get("p_holm") is not None else "–"] if holm else []
        out.add_row(f"{metric}{arrow(metric)}", fmt_paired(d), str(d.get("n", "–")), *holm_p)
    if result["paired"]:
        console.print(out)
    for note in result.get("notes") or []:
        console.print(f"[yellow]{escape(note)}[/]")
    if holm:
        console.print("Holm p: adjusted over every pair of this seed's trained rows (the report's head-to-head table).")
    elif result["paired"]:
        console.print("Not a pair of trained rows of one seed: the p-values are this comparison's alone (no adjustment).")
