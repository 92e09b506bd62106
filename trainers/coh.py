"""Chain of Hindsight (Liu et al., "Chain of Hindsight Aligns Language Models with Feedback", 2023).

A prompt is followed by several replies, each introduced by its feedback phrase
("A helpful answer:" / "An unhelpful answer:" and paraphrases, or any natural-language
feedback), in random order (positive first or negative first). The loss is next-token NLL on
the reply tokens only (and the final end-of-turn token); prompt and phrases are context.
Options: forgetful causal masking (each example drops a random share of past tokens from
attention, the share drawn from U[min_ratio, max_ratio]; the first token stays visible) and a
pretraining-data regulariser: L = L_feedback + pretrain_weight * L_LM(pretraining text).
At inference the model is conditioned on the positive phrase (pipeline/hindsight.py). The defaults (phrases,
separator, FCM ratios, pretraining weight) live in `CoHConfig` (trainers/coh_config.py) only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer

from pipeline.chat import reply_text

from .coh_config import FEEDBACK_PHRASE, CoHConfig
from .sequences import FeedbackTrainer, masked_mean, pad_right, score_completions, shift_mask

# ----------------------------------------------------------------------------- sequences


def build_chain(
    prompt_ids: list[int],
    segments: list[tuple[list[int], list[int]]],
    separator_ids: list[int],
    eos_id: int,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """prompt, then for each (phrase, reply): phrase + reply, joined by `separator_ids`, the
    last reply closed by `eos_id`. Returns input_ids and the loss mask (1 on reply tokens
    and the final eos only). `max_length` cuts the end (keep-start)."""
    ids, mask = list(prompt_ids), [0] * len(prompt_ids)
    for k, (phrase, reply) in enumerate(segments):
        ids += list(phrase)
        mask += [0] * len(phrase)
        ids += list(reply)
        mask += [1] * len(reply)
        tail = [eos_id] if k == len(segments) - 1 else list(separator_ids)
        ids += tail
        mask += [1] * len(tail) if k == len(segments) - 1 else [0] * len(tail)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def forgetful_causal_mask(
    attention_mask: torch.Tensor, min_ratio: float, max_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool [B, 1, T, T] (True = may attend): causal, no padding keys, and each example
    hides a random share r ~ U[min_ratio, max_ratio] of past keys; key 0 always stays."""
    b, t = attention_mask.shape
    device = attention_mask.device
    ratio = torch.rand((b, 1, 1, 1), generator=generator, device=device) * (max_ratio - min_ratio) + min_ratio
    keep = torch.rand((b, 1, t, t), generator=generator, device=device) > ratio
    keep[..., 0] = True
    causal = torch.tril(torch.ones((t, t), dtype=torch.bool, device=device))
    return keep & causal & attention_mask[:, None, None, :].bool()


# ----------------------------------------------------------------------------- data


