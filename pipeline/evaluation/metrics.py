"""What the replies show: adherence and firing, degeneration, reward models, the judge's win rate.

Why these sit together: each is computed from the `evaluation` rows alone (one row per prompt
and condition), with no further generation, so they are cheap and reproducible from the rows.
Every metric is {value, n, lo, hi} with a 95% interval (`pipeline/stats.py`): Wilson for
rates (the judge's win rate too: a share of preferences, ties half), a seeded percentile bootstrap
for means (values all alike: a Wilson interval within their range where it is known, else no
interval; never a point).

    adherence / overgen_near / overgen_out   share of in-/near-/out-of-scope replies applying the
                                             feedback (trainers/feedback_eval.py, as c3po uses)
    unfinished / repeated_ngrams / length    degeneration (+ length_vs_base, a ratio of means by prompt)
    reward/<name>                            mean score of each given reward model on the replies
    judge_win_rate                           an LLM judge's preference over the base's reply
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pipeline.llm import LLMSettings
    from trainers.feedback_eval import MetricSpec

    from .conditions import Answering

WIN_PROMPT = (
    "Which reply answers the user's request better? Consider helpfulness, correctness and clarity.\n\n"
    "Request:\n{prompt}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\nAnswer with one letter: A or B."
)

Rows = list[dict[str, Any]]
Results = dict[str, dict[str, Any]]
#: per condition and metric, each item's score (reward/<kind>, ref_loglik) keyed as outcomes are
Scores = dict[str, dict[str, dict[str, float]]]
V = TypeVar("V")


def check_scopes(prompts: list[dict[str, Any]], path: Any) -> None:
    """Refuse a held-out prompt whose `scope` is set but none of in_scope, near_scope, out_of_scope
    ("general": the rows no scope applies to). Why: such a row counts only toward degeneration and
    reward, so a misspelt scope ("in-scope", "near") would silently leave adherence and firing
    without its prompts, or without any."""
    from pipeline.errors import DataError
    from trainers.feedback_eval import SCOPES

    for i, row in enumerate(prompts, 1):
        scope = row.get("scope")
        if scope not in (None, "", "general", *SCOPES):
            raise DataError(
                f"{path}: row {i}: field 'scope': {scope!r} is none of {', '.join(SCOPES)} (leave it out for an unscoped prompt)"
            )


def feedback_and_metric(
    prompts: Rows, feedback: str | None, metric: MetricSpec | None, path: Path | None
) -> tuple[str | None, MetricSpec | None]:
    """The feedback and the adherence metric: as configured, else from the prompts' columns.
    Scoped prompts need both (`path` names the prompts in the error)."""
    from trainers.c3po_data import metric_from_rows
    from trainers.feedback_eval import SCOPES

    feedback = feedback or next((r["feedback"] for r in prompts if r.get("feedback")), None)
    metric = metric or metric_from_rows(prompts)
    scoped = any(r.get("scope") in SCOPES for r in prompts)
    if scoped and not feedback:
        raise ValueError(f"{path}: scoped prompts but no `feedback` column; set feedback: in the stage config")
    if scoped and metric is None:
        raise ValueError(f"{path}: scoped prompts but no `metric` column; set metric: (e.g. {{kind: starts_with, value: ...}})")
    return feedback, metric


def reply_metrics(rows: Rows, conditions: list[str], resamples: int, seed: int) -> Results:
    """Per condition: `condition_metrics` of its rows."""
    return {name: condition_metrics([r for r in rows if r["condition"] == name], resamples, seed) for name in conditions}


def condition_metrics(rows: Rows, resamples: int, seed: int) -> dict[str, Any]:
    """One condition's adherence / firing (scoped rows), unfinished share, loops and length."""
    from pipeline.stats import bootstrap_mean, rate
    from trainers.feedback_eval import SCOPES, scope_estimates

    if not rows:
        return {}
    out = scope_estimates([r for r in rows if r["scope"] in SCOPES])
    out["unfinished"] = rate(not r["finished"] for r in rows)
    # a share in [0, 1]: replies that all repeat nothing are 0 with a Wilson interval, not 0 [0, 0]
    out["repeated_ngrams"] = bootstrap_mean([r["repeated_ngrams"] for r in rows], resamples=resamples, seed=seed, bounds=(0, 1))
    out["length"] = bootstrap_mean([r["tokens"] for r in rows], resamples=resamples, seed=seed)
    return out


def reply_outcomes(rows: Rows, conditions: list[str]) -> dict[str, dict[str, dict[str, bool]]]:
    """Per condition and yes/no metric, each item's outcome keyed by its prompt (`#2`, `#3` after a
    repeated one): what the arena pairs with the base's on the same prompts (`pipeline.stats.
    paired_difference`). adherence / overgen_near / overgen_out on scoped rows, unfinished on all."""
    from trainers.feedback_eval import SCOPE_KEYS

    out: dict[str, dict[str, dict[str, bool]]] = {}
    for name in conditions:
        per_metric: dict[str, list[tuple[str, bool]]] = {}
        for row in (r for r in rows if r["condition"] == name):
            for metric, outcome in ((SCOPE_KEYS.get(row["scope"]), row["applied"]), ("unfinished", not row["finished"])):
                if metric is not None:
                    per_metric.setdefault(metric, []).append((str(row["prompt"]), bool(outcome)))
        if per_metric:
            out[name] = {metric: keyed_outcomes(items) for metric, items in per_metric.items()}
    return out


