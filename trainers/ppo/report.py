"""What a PPO run looks like at a glance, to catch reward hacking early: each objective's
score (training rollouts and held-out prompts), KL to the reference, entropy, reply length,
clip fractions and the critic's error, plus held-out replies before and after.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

PANELS = [
    ("reward per objective", "reward/"),
    ("KL to reference (nats / reply)", "kl"),
    ("entropy (nats / token)", "entropy"),
    ("reply length (tokens)", "length"),
    ("clip fraction", "clip"),
    ("value error (MSE vs returns)", "value/error"),
]


def _series(curves: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in curves if isinstance(row.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def objective_names(curves: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in curves:
        for key in row:
            for prefix in ("reward/", "eval/reward/"):
                if key.startswith(prefix):
                    name = key[len(prefix) :]
                    if name not in ("total", "shaped") and "/" not in name and name not in names:
                        names.append(name)
    return names


def plot_ppo(curves: list[dict[str, Any]], title: str = "", kl_threshold: float | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    axes = axes.ravel()
    names = objective_names(curves)
    ax = axes[0]
    for i, name in enumerate(names + (["total"] if len(names) > 1 else [])):
        color = f"C{i}"
        ax.plot(*_series(curves, f"reward/{name}"), color=color, alpha=0.55, label=f"{name} (train)")
        ax.plot(*_series(curves, f"eval/reward/{name}"), color=color, marker="o", ls="--", label=f"{name} (held-out)")
    ax = axes[1]
    ax.plot(*_series(curves, "kl"), label="train rollouts")
    ax.plot(*_series(curves, "eval/kl"), marker="o", ls="--", label="held-out (log-ratio)")
    if kl_threshold:
        ax.axhline(kl_threshold, color="C3", lw=0.8, ls=":", label="kl_threshold")
    axes[2].plot(*_series(curves, "entropy"))
    ax = axes[3]
    ax.plot(*_series(curves, "response/length"), label="train")
    ax.plot(*_series(curves, "eval/response_length"), marker="o", ls="--", label="held-out")
    ax = axes[4]
    ax.plot(*_series(curves, "policy/clip_fraction"), label="policy")
    ax.plot(*_series(curves, "value/clip_fraction"), label="value")
    axes[5].plot(*_series(curves, "value/error"))
    for ax, (panel, _) in zip(axes, PANELS):
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("PPO step")
        if ax.get_legend_handles_labels()[0] and len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def samples_table(samples: list[dict[str, Any]], limit: int = 5) -> str:
    """Held-out replies at the first and the last evaluation, side by side, with scores."""
    if not samples:
        return ""
    steps = sorted({s["step"] for s in samples})
    first, last = steps[0], steps[-1]
    by = {(s["step"], s["prompt_id"]): s for s in samples}
    ids = [s["prompt_id"] for s in samples if s["step"] == first][:limit]
    score_keys = [k for k in samples[0] if k.startswith("reward/")]

    def cell(s: dict[str, Any] | None) -> str:
        if s is None:
            return "<td></td>"
        scores = ", ".join(f"{k[7:]}={s[k]:.3g}" for k in score_keys if isinstance(s.get(k), (int, float)))
        return f"<td>{html.escape(str(s['response'])[:400])}<br><small>{scores}; {s['num_tokens']} tokens</small></td>"

    rows = [f"<tr><th>prompt</th><th>step {first}</th><th>step {last}</th></tr>"]
    for pid in ids:
        prompt = by[(first, pid)]["prompt"]
        text = prompt if isinstance(prompt, str) else " / ".join(m.get("content", "") for m in prompt)
        rows.append(f"<tr><td>{html.escape(text[:200])}</td>{cell(by.get((first, pid)))}{cell(by.get((last, pid)))}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def report_section(run_dir: Path, manifests: dict[str, dict[str, Any]]) -> str:
    """`PpoStage.report_section`: one block per ppo stage of the run."""
    import json

    from pipeline.report import cached_figure

    parts = []
    for name, manifest in manifests.items():
        if manifest.get("uses") != "ppo":
            continue
        stage_dir = Path(run_dir) / name
        curves_path = stage_dir / "curves.json"
        if not curves_path.is_file():
            continue
        curves = json.loads(curves_path.read_text())
        from .config import PpoSettings

        threshold = (manifest.get("config") or {}).get("kl_threshold", PpoSettings.model_fields["kl_threshold"].default)
        parts.append(f"<h2>{html.escape(name)}: PPO objectives, KL and diagnostics</h2>")
        title = f"{name} (ppo)"
        parts.append(cached_figure(plot_ppo, curves, title, threshold))
        metrics = manifest.get("metrics", {})
        if "stopped_early" in metrics:
            parts.append(f"<p><b>stopped early:</b> {html.escape(str(metrics['stopped_early']))}</p>")
        samples_dir = stage_dir / "samples"
        if samples_dir.exists():
            from pipeline.records import load_rows

            parts.append("<h3>held-out replies, first vs. last evaluation</h3>")
            parts.append(samples_table(load_rows(samples_dir)))
    return "\n".join(parts)
