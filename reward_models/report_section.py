"""report.html section for `train_reward` stages: metrics against their baselines, and the
P[Love] reliability plot (predicted P[Love] vs observed positive rate)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pipeline.report import format_cell


def reward_model_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, manifest in manifests.items():
        if manifest.get("uses") != "train_reward":
            continue
        path = Path(run_root) / name / "reward_model" / "eval.json"
        if not path.is_file():
            continue
        evaluation = json.loads(path.read_text())
        kind = evaluation.get("kind", manifest.get("config", {}).get("kind", ""))
        parts.append(f"<h2>{html.escape(name)}: reward model ({html.escape(kind)})</h2>")
        parts.append(_comparison_table(evaluation))
        if kind == "plove" and evaluation.get("reliability"):
            parts.append("<p>P[Love] reliability on the held-out replies (points on the diagonal = calibrated):</p>")
            parts.append(reliability_figure(evaluation["reliability"], f"{name}: P[Love] reliability"))
            parts.append(_bucket_table(evaluation.get("buckets", [])))
    return "\n".join(parts)


def _comparison_table(evaluation: dict[str, Any]) -> str:
    rows = evaluation.get("comparison") or []
    if not rows:
        return ""
    out = ["<table><tr><th>what</th><th>metric</th><th>model</th><th>baseline</th><th>baseline is</th></tr>"]
    for row in rows:
        out.append(
            "<tr>"
            + "".join(f"<td>{format_cell(row.get(k, ''))}</td>" for k in ("what", "metric", "model", "baseline", "baseline_name"))
            + "</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _bucket_table(buckets: list[dict[str, float]]) -> str:
    if not buckets:
        return ""
    out = [
        "<p>P[Love] vs. observed positive rate, equal-count buckets of the held-out replies:</p>",
        "<table><tr><th>P[Love] range</th><th>replies</th><th>mean P[Love]</th><th>observed positive rate</th></tr>",
    ]
    for b in buckets:
        out.append(
            f"<tr><td>{b['min_prob']:.3f}–{b['max_prob']:.3f}</td><td>{b['count']}</td>"
            f"<td>{b['mean_prob']:.3f}</td><td>{b['positive_rate']:.3f}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def reliability_figure(bins: list[dict[str, float]], title: str) -> str:
    from pipeline.report import cached_figure

    return cached_figure(reliability_plot, bins, title)


def reliability_plot(bins: list[dict[str, float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = [b for b in bins if b["count"]]
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    ax.plot([0, 1], [0, 1], "--", color="#999", label="perfect calibration")
    ax.plot([b["mean_prob"] for b in used], [b["positive_rate"] for b in used], "o-", label="model")
    ax.set_xlabel("predicted P[Love]")
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    hist.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] for b in bins], width=1 / len(bins) * 0.9)
    hist.set_xlabel("predicted P[Love]")
    hist.set_ylabel("replies")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
