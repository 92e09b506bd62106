"""evaluate_feedback: adherence and overgeneralization of any adapter (C3PO, CUT, CoH, DPO...)
against the base model and the in-context baseline (trainers/feedback_eval.py).

Adds a section to the run report: a bar chart per evaluation stage.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline import report
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.feedback_eval import EvalSettings, MetricSpec

EVALUATING_STAGES = ("evaluate_feedback", "c3po")


class EvaluateFeedbackConfig(EvalSettings, StageConfig):
    feedback: str | None = Field(default=None, description="default: the prompts' `feedback` column")
    metric: MetricSpec | None = Field(default=None, description="default: the prompts' `metric` column (from c3po_data)")
    device: str | None = None


class EvaluateFeedbackStage(Stage):
    uses = "evaluate_feedback"
    version = "2"  # 2: batch_size is fingerprinted (a run made with another one is not taken for this one)
    summary = "Adherence (in-scope) and overgeneralization (near/out-of-scope) vs base and in-context."
    Config = EvaluateFeedbackConfig
    inputs = {
        "prompts": Input(("prompts",), doc="held-out prompts with a scope column (in_scope/near_scope/out_of_scope)"),
        "adapter": Input(("adapter",), required=False, doc="the trained adapter (condition 'trained')"),
    }
    outputs = {"evaluation": Output("evaluation", doc="one row per prompt and condition: reply, applied")}
    default_num_cpus = float("inf")
    # how, not what; not batch_size: HF generate seeds each batch (seed + b), so replies sampled at a temperature
    # (`sampling`; greedy by default) change with it
    non_semantic_fields = frozenset({"device", "engine"})

    def run(self):
        from trainers.c3po_data import metric_from_rows
        from trainers.feedback_eval import evaluate

        cfg: EvaluateFeedbackConfig = self.config
        path = self.ctx.input("prompts")
        prompts = load_rows(path, required=["prompt", "scope"], what="scoped prompts")
        feedback = cfg.feedback or next((r["feedback"] for r in prompts if r.get("feedback")), None)
        metric = cfg.metric or metric_from_rows(prompts)
        if not feedback:
            raise ValueError(f"{path}: no `feedback` column; set feedback: in the stage config")
        if metric is None:
            raise ValueError(
                f"{path}: no `metric` column; set metric: in the stage config (e.g. {{kind: starts_with, value: ...}})"
            )
        settings = EvalSettings(**{k: getattr(cfg, k) for k in EvalSettings.model_fields})
        rows, summary = evaluate(
            self.ctx.model,
            self.ctx.input("adapter"),
            prompts,
            feedback,
            metric,
            settings,
            self.ctx.seed,
            cfg.device,
            self.ctx.log,
        )
        save_rows(rows, self.ctx.output("evaluation"))
        return summary

    @classmethod
    def report_section(cls, run_root: Path, manifests: dict[str, dict[str, Any]]) -> str | None:
        return adherence_section(manifests)


def adherence_section(manifests: dict[str, dict[str, Any]]) -> str:
    """Bars of adherence / overgeneralization per condition for each evaluating stage."""
    parts = []
    for name, manifest in manifests.items():
        metrics = manifest.get("metrics", {})
        if manifest.get("uses") not in EVALUATING_STAGES or not any(k.startswith("adherence/") for k in metrics):
            continue
        conditions = [c for c in ("base", "in_context", "trained") if f"adherence/{c}" in metrics]
        groups = ADHERENCE_GROUPS
        values = {c: [metrics.get(f"{g}/{c}", 0.0) for g, _ in groups] for c in conditions}
        figure = report.cached_figure(adherence_plot, name, values)
        rows = "".join(
            f"<tr><td>{html.escape(c)}</td>"
            + "".join(f"<td>{metrics.get(f'{g}/{c}', float('nan')):.2f}</td>" for g, _ in groups)
            + "</tr>"
            for c in conditions
        )
        parts.append(
            f"<h2>{html.escape(name)}: feedback adherence</h2><table><tr><th>condition</th>"
            + "".join(f"<th>{html.escape(label)}</th>" for _, label in groups)
            + f"</tr>{rows}</table>"
            + figure
        )
    return "\n".join(parts)


ADHERENCE_GROUPS = [
    ("adherence", "adherence (in-scope) ↑"),
    ("overgen_near", "applied near-scope ↓"),
    ("overgen_out", "applied out-of-scope ↓"),
]


def adherence_plot(name: str, values: dict[str, list[float]]):
    """One group of bars per rate (ADHERENCE_GROUPS), one bar per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ADHERENCE_GROUPS
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(values), 1)
    for i, (condition, heights) in enumerate(values.items()):
        ax.bar([x + i * width for x in range(len(groups))], heights, width, label=condition)
    ax.set_xticks([x + width * (len(values) - 1) / 2 for x in range(len(groups))], [label for _, label in groups])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: does the reply apply the feedback?")
    fig.tight_layout()
    return fig
