"""Simulated users on held-out information needs: is each condition's answer what they needed?

Why simulated users on top of adherence: adherence checks the feedback was applied; it does
not say the reply still served the person. The `simulate` stage's ConvSim protocol (a user
with a need, a judge calibrated before use) runs here unchanged, one conversation per
held-out need and condition, giving first_reply_satisfied / satisfied / rounds.

first_reply_satisfied counts every need: the first reply the user judged (a clarifying question the
user answered is not a reply), and a need whose every turn was such a question (max_rounds no more
than max_clarifications) as not satisfied: the model never answered it, so its first reply did not
satisfy it. Left out, such needs would shrink n and flatter a model that asks instead of answering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from feedback.simulator.protocol import ProtocolSettings

from .conditions import Answering, Condition


class UsersSettings(ProtocolSettings):
    """Simulated users on held-out needs (the `needs` input): the simulate stage's protocol."""

    max_users: int | None = Field(default=None, ge=1)
    need_field: str = "need"
    request_field: str = "prompt"
    facts_field: str | None = "keywords"


def satisfaction(
    ans: Answering,
    needs: Path,
    settings: UsersSettings,
    results: dict[str, dict[str, Any]],
    outcomes: dict[str, dict[str, dict[str, bool]]],
    conversations: list[dict[str, Any]],
) -> int:
    """first_reply_satisfied (`first_reply_outcomes`), satisfied (within max_rounds) and rounds, per condition; each
    need's first_reply_satisfied and satisfied in `outcomes[condition]`, keyed by the need's id
    (`#2` after a repeated id, as `metrics.keyed_outcomes` keys every metric). Every conversation
    is appended to `conversations` (its condition, each reply's satisfaction, fact coverage and
    verdict), so a reader can check why a need counted as satisfied. An exact repeat of a need's
    row (`pipeline.prompt_groups.distinct_items`) is dropped, so no need weighs double; returns
    how many were."""
    from feedback.simulator.needs import load_users
    from feedback.simulator.protocol import Judge, Side, run_sides
    from pipeline.llm import HFClient, build_client
    from pipeline.llm_cache import CachedLLM
    from pipeline.prompt_groups import distinct_items
    from pipeline.records import load_rows
    from pipeline.stats import bootstrap_mean, rate

    policy_backend = HFClient(ans.model_name, batch_size=ans.batch_size, model=ans.model, tokenizer=ans.tokenizer)
    shared = policy_backend if ans.adapter is None else None  # the simulator may share the base model only
    rows, repeats = distinct_items(load_rows(needs, what="information needs"))
    if repeats:
        ans.log.info("held-out needs: %d exact repeats dropped (each need is scored once)", repeats)
    users = load_users(
        needs,
        settings.need_field,
        settings.request_field,
        [],
        [],
        ans.seed,
        settings.max_users,
        None,
        settings.facts_field,
        rows,
    )
    _, user_tokens = settings.most_new_tokens(len(users) * len(ans.conditions))  # a small job does not start the engine probe
    simulator = CachedLLM(
        build_client(
            settings.simulator,
            ans.model_name,
            ans.device,
            shared and shared.model,
            shared and shared.tokenizer,
            batch_size=ans.batch_size,
            new_tokens=user_tokens,
        ),
        None,
    )
    judge = Judge(simulator, settings.judge).calibrate()
    ans.log.info("simulated users' judge calibrated: %.0f%%", 100 * judge.accuracy)
    # each condition its own copies of the users, its policy and its weights; conditions with the
    # same weights share one policy and one weights context, so their turns go in one call
    answerers: dict[bool, tuple[Any, Callable[[], AbstractContextManager[Any]]]] = {}  # adapter on? -> (policy, weights)
    # base and a LoRA adapter on HF (`Answering.shared_rows`): their turns in one call, each row with its adapter
    rows_of = ans.shared_rows(ans.conditions, len(users))
    shared_policy = CachedLLM(policy_backend, None) if rows_of else None
    sides = []
    for condition in ans.conditions:
        own = [replace(user, first_reply=None, system_prompt=ans.system_for(condition, user.request)) for user in users]
        if shared_policy is not None and condition.name in rows_of:
            sides.append(Side(own, shared_policy, adapter=rows_of[condition.name]))
            continue
        if condition.adapter_on not in answerers:
            policy = CachedLLM(condition_policy(ans, condition, policy_backend), None)
            answerers[condition.adapter_on] = (policy, partial(ans.weights, condition))
        sides.append(Side(own, *answerers[condition.adapter_on]))
    for condition, side, transcripts in zip(ans.conditions, sides, run_sides(sides, simulator, settings, ans.seed, judge)):
        per_need = need_outcomes(transcripts)
        conversations.extend({"condition": condition.name, **t.to_row()} for t in transcripts)
        metrics = results[condition.name]
        if condition.system == "retrieved":  # how many held-out needs memory recalled a critique for
            retrieved = metrics.setdefault("memory_retrieved", {})
            retrieved["needs"] = rate(user.system_prompt is not None for user in side.users)
        # the rates and the paired outcomes from one source: each is the share of its per-need outcomes
        metrics["first_reply_satisfied"] = rate(per_need["first_reply_satisfied"].values())
        metrics["satisfied"] = rate(per_need["satisfied"].values())
        outcomes.setdefault(condition.name, {}).update(per_need)
        rounds = [t.rounds for t in transcripts if t.satisfied]  # each in [1, max_rounds]: all alike, a Wilson interval within
        metrics["rounds"] = bootstrap_mean(rounds, resamples=ans.resamples, seed=ans.seed, bounds=(1, settings.max_rounds))
        ans.log.info(
            "%s: %d users, first reply satisfied %.2f",
            condition.name,
            len(transcripts),
            metrics["first_reply_satisfied"]["value"],
        )
    return repeats


