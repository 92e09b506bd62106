"""report.html section for `simulate` stages: satisfaction by round and two sample transcripts."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def simulate_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, manifest in manifests.items():
        if manifest.get("uses") != "simulate":
            continue
        path = Path(run_root) / name / "transcripts"
        if not path.is_dir():
            continue
        from pipeline.records import load_rows

        transcripts = load_rows(path)
        metrics = manifest.get("metrics", {})
        parts.append(f"<h2>{html.escape(name)}: simulated users</h2>")
        keys = (
            "conversations",
            "satisfied_rate",
            "first_reply_satisfied_rate",
            "mean_rounds",
            "clarifying_questions",
            "pairs",
            "calibration_accuracy",
        )
        parts.append(
            "<table><tr>"
            + "".join(f"<th>{k}</th>" for k in keys)
            + "</tr><tr>"
            + "".join(f"<td>{_fmt(metrics.get(k, ''))}</td>" for k in keys)
            + "</tr></table>"
        )
        figure = satisfaction_figure(transcripts, f"{name}: satisfaction by round")
        if figure:
            parts.append(figure)
        for t in transcripts[:2]:
            parts.append(f"<p><b>need:</b> {html.escape(str(t['need']))}</p><table>")
            for u in t["utterances"]:
                sat = "" if u.get("satisfaction") is None else f"{u['satisfaction']:.2f}"
                parts.append(
                    f"<tr><td>{u['round']}</td><td>{html.escape(u['participant'])}</td>"
                    f"<td>{html.escape(u['type'])}</td><td>{html.escape(u['text'])}</td><td>{sat}</td></tr>"
                )
            parts.append("</table>")
    return "\n".join(parts)


def satisfaction_figure(transcripts: list[dict[str, Any]], title: str) -> str:
    """Mean satisfaction of the responses judged in each round, and the share satisfied by then."""
    by_round: dict[int, list[float]] = {}
    for t in transcripts:
        for u in t["utterances"]:
            if u["type"] == "response" and u.get("satisfaction") is not None:
                by_round.setdefault(int(u["round"]), []).append(float(u["satisfaction"]))
    if not by_round:
        return ""
    from pipeline.report import cached_figure

    rounds = sorted(by_round)
    mean = [sum(by_round[r]) / len(by_round[r]) for r in rounds]
    done = [sum(1 for t in transcripts if t["satisfied"] and t["rounds"] <= r) / len(transcripts) for r in rounds]
    return cached_figure(satisfaction_plot, rounds, mean, done, title)


def satisfaction_plot(rounds: list[int], mean: list[float], done: list[float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rounds, mean, marker="o", label="mean satisfaction")
    ax.plot(rounds, done, marker="s", label="satisfied by this round")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else html.escape(str(value))