def keyed_outcomes(items: list[tuple[str, V]]) -> dict[str, V]:
    """Outcomes (or scores) keyed by item (a prompt, a need's id), a repeated item as `key#2`, `key#3`
    in order: one rule for every condition, so the base's and a method's k-th copy pair with each other."""
    out: dict[str, V] = {}
    for key, outcome in items:
        unique, k = key, 1
        while unique in out:
            k += 1
            unique = f"{key}#{k}"
        out[unique] = outcome
    return out


def retrieval_rates(prompts: Rows, memory: Callable[[str], str | None]) -> dict[str, Any]:
    """Per scope: how often the memory condition recalled feedback."""
    from pipeline.stats import rate
    from trainers.feedback_eval import SCOPES

    return {
        scope: rate(memory(str(p["prompt"])) is not None for p in prompts if p.get("scope") == scope)
        for scope in SCOPES
        if any(p.get("scope") == scope for p in prompts)
    }


def length_vs_base(
    rows: Rows, results: Results, reference: dict[tuple[str, str], dict[str, Any]], resamples: int = 2000, seed: int = 0
) -> None:
    """Mean reply length relative to the base's on the same prompts (1.0 = same), paired by prompt,
    with a bootstrap interval over the prompts (a longer or shorter model shows it beyond noise)."""
    from pipeline.stats import bootstrap_ratio, estimate

    base = {r["prompt"]: r["tokens"] for r in rows if r["condition"] == "base"}
    if not base:
        base = {p: r.get("tokens", 0) for (c, p), r in reference.items() if c == "base"}
    if not base:
        return
    for name, metrics in results.items():
        mine = [r for r in rows if r["condition"] == name and r["prompt"] in base]
        if mine and sum(base[r["prompt"]] for r in mine) > 0:
            lengths, base_lengths = [r["tokens"] for r in mine], [base[r["prompt"]] for r in mine]
            if name == "base" and lengths == base_lengths:  # the base against itself: 1 by construction, exactly
                metrics["length_vs_base"] = estimate(1.0, len(mine), 1.0, 1.0)
            else:  # every prompt in the same ratio (or one prompt): no interval, not a point (stats.no_spread)
                metrics["length_vs_base"] = bootstrap_ratio(lengths, base_lengths, resamples=resamples, seed=seed)


def reward_scores(
    ans: Answering, rows: Rows, results: Results, models: list[tuple[str, Path]], scores: Scores | None = None
) -> None:
    """`reward/<kind>`: each reward model's mean score on each condition's replies; with `scores`, each
    reply's score keyed by its prompt there too (what the arena pairs with the base's)."""
    from pipeline.stats import bootstrap_mean

    if not models or not rows:
        return
    from reward_models.base import RewardBatch, load_reward_model, read_descriptor

    for name, path in models:
        rm = load_reward_model(path)
        kind = read_descriptor(path).get("kind", name)
        for condition in results:
            mine = [r for r in rows if r["condition"] == condition]
            values: list[float] = []
            for start in range(0, len(mine), ans.batch_size):
                chunk = mine[start : start + ans.batch_size]
                scalar = rm.score(RewardBatch([r["prompt"] for r in chunk], [r["response"] for r in chunk])).scalar
                values += [float(v) for v in scalar.tolist()]
            results[condition][f"reward/{kind}"] = bootstrap_mean(values, resamples=ans.resamples, seed=ans.seed)
            if scores is not None:
                keyed = keyed_outcomes([(str(r["prompt"]), v) for r, v in zip(mine, values)])
                scores.setdefault(condition, {})[f"reward/{kind}"] = keyed
        ans.log.info("reward model %s (%s) scored", name, kind)


def judge_win_rates(
    ans: Answering, rows: Rows, results: Results, reference: dict[tuple[str, str], dict[str, Any]], judge_settings: LLMSettings
) -> None:
    """Share of prompts where the judge prefers the condition's reply to the base's (ties 0.5),
    with its Wilson interval: a rate of yes/no preferences (a tie half a win, which only makes the
    interval a little wide), so 20 wins of 20 read 1 [0.84, 1], not the bootstrap's 1 [1, 1]. The
    order of the two replies alternates, so a judge's position bias cancels."""
    from pipeline.llm import build_client
    from pipeline.stats import wilson

    base = {r["prompt"]: r["response"] for r in rows if r["condition"] == "base"}
    base = base or {p: r["response"] for (c, p), r in reference.items() if c == "base"}
    if not base:
        ans.log.info("judge skipped: no base replies")
        return
    judge = build_client(judge_settings, ans.model_name, ans.device)
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
        answers = judge.complete(asks, seed=ans.seed) if asks else []
        wins = [win_score(answer, flip) for answer, flip in zip(answers, flips)]
        results[condition]["judge_win_rate"] = wilson(sum(wins), len(wins))


def win_score(answer: str, flipped: bool) -> float:
    """1 when the judge picked the candidate, 0 the base, 0.5 when the answer names neither."""
    match = re.search(r"\b([AB])\b", answer.strip().upper())
    if match is None:
        return 0.5
    picked_first = match.group(1) == "A"
    return float(picked_first != flipped)
