"""evaluate: did the model get better for the people who gave feedback, and no worse for anyone else?

One stage for every method (used by the arena, the quickstart and any pipeline). It compares
conditions of one model side by side (base, in_context, memory and the `adapter` input) and
reports every metric as {value, n, lo, hi} with a 95% interval, plus the cost. This file is
the config and the order of the work; the measurements live in `pipeline/evaluation/`:
conditions (the ways of answering, their replies), metrics (adherence / firing, degeneration,
reward models, judge), drift (KL to base, reference log-likelihood), users (simulated users'
satisfaction) and summary (the JSON other code reads). docs/evaluation.md explains each metric.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from pipeline.evaluation.conditions import MemorySettings
from pipeline.evaluation.report import report_section
from pipeline.evaluation.summary import LOWER_IS_BETTER, NEUTRAL, SUMMARY_FILE, arrow, fmt_estimate, read_summary
from pipeline.evaluation.users import UsersSettings
from pipeline.generation import ENGINE_LABELS, EngineSetting, SamplingSettings, pick_engine
from pipeline.llm import LLMSettings
from pipeline.paths import ConfigPath
from pipeline.stage import Input, Output, Stage
from pipeline.tracking import TrackingSettings
from trainers.feedback_eval import IN_CONTEXT_TEMPLATE, MetricSpec

#: what other code imports from here (pipeline/arena.py, stages/arena_select.py, tests)
__all__ = ["EvaluateConfig", "EvaluateStage", "LOWER_IS_BETTER", "NEUTRAL", "arrow", "fmt_estimate", "read_summary"]

GENERAL_SET = "data:evaluate/general.jsonl"
RM_INPUTS = ("reward_model", "reward_model_2", "reward_model_3")


class EvaluateConfig(TrackingSettings):
    """What to compare and how; `report_to` also logs the summary to experiment trackers (pipeline/tracking.py)."""

    conditions: list[str] = Field(
        default_factory=lambda: ["base", "in_context", "memory", "adapter"],
        description="base, in_context, memory, adapter; those whose inputs are missing are skipped",
    )
    label: str | None = Field(default=None, description="name of the adapter's condition (default: its stage name)")
    feedback: str | None = Field(default=None, description="default: the prompts' `feedback` column")
    metric: MetricSpec | None = Field(default=None, description="default: the prompts' `metric` column (c3po_data)")
    in_context_template: str = IN_CONTEXT_TEMPLATE
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=48, temperature=0.0))
    max_prompts_per_scope: int | None = Field(default=None, ge=1)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    general_set: ConfigPath = Field(default=GENERAL_SET, description="prompt/answer pairs for drift (when no `general` input)")
    max_general: int | None = Field(default=None, ge=1)
    drift: bool = Field(default=True, description="KL to the base and reference log-likelihood on the general set")
    ngram: int = Field(default=3, ge=1, description="n of the repeated n-gram share")
    users: UsersSettings = Field(default_factory=UsersSettings)
    judge: LLMSettings | None = Field(default=None, description="LLM judge for win rate vs base (e.g. kind: openai)")
    resamples: int = Field(default=2000, ge=100, description="bootstrap resamples for intervals of means")
    batch_size: int = Field(
        default=8,
        ge=1,
        description="HF generate / forward passes: rows at a time; the simulated users' clients seed each batch, "
        "so their sampled turns depend on it (part of the fingerprint)",
    )
    engine: EngineSetting = "auto"
    device: str | None = None


class EvaluateStage(Stage):
    config: EvaluateConfig
    uses = "evaluate"
    version = "12"  # 2: the summary's per-item outcomes; 3: the users' conversations; 4: their own kind; 5: per-item scores; 6: a CoH adapter answers its users after its phrase; 7: a CoH reply cut at a phrase is finished; 8: the conditions' conversations side by side (the simulator's calls batched across them); 9: batch_size is fingerprinted (the users' sampled turns are seeded per batch on HF, as simulate's), first_reply_satisfied counts a need answered only by clarifying questions as not satisfied, and no interval is a point (Wilson for the judge's win rate; stats.no_spread); 10: a `reference` stands in only where made alike (model, seed, sampling, batch_size, and per reply its system prompt, which each row now records as `system`), else the replies are written anew; 11: exact repeats of a held-out prompt or need are dropped (an item is scored once); 12: on HF the base's and a LoRA adapter's greedy held-out replies, and their users' policy turns, share batches (each row with its own adapter, or none), so the sampled turns come from other draws
    summary = "Adherence, overgeneralization, satisfaction, drift, degeneration, cost: base vs in-context vs memory vs adapter."
    Config = EvaluateConfig
    inputs = {
        "prompts": Input(
            ("prompts",), required=False, doc="held-out prompts; with a scope column (in/near/out_of_scope) adherence is measured"
        ),
        "adapter": Input(("adapter",), required=False, doc="the candidate adapter"),
        "needs": Input(
            ("prompts", "needs", "responses"), required=False, doc="held-out information needs: simulated users' satisfaction"
        ),
        "memory": Input(
            ("c3po_data", "prompts", "verbal_feedback"),
            required=False,
            doc="prompts the feedback was given on (in-scope rows), or critiques (each recalled on a similar request)",
        ),
        "general": Input(("prompts",), required=False, doc="prompt/answer pairs for drift (default: general_set)"),
        "reference": Input(
            ("evaluation",),
            required=False,
            doc="an earlier evaluation: its base/in_context/memory replies are reused where made alike (model, seed, "
            "sampling, batch_size, each reply's system prompt), else written anew",
        ),
        **{name: Input(("reward_model",), required=False, doc="a trained reward model: its mean score") for name in RM_INPUTS},
    }
    outputs = {
        "evaluation": Output("evaluation", doc="one row per prompt and condition: reply, applied, finished, tokens"),
        "summary": Output("evaluation_summary", doc="JSON: every metric per condition as {value, n, lo, hi}, cost"),
        "conversations": Output(
            "evaluation_conversations",  # not "transcripts": held-out judgments, not feedback (lineage counts those)
            required=False,
            doc="with `needs`: the simulated users' conversations per condition, each reply's satisfaction and verdict",
        ),
    }
    default_num_cpus = float("inf")
    # how, not what; not batch_size: HF generate seeds each batch (seed + b), and so do the simulated users'
    # clients on either engine, so their sampled turns change with it (as the simulate stage's)
    non_semantic_fields = frozenset({"device", "report_to", "engine"})

    @classmethod
    def report_section(cls, run_root, manifests):
        """The evaluate stages' tables and bars, then the arena's leaderboard."""
        from pipeline.arena_report import report_section as arena_report_section

        parts = (report_section(run_root, manifests), arena_report_section(run_root, manifests))
        return "\n".join(part for part in parts if part)

    def run(self) -> dict[str, Any]:
        from pipeline.evaluation import conditions as cond
        from pipeline.evaluation import drift, metrics, summary, users
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer, model_fingerprint
        from pipeline.prompt_groups import distinct_items
        from pipeline.records import load_rows, save_rows
        from pipeline.tracking import log_evaluation

        cfg, ctx, started = self.config, self.ctx, time.time()
        trackers = cfg.trackers()  # a tracker that is not installed fails before any work
        prompts_path, adapter = ctx.input("prompts"), ctx.input("adapter")
        prompts = load_rows(prompts_path, required=["prompt"], what="evaluation prompts") if prompts_path else []
        prompts, prompt_repeats = distinct_items(prompts)  # a held-out prompt written twice is scored once
        if prompt_repeats:
            ctx.log.info("held-out prompts: %d exact repeats dropped (each prompt is scored once)", prompt_repeats)
        metrics.check_scopes(prompts, prompts_path)
        feedback, metric = metrics.feedback_and_metric(prompts, cfg.feedback, cfg.metric, prompts_path)
        memory_path = ctx.input("memory")
        remembered = cond.load_memory(memory_path) if memory_path is not None else None
        if not feedback and remembered is not None and remembered.critiques and "in_context" in cfg.conditions:
            feedback = cond.critiques_feedback(remembered.critiques, cfg.memory.max_critiques)  # the most recurring
        conditions = cond.choose_conditions(
            cfg.conditions, feedback, memory=remembered, adapter=adapter, label=cfg.label, log=ctx.log
        )
        ctx.log.info("conditions: %s", ", ".join(c.name for c in conditions))
        names = [c.name for c in conditions]
        # before the model loads; only a reference made alike (the arena's eval_base, for its eval_<method>)
        reference = cond.reference_replies(
            ctx.input("reference"),
            cond.reply_settings(model_fingerprint(ctx.model), ctx.seed, cfg),
            EvaluateConfig,
            ctx.log,
            base_needed="base" not in names,
        )
        tokenizer = load_tokenizer(ctx.model)
        model = load_causal_lm(ctx.model, device_policy(cfg.device), adapter=adapter).eval()
        retrieving = any(c.system == "retrieved" for c in conditions)  # only with something to recall
        memory = cond.memory_lookup(remembered, cfg.memory, feedback, ctx.log) if remembered and retrieving else None
        ans = cond.Answering(
            model=model,
            tokenizer=tokenizer,
            conditions=conditions,
            system_for=cond.system_prompts(cfg.in_context_template, feedback, memory),
            model_name=ctx.model,
            adapter=adapter,
            device=cfg.device,
            seed=ctx.seed,
            batch_size=cfg.batch_size,
            resamples=cfg.resamples,
            log=ctx.log,
            engine=pick_engine(cfg.engine, cfg.device, ctx.model, len(prompts) * len(conditions) * cfg.sampling.max_new_tokens),
            share_batches=True,
        )
        ctx.log.info("replies from %s", ENGINE_LABELS[ans.engine])
        rows = cond.generate_replies(
            ans, prompts, feedback, metric, reference, cfg.sampling, cfg.max_prompts_per_scope, cfg.ngram
        )
        results = metrics.reply_metrics(rows, names, ans.resamples, ans.seed)
        outcomes = metrics.reply_outcomes(rows, names)
        scores: metrics.Scores = {}
        if memory is not None and (rates := metrics.retrieval_rates(prompts, memory)):
            results["memory"]["memory_retrieved"] = rates
        metrics.length_vs_base(rows, results, reference, ans.resamples, ans.seed)
        models = [(name, path) for name in RM_INPUTS if (path := ctx.input(name)) is not None]
        metrics.reward_scores(ans, rows, results, models, scores)
        if cfg.judge is not None:
            metrics.judge_win_rates(ans, rows, results, reference, cfg.judge)
        conversations: list[dict[str, Any]] = []
        need_repeats = 0
        if (needs := ctx.input("needs")) is not None:
            need_repeats = users.satisfaction(ans, needs, cfg.users, results, outcomes, conversations)
        if cfg.drift:
            drift.drift(ans, drift.general_items(ctx.input("general"), cfg.general_set, cfg.max_general), results, scores)

        out = summary.build_summary(
            feedback=feedback,
            metric=metric.model_dump(mode="json") if metric else None,
            adapter=adapter,
            label=cfg.label,
            results=results,
            started=started,
            prompts=prompts,
            outcomes=outcomes,
            scores=scores,
        )
        empty = {
            "prompt": "",
            "scope": "",
            "condition": "",
            "response": "",
            "applied": False,
            "finished": True,
            "tokens": 0,
            "system": "",
        }
        save_rows(rows, ctx.output("evaluation"), empty_like=empty)
        summary.write_summary(out, ctx.output(SUMMARY_FILE))
        if conversations:
            save_rows(conversations, ctx.output("conversations"))
        log_evaluation(trackers, ctx.work_dir / "tensorboard", f"{ctx.run_name}/{ctx.name}", out)
        return {
            **summary.flat_metrics(out),
            "prompts_duplicates_dropped": prompt_repeats,
            "needs_duplicates_dropped": need_repeats,
        }
