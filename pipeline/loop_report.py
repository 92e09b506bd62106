"""`runs/<loop>/loop.html`: the loop's rounds at a glance, written after every `heedful loop`.

Why a page of its own and not a section of one run's report: the question it answers spans
rounds ("did each deployed version make users happier, and what did the gate stop?"), while
each round's own report.html answers for one round. It plots, per round, every gate metric for
the deployed version and the candidate (with intervals), marks rejected candidates, and the live
love rate of each adapter version as the server counted it when the round started. The table's
`rewards` column says what each round did with the refreshed reward models (refreshed on how
many records, with its held-out metric, or kept).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .loop import load_state, status_rows


def gate_series(rounds: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict | None, dict | None, bool]]]:
    """metric -> [(round, candidate estimate, current estimate, passed)] from each round's gate decision."""
    series: dict[str, list[tuple[int, dict | None, dict | None, bool]]] = {}
    for entry in rounds:
        gate = entry.get("gate") or {}
        for rule in gate.get("rules", []):
            series.setdefault(rule["metric"], []).append(
                (entry["round"], rule.get("candidate"), rule.get("current"), bool(gate.get("passed")))
            )
    return series


def live_rates(rounds: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    """(round, version, its live counts) as the server reported them at each round's start."""
    return [(entry["round"], version, row) for entry in rounds for version, row in (entry.get("live") or {}).items()]


def plot(rounds: list[dict[str, Any]]) -> str:
    series, live = gate_series(rounds), live_rates(rounds)
    if not series and not live:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import figure_html

    panels = list(series)[:5] + (["live love rate"] if live else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "live love rate":
            by_version: dict[str, list[tuple[int, float]]] = {}
            for rnd, version, row in live:
                if row.get("love_rate") is not None:
                    by_version.setdefault(version, []).append((rnd, float(row["love_rate"])))
            for version, points in by_version.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=version)
            ax.legend(fontsize=6)
        else:
            for which, color, offset in (("current", "tab:gray", -0.08), ("candidate", "tab:blue", 0.08)):
                xs, ys, lo, hi = [], [], [], []
                for rnd, cand, cur, _ in series[name]:
                    est = cand if which == "candidate" else cur
                    if est and est.get("value") is not None:
                        xs.append(rnd + offset)
                        ys.append(est["value"])
                        lo.append(est["value"] - est.get("lo", est["value"]) if est.get("lo") is not None else 0)
                        hi.append(est.get("hi", est["value"]) - est["value"] if est.get("hi") is not None else 0)
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, label=which, capsize=3)
            for rnd, cand, _, passed in series[name]:
                if not passed and cand and cand.get("value") is not None:
                    ax.plot([rnd + 0.08], [cand["value"]], "x", color="tab:red", markersize=10)
            ax.legend(fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
    fig.suptitle("gate metrics per round (red x: the gate rejected the candidate)", fontsize=9)
    fig.tight_layout()
    return figure_html(fig)


def write_loop_report(root: Path) -> Path | None:
    """Write `root/loop.html` from `root/loop.json`; None when no round has started."""
    from .artifacts import atomic_write_text

    state = load_state(root)
    if not state["rounds"]:
        return None
    cols = ["round", "phase", "records", "quarantined", "withdrawn", "version_before", "trained", "critique", "rewards"]
    cols += ["current_eval"]
    cols += ["gate"]
    cols += ["deployed", "version_after", "outcome"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c) if r.get(c) is not None else '-'))}</td>" for c in cols) + "</tr>"
        for r in status_rows(root)
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>loop {html.escape(root.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px}</style>"
        f"<h1>loop {html.escape(root.name)}</h1><p>server {html.escape(str(state.get('server')))}; "
        "each round's own report is in its folder (round-NNN/report.html).</p>"
        f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>{plot(state['rounds'])}"
    )
    out = root / "loop.html"
    atomic_write_text(out, page)
    return out
