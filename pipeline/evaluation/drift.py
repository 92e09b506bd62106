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


def drift(ans: Answering, items: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    """Teacher-forced on reference answers: per-token KL(condition || base) and log-likelihood."""
    import torch

    from pipeline.chat import render_ids
    from pipeline.stats import bootstrap_mean, token_kl

    model, tokenizer = ans.model, ans.tokenizer
    device = next(model.parameters()).device

    def logits_for(condition: Condition, prompt: str, answer_ids: list[int]):
        prompt_ids = render_ids(tokenizer, prompt, ans.system_for(condition, prompt))
        ids = torch.tensor([list(prompt_ids) + answer_ids], device=device)
        with ans.weights(condition), torch.no_grad():
            logits = model(ids).logits[0]
        start = len(prompt_ids) - 1
        return logits[start : start + len(answer_ids)]

    kl: dict[str, list[float]] = {c.name: [] for c in ans.conditions}
    loglik: dict[str, list[float]] = {c.name: [] for c in ans.conditions}
    base = Condition(name="base")
    for item in items:
        answer_ids = answer_token_ids(tokenizer, str(item["prompt"]), str(item["answer"]))
        if not answer_ids:
            continue
        target = torch.tensor(answer_ids, device=device)
        base_logits = logits_for(base, str(item["prompt"]), answer_ids)
        for condition in ans.conditions:
            logits = base_logits if condition.name == "base" else logits_for(condition, str(item["prompt"]), answer_ids)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]
            loglik[condition.name].append(float(logp.mean()))
            kl[condition.name].append(0.0 if condition.name == "base" else float(token_kl(logits, base_logits).mean()))
    for condition in ans.conditions:
        results[condition.name]["kl_to_base"] = bootstrap_mean(kl[condition.name], resamples=ans.resamples, seed=ans.seed)
        results[condition.name]["ref_loglik"] = bootstrap_mean(loglik[condition.name], resamples=ans.resamples, seed=ans.seed)
    ans.log.info("drift measured on %d general prompt/answer pairs", len(kl[ans.conditions[0].name]))
