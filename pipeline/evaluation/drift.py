"""Drift: how far each condition moved away from the base on ordinary requests.

Why teacher-forced on reference answers instead of comparing sampled replies: scoring the
same fixed answers under each condition gives a per-token KL(condition || base) over the full
vocabulary and a log-likelihood, with no sampling noise and no judge. A general held-out set
(`data/evaluate/general.jsonl` by default) shows damage the feedback's own prompts would hide:
a drop in `ref_loglik` or a large `kl_to_base` means the adapter changed more than it should.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conditions import Answering, Condition


def general_items(path: Path | None, general_set: str, max_general: int | None) -> list[dict[str, Any]]:
    """The prompt/answer pairs: the `general` input, else `general_set` (a `data:` reference or a path)."""
    from pipeline.records import load_rows

    if path is None:
        from pipeline.paths import resolve_data_ref

        path = resolve_data_ref(general_set) if general_set.startswith("data:") else Path(general_set)
    return load_rows(path, required=["prompt", "answer"], what="general set")[:max_general]


def answer_token_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The tokens the chat template puts after the opened assistant turn for `answer` (its end-of-turn included)."""
    messages = [{"role": "user", "content": prompt}]
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    tail = full[len(opened) :] if full.startswith(opened) else answer
    return tokenizer(tail.rstrip("\n"), add_special_tokens=False)["input_ids"]


def drift(
    ans: Answering,
    items: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    scores: dict[str, dict[str, dict[str, float]]] | None = None,
) -> None:
    """Teacher-forced on reference answers: per-token KL(condition || base) and log-likelihood; with
    `scores`, each answer's log-likelihood keyed by its prompt there too (the arena pairs them).

    `ans.batch_size` items at a time, right-padded, through the body once per condition; only the
    positions that predict an answer token reach the vocabulary head (trainers/sequences.py
    `score_completions`), one item at a time, so no prompt or padding position's 49k-wide logits
    are built and at most two items' answer logits exist at once. The same numbers as one full
    forward per item, to float rounding (tests/test_evaluate_metrics.py)."""
    from pipeline.evaluation.metrics import keyed_outcomes
    from pipeline.stats import bootstrap_mean, estimate, token_kl
    from trainers.sequences import projects_hidden_states

    kl: dict[str, list[float]] = {c.name: [] for c in ans.conditions}
    loglik: dict[str, list[float]] = {c.name: [] for c in ans.conditions}
    pairs = [(str(item["prompt"]), answer_token_ids(ans.tokenizer, str(item["prompt"]), str(item["answer"]))) for item in items]
    pairs = [(prompt, answer) for prompt, answer in pairs if answer]
    # a model scored by its full forward (fastpref.logps.body_then_head) has [rows, length, vocab] logits: one row
    step = ans.batch_size if projects_hidden_states(ans.model) else 1
    base = Condition(name="base")
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        states = {c.name: _answer_states(ans, c, chunk) for c in [base, *(c for c in ans.conditions if c.name != "base")]}
        for i, (_, answer) in enumerate(chunk):
            base_logits = _logits(states["base"][i])
            for condition in ans.conditions:
                same = condition.name == "base"
                logits = base_logits if same else _logits(states[condition.name][i])
                loglik[condition.name].append(_mean_loglik(logits, answer))
                kl[condition.name].append(0.0 if same else float(token_kl(logits, base_logits).mean()))
    for condition in ans.conditions:
        if condition.name == "base" and kl["base"]:  # the base against itself: 0 by construction, exactly
            results["base"]["kl_to_base"] = estimate(0.0, len(kl["base"]), 0.0, 0.0)
        else:  # every item's KL alike (or one item): no interval rather than a point one (stats.no_spread)
            results[condition.name]["kl_to_base"] = bootstrap_mean(kl[condition.name], resamples=ans.resamples, seed=ans.seed)
        results[condition.name]["ref_loglik"] = bootstrap_mean(loglik[condition.name], resamples=ans.resamples, seed=ans.seed)
        if scores is not None:
            keyed = keyed_outcomes([(prompt, v) for (prompt, _), v in zip(pairs, loglik[condition.name])])
            scores.setdefault(condition.name, {})["ref_loglik"] = keyed
    ans.log.info("drift measured on %d general prompt/answer pairs", len(kl[ans.conditions[0].name]))


def _answer_states(ans: Answering, condition: Condition, chunk: list[tuple[str, list[int]]]) -> list[tuple[Any, Any]]:
    """Per item, under `condition` (its system prompt, its weights): (the body's hidden states at
    the positions that predict its answer's tokens, the head that projects them), or (those
    positions' logits, None) for a model scored by its full forward."""
    import torch

    from pipeline.chat import render_ids
    from trainers.sequences import pad_right, score_completions

    rows, scored = [], []
    for prompt, answer in chunk:
        prompt_ids = list(render_ids(ans.tokenizer, prompt, ans.system_for(condition, prompt)))
        rows.append(prompt_ids + answer)
        scored.append([0] * len(prompt_ids) + [1] * len(answer))
    device = next(ans.model.parameters()).device
    ids = pad_right(rows, ans.tokenizer.pad_token_id or 0).to(device)
    mask = pad_right([[1] * len(r) for r in rows], 0).to(device)
    with ans.weights(condition), torch.no_grad():
        out = score_completions(ans.model, ids, mask, pad_right(scored, 0).to(device), distribution_rows=slice(None))
    states, head = (out.logits, None) if out.logits is not None else (out.hidden, out.head)
    assert states is not None  # distribution_rows asked for one of the two
    return [(item, head) for item in states.split([len(answer) for _, answer in chunk])]


def _logits(state: tuple[Any, Any]) -> Any:
    import torch

    values, head = state
    if head is None:
        return values.float()
    with torch.no_grad():
        return torch.nn.functional.linear(values, head.weight, head.bias).float()


def _mean_loglik(logits: Any, answer: list[int]) -> float:
    import torch

    from trainers.sequences import gather_logps

    return float(gather_logps(logits, torch.tensor(answer, device=logits.device)).mean())