def chains_from_preferences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prompt/chosen/rejected rows (text or messages) -> chains with one positive and one negative."""
    return [
        {"prompt": row["prompt"], "positive": reply_text(row["chosen"]), "negative": reply_text(row["rejected"])} for row in rows
    ]


def chains_from_feedback(records: list[dict[str, Any]], feedback_as_phrase: bool = False) -> list[dict[str, Any]]:
    """VerbalFeedback rows grouped by prompt: a 'good' reply is positive, 'needs_work' negative.

    With `feedback_as_phrase` each reply is introduced by its own critique instead of a
    stock phrase (the natural-language feedback stands in the phrase).
    """
    import json

    chains: list[dict[str, Any]] = []
    open_chain: dict[str, dict[str, Any]] = {}  # per prompt: the newest chain, which may still lack a side
    for rec in records:
        if rec.get("judgment") not in ("good", "needs_work"):
            continue
        key = json.dumps(rec["prompt"], sort_keys=True)
        side = "positive" if rec["judgment"] == "good" else "negative"
        chain = open_chain.get(key)
        if chain is None or side in chain:
            chain = open_chain[key] = {"prompt": rec["prompt"]}
            chains.append(chain)
        chain[side] = rec["response"]
        if feedback_as_phrase and rec.get("critique"):
            chain[f"{side}_phrase"] = FEEDBACK_PHRASE.format(feedback=rec["critique"])
    return chains


def build_examples(tokenizer: Any, chains: list[dict[str, Any]], pretraining: list[str] | None = None) -> list[dict[str, Any]]:
    """Tokenize prompts, replies and custom phrases once; the collator assembles chains."""
    from pipeline.chat import render_ids

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    examples = []
    for i, chain in enumerate(chains):
        if not chain.get("positive") and not chain.get("negative"):
            continue
        ex: dict[str, Any] = {"prompt": render_ids(tokenizer, chain["prompt"])}
        for side in ("positive", "negative"):
            ex[side] = ids(" " + chain[side]) if chain.get(side) else []
            ex[f"{side}_phrase"] = ids(chain[f"{side}_phrase"]) if chain.get(f"{side}_phrase") else []
        if pretraining:
            ex["pretrain"] = ids(pretraining[i % len(pretraining)])
        examples.append(ex)
    return examples


@dataclass
class CoHCollator:
    """Assembles each chain at batch time: a random phrase pair and a random order (pn or np)
    per example, drawn from Python's RNG seeded per batch from torch's (so a resumed run
    continues the same sequence)."""

    tokenizer: Any
    max_length: int
    method: CoHConfig = field(default_factory=CoHConfig)

    def __post_init__(self) -> None:
        self._pairs = [(self._encode(p), self._encode(n)) for p, n in self.method.phrase_pairs]
        self._separator = self._encode(self.method.separator)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        ids, masks = [], []
        for ex in examples:
            pos_phrase, neg_phrase = self._pairs[rng.randrange(len(self._pairs))]
            segments = []
            if ex["positive"]:
                segments.append((ex["positive_phrase"] or pos_phrase, ex["positive"]))
            if ex["negative"]:
                segments.append((ex["negative_phrase"] or neg_phrase, ex["negative"]))
            if len(segments) == 2 and rng.random() < 0.5:
                segments.reverse()
            row, mask = build_chain(ex["prompt"], segments, self._separator, self.tokenizer.eos_token_id, self.max_length)
            ids.append(row)
            masks.append(mask)
        pad = self.tokenizer.pad_token_id
        batch = {"input_ids": pad_right(ids, pad)}
        batch["attention_mask"] = pad_right([[1] * len(r) for r in ids], 0, batch["input_ids"].shape[1])
        batch["loss_mask"] = pad_right(masks, 0, batch["input_ids"].shape[1])
        if examples and "pretrain" in examples[0]:
            pt = [ex["pretrain"][: self.max_length] for ex in examples]
            batch["pretrain_input_ids"] = pad_right(pt, pad)
            batch["pretrain_attention_mask"] = pad_right([[1] * len(r) for r in pt], 0, batch["pretrain_input_ids"].shape[1])
        return batch


# ----------------------------------------------------------------------------- trainer


class CoHTrainer(FeedbackTrainer, Trainer):
    """NLL on reply tokens of hindsight chains (+ optional FCM and pretraining regulariser)."""

    def __init__(self, *args: Any, method: CoHConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_feedback(None)
        self.method = method or CoHConfig()

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        input_ids, attention = inputs["input_ids"], inputs["attention_mask"]
        cfg = self.method
        if model.training and cfg.fcm_max_ratio > 0:
            attention = forgetful_causal_mask(attention, cfg.fcm_min_ratio, cfg.fcm_max_ratio)
        logps = score_completions(model, input_ids, attention, inputs["loss_mask"], full_forward=self.full_forward).logps
        feedback_loss = masked_mean(-logps, shift_mask(inputs["loss_mask"]))
        loss = feedback_loss
        self.store(**{"loss/feedback": feedback_loss})
        if cfg.pretrain_weight > 0 and "pretrain_input_ids" in inputs:
            pt_ids, pt_mask = inputs["pretrain_input_ids"], inputs["pretrain_attention_mask"]
            pt_logps = score_completions(model, pt_ids, pt_mask, pt_mask, full_forward=self.full_forward).logps
            pretrain_loss = masked_mean(-pt_logps, shift_mask(pt_mask))
            loss = loss + cfg.pretrain_weight * pretrain_loss
            self.store(**{"loss/pretrain": pretrain_loss})
        return (loss, {"logps": logps}) if return_outputs else loss