def condition_policy(ans: Answering, condition: Condition, loaded: Any) -> Any:
    """What writes a condition's replies in its users' conversations, as `Answering.replies` writes
    its held-out replies: the engine the held-out replies came from when that is CTranslate2 (the
    base, or the adapter merged: a converted copy the replies already made); else `loaded` (the HF
    model, its adapter switched by `ans.weights`), which for a Chain-of-Hindsight adapter is told
    the adapter, so that its turns come after the phrase (pipeline/hindsight.py; the base's do not).

    Why the engine: the conversations' replies were most of the quickstart's evaluation, on HF
    generate, while CTranslate2 wrote the held-out replies beside them (greedy replies equal to HF's;
    sampled ones from the same distribution). The simulator and its judge are their own client
    (`settings.simulator`)."""
    from pipeline.hindsight import adapter_phrase
    from pipeline.llm import HFClient

    adapter = ans.adapter if condition.adapter_on else None
    if ans.engine == "ct2":
        return HFClient.policy(ans.model_name, ans.device, ans.batch_size, adapter, ans.tokenizer, engine="ct2")
    if adapter_phrase(adapter) is None:
        return loaded
    return HFClient(ans.model_name, batch_size=ans.batch_size, adapter=adapter, model=ans.model, tokenizer=ans.tokenizer)


def first_judged(utterances: Iterable[Any]) -> Any:
    """A conversation's first reply the judge scored (None when it scored none: every turn a
    clarifying question, which first-reply satisfaction counts as not satisfied): the reply the
    first-reply satisfaction counts. Utterances as the simulator returns them or as the stage
    stores them (dicts in `conversations`), so the rate and the report's side-by-side pick the same one."""

    def field(u: Any, name: str) -> Any:
        return u[name] if isinstance(u, dict) else getattr(u, name)

    return next((u for u in utterances if field(u, "type") == "response" and field(u, "satisfied") is not None), None)


def first_reply_outcomes(transcripts: Iterable[Any]) -> list[bool]:
    """Each conversation's first-reply satisfaction, in order: its first judged reply's verdict
    (`first_judged`), False when no reply was judged (every turn a clarifying question the user
    answered): a need the model never answered was not satisfied by its first reply, and counts in
    n. Transcripts as the protocol returns them; the simulate stage's rate and the evaluation's
    outcomes both read it."""
    outcomes = []
    for t in transcripts:
        judged = first_judged(t.utterances)
        outcomes.append(judged is not None and bool(judged.satisfied))
    return outcomes


def need_outcomes(transcripts: list[Any]) -> dict[str, dict[str, bool]]:
    """Each need's `satisfied` and `first_reply_satisfied` (`first_reply_outcomes`: a need with no
    judged reply is False, not left out), keyed by its id (`#2` after a repeated id, in order, the
    same keys in both metrics and every condition)."""
    from pipeline.evaluation.metrics import keyed_outcomes

    satisfied = keyed_outcomes([(t.user.id, bool(t.satisfied)) for t in transcripts])
    return {"satisfied": satisfied, "first_reply_satisfied": dict(zip(satisfied, first_reply_outcomes(transcripts)))}
