"""The run report's part for evaluate stages: a table of every metric per condition, and bars.

Why intervals everywhere: with tens of held-out prompts a difference of a few points is
noise; the table prints each value with its 95% interval and n, and the bars carry whiskers,
so a reader does not mistake noise for progress (docs/evaluation.md, "Reading intervals").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .summary import arrow, fmt_estimate, read_summary

#: the rates drawn as bars (when measured)
BAR_METRICS = ["first_reply_satisfied", "satisfied", "adherence", "overgen_near", "overgen_out"]


def report_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    """Per evaluate stage: the table of every metric per condition, bars with intervals, and (outside
    an arena, which shows them together) its simulated users side by side."""
    import html

    from pipeline.arena_table import PLAN_FILE

    parts = []
    for name, manifest in manifests.items():
        if manifest.get("uses") != "evaluate":
            continue
        summary = read_summary(Path(run_root) / name)
        if not summary:
            continue
        conditions = summary["conditions"]
        metrics = sorted(
            {
                m
                for c in conditions.values()
                for m, v in c.items()
                if isinstance(v, (dict, float, int)) and m != "memory_retrieved"
            }
        )
        head = "".join(f"<th>{html.escape(m)}{arrow(m)}</th>" for m in metrics)
        body = "".join(
            f"<tr><td>{html.escape(c)}</td>"
            + "".join(f"<td>{html.escape(fmt_estimate(v.get(m)))}</td>" for m in metrics)
            + "</tr>"
            for c, v in conditions.items()
        )
        cost = summary.get("cost", {})
        parts.append(
            f"<h2>{html.escape(name)}: evaluation</h2><p>value [95% interval] n; evaluation took "
            f"{cost.get('evaluation_seconds', 0):.0f}s</p><table><tr><th>condition</th>{head}</tr>{body}</table>"
        )
        figure = bars_figure(name, conditions, BAR_METRICS)
        if figure:
            parts.append(figure)
        if not (Path(run_root) / PLAN_FILE).is_file():  # an arena shows its stages' users together
            parts.append(users_side_by_side([Path(run_root) / name]))
    return "\n".join(parts)


def users_side_by_side(stage_dirs: list[Path], shown: int = 4) -> str:
    """A few held-out needs with each condition's first judged reply in its simulated user's
    conversation, the user's satisfaction and verdict (✓ satisfied): the replies the satisfaction
    rates count (sampled, so not the evaluation's greedy replies); a conversation of clarifying
    questions only shows its question, not satisfied, as the rate counts it. Needs the conditions disagree on come
    first; '' without the stages' `conversations` (no users, or evaluate before v3)."""
    import html

    from pipeline.evaluation.users import first_judged
    from pipeline.records import load_rows

    first: dict[str, dict[str, dict[str, Any]]] = {}
    requests: dict[str, str] = {}
    order: list[str] = []
    for stage_dir in stage_dirs:
        path = Path(stage_dir) / "conversations"
        if not path.exists():
            continue
        for talk in load_rows(path):
            judged = first_judged(talk["utterances"])
            if judged is None:  # only clarifying questions: counted not satisfied (users.first_reply_outcomes), so shown so
                asked = next((u["text"] for u in talk["utterances"] if u["type"] == "clarifying_question"), "")
                judged = {"satisfied": False, "satisfaction": None, "text": f"(no reply, only a clarifying question) {asked}"}
            if talk["condition"] not in order:
                order.append(talk["condition"])
            first.setdefault(talk["conversation_id"], {}).setdefault(talk["condition"], judged)
            requests.setdefault(talk["conversation_id"], talk["request"])
    if not first:
        return ""
    disagree = [need for need, by in first.items() if len({u["satisfied"] for u in by.values()}) > 1]
    picked = (disagree + [need for need in first if need not in disagree])[:shown]

    def cell(u: dict[str, Any] | None) -> str:
        if u is None:
            return "–"
        score = "" if u.get("satisfaction") is None else f" {u['satisfaction']:.2f}"
        return f"{'✓' if u['satisfied'] else '✗'}{score}: {u['text']}"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in order)
    body = "".join(
        f"<tr><td><b>{html.escape(need)}</b>: {html.escape(requests[need])}</td>"
        + "".join(f"<td>{html.escape(cell(first[need].get(c)))}</td>" for c in order)
        + "</tr>"
        for need in picked
    )
    return (
        "<h3>Simulated users, side by side</h3><p>Each condition's first judged reply to a held-out need, "
        "with the user's satisfaction and verdict (✓ satisfied; the verdict also needs the need's facts "
        f"mentioned). Needs the conditions disagree on first ({len(disagree)} of {len(first)}); every "
        "conversation is in the evaluate stages' <code>conversations</code>.</p>"
        f"<table><tr><th>need</th>{head}</tr>{body}</table>"
    )


def bars_figure(title: str, conditions: dict[str, dict[str, Any]], metric_names: list[str]) -> str:
    """`bars_plot` as an HTML image ("" when no rate was measured)."""
    from pipeline import report

    return report.cached_figure(bars_plot, title, conditions, metric_names)


def bars_plot(title: str, conditions: dict[str, dict[str, Any]], metric_names: list[str] = BAR_METRICS) -> Any:
    """Grouped bars (one group per rate metric, one bar per condition) with interval whiskers: a
    matplotlib figure for the report and the trackers (the caller closes it); None without rates."""
    shown = [
        m for m in metric_names if any(isinstance(c.get(m), dict) and c[m].get("value") is not None for c in conditions.values())
    ]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(shown), 3.2))
    width = 0.8 / max(len(conditions), 1)
    for i, (condition, metrics) in enumerate(conditions.items()):
        values, lows, highs = [], [], []
        for m in shown:
            e: dict[str, Any] = metrics.get(m) or {}
            v, lo, hi = e.get("value"), e.get("lo"), e.get("hi")
            values.append(v if v is not None else 0.0)
            lows.append(max(0.0, (v or 0) - (lo if lo is not None else (v or 0))))
            highs.append(max(0.0, (hi if hi is not None else (v or 0)) - (v or 0)))
        ax.bar([x + i * width for x in range(len(shown))], values, width, yerr=[lows, highs], capsize=3, label=condition)
    ax.set_xticks([x + width * (len(conditions) - 1) / 2 for x in range(len(shown))], [m + arrow(m) for m in shown], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: rates with 95% intervals")
    fig.tight_layout()
    return fig
