"""CUT (Xu et al., "Reasons to Reject? Aligning Language Models with Judgments", 2023).

Each example is (instruction x, response y, judgment j), the judgment positive or negative.
  Align-P   positive judgment: MLE on x -> y.
  Align-N   negative judgment: MLE on [x, j] -> y (y is right *for that judgment*).
  Misalign  negative judgment: x -> y, where y's inappropriate tokens are pushed down.

A response token is inappropriate when the negative judgment raises its probability:
p(y_t | x, j) / p(y_t | x) > lambda (default 1.1). On those tokens the loss is the
unlikelihood term -alpha * p(y_t | x, j)^gamma * log(1 - p(y_t | x)) (gamma = 0 is the
authors' code: a constant weight alpha; gamma > 0 is the paper's dynamic weight); other
Misalign tokens keep MLE. Align-N and Misalign rows of a negative example sit in the same
batch, so one forward pass gives both p(y_t | x, j) and p(y_t | x).

    L = (mean MLE over Align-P/Align-N tokens + mean Misalign token loss) / 2
(the halving follows the authors' code; with no negative example in the batch L is the MLE.)
The defaults live in `CUTConfig` (trainers/cut_config.py) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from .cut_config import DEFAULT_JUDGMENT_TEMPLATE, CUTConfig
from .sequences import FeedbackTrainer, masked_mean, pad_right, score_completions, shift_mask

# ----------------------------------------------------------------------------- math


def inappropriate_tokens(logp_with_judgment: torch.Tensor, logp_without: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where p(y_t|x,j) / p(y_t|x) > threshold (compared in log space)."""
    return (logp_with_judgment - logp_without) > torch.log(torch.tensor(threshold, dtype=logp_without.dtype))


def unlikelihood(
    logp_without: torch.Tensor, logp_with_judgment: torch.Tensor, alpha: float, gamma: float, eps: float = 1e-5
) -> torch.Tensor:
    """Per-token -alpha * p(y_t|x,j)^gamma * log(1 - p(y_t|x)); the weight carries no gradient."""
    weight = alpha * torch.exp(gamma * logp_with_judgment.detach()) if gamma else torch.full_like(logp_without, alpha)
    return -weight * torch.log((1 - logp_without.exp()).clamp(min=eps))


def misalign_token_losses(
    logp_without: torch.Tensor, logp_with_judgment: torch.Tensor, mask: torch.Tensor, threshold: float, alpha: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token Misalign loss (unlikelihood on detected tokens, MLE elsewhere), and the
    detected-token mask; both zero outside `mask`."""
    detected = inappropriate_tokens(logp_with_judgment.detach(), logp_without.detach(), threshold) & (mask > 0)
    losses = torch.where(detected, unlikelihood(logp_without, logp_with_judgment, alpha, gamma), -logp_without)
    return losses * mask, detected


def cut_loss(
    align_logps: torch.Tensor, align_mask: torch.Tensor, misalign_losses: torch.Tensor | None, misalign_mask: torch.Tensor | None
) -> torch.Tensor:
    """(token-mean MLE on Align rows + token-mean Misalign loss) / 2, or the MLE alone."""
    mle = masked_mean(-align_logps, align_mask)
    if misalign_losses is None or misalign_mask is None or misalign_mask.sum() == 0:
        return mle
    return (mle + misalign_losses.sum() / misalign_mask.sum()) / 2


# ----------------------------------------------------------------------------- data


def build_examples(
    tokenizer: Any, rows: list[dict[str, Any]], max_length: int, judgment_template: str = DEFAULT_JUDGMENT_TEMPLATE
) -> list[dict[str, Any]]:
    """Rows: instruction (str or messages), response, judgment, positive (bool).

    Positive rows give one Align-P sequence; negative rows give an Align-N sequence (the
    judgment added to the instruction) and a Misalign sequence with identical response
    tokens, trimmed to the same length so the two can be compared token by token.
    """
    from pipeline.chat import render_ids

    from .sequences import completion_ids, fit_length

    examples = []
    for row in rows:
        instruction = row["instruction"]
        response = completion_ids(tokenizer, str(row["response"]))
        plain = render_ids(tokenizer, instruction)
        if row["positive"]:
            prompt, completion = fit_length(plain, response, max_length)
            examples.append({"align_prompt": prompt, "completion": completion, "misalign_prompt": []})
            continue
        judged = render_ids(tokenizer, with_judgment(instruction, str(row["judgment"]), judgment_template))
        longest = max(len(judged), len(plain))
        if longest >= max_length:  # keep the end of each prompt (where the turn opens), room for 1/2 the budget
            keep = max_length // 2
            judged, plain = judged[-keep:], plain[-keep:]
            longest = max(len(judged), len(plain))
        examples.append(
            {"align_prompt": judged, "completion": response[: max(max_length - longest, 1)], "misalign_prompt": plain}
        )
    return examples


def with_judgment(instruction: Any, judgment: str, template: str = DEFAULT_JUDGMENT_TEMPLATE) -> Any:
    """The Align-N prompt: the judgment joins the (last) user turn."""
    if isinstance(instruction, list):
        messages = [dict(m) for m in instruction]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = template.format(instruction=messages[last]["content"], judgment=judgment)
        return messages
    return template.format(instruction=instruction, judgment=judgment)


@dataclass
class CUTCollator:
    """One right-padded batch: the B Align rows (Align-P or Align-N), then one Misalign row
    per negative example. `pair_index[k]` is the Align row of Misalign row k."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks, pairs = [], [], []
        for ex in examples:
            ids.append(list(ex["align_prompt"]) + list(ex["completion"]))
            masks.append([0] * len(ex["align_prompt"]) + [1] * len(ex["completion"]))
        for i, ex in enumerate(examples):
            if ex["misalign_prompt"]:
                ids.append(list(ex["misalign_prompt"]) + list(ex["completion"]))
                masks.append([0] * len(ex["misalign_prompt"]) + [1] * len(ex["completion"]))
                pairs.append(i)
        input_ids = pad_right(ids, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(r) for r in ids], 0, input_ids.shape[1]),
            "completion_mask": pad_right(masks, 0, input_ids.shape[1]),
            "pair_index": torch.tensor(pairs, dtype=torch.long),
        }


def completion_values(values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Left-align the completion positions of `rows`: [len(rows), width] (zero beyond each)."""
    out = values.new_zeros((len(rows), width))
    for k, row in enumerate(rows.tolist()):
        picked = values[row][mask[row] > 0]
        out[k, : picked.numel()] = picked
    return out


# ----------------------------------------------------------------------------- trainer


class CUTTrainer(FeedbackTrainer, Trainer):
    """MLE on Align-P / Align-N, unlikelihood on the inappropriate tokens of Misalign."""

    def __init__(self, *args: Any, method: CUTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_feedback(None)
        self.method = method or CUTConfig()

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        input_ids = inputs["input_ids"]
        pairs = inputs["pair_index"]
        logps = score_completions(
            model, input_ids, inputs["attention_mask"], inputs["completion_mask"], full_forward=self.full_forward
        ).logps
        mask = shift_mask(inputs["completion_mask"])
        n_align = input_ids.shape[0] - len(pairs)
        align_logps, align_mask = logps[:n_align], mask[:n_align]
        misalign_losses = misalign_mask = None
        if len(pairs):
            width = int(mask[n_align:].sum(-1).max().item())
            misalign_rows = torch.arange(n_align, input_ids.shape[0])
            lp_without = completion_values(logps, mask, misalign_rows, width)
            lp_with = completion_values(logps, mask, pairs, width)
            misalign_mask = completion_values(mask, mask, misalign_rows, width)
            misalign_losses, detected = misalign_token_losses(
                lp_without, lp_with, misalign_mask, self.method.threshold, self.method.alpha, self.method.gamma
            )
            self.store(
                **{
                    "cut/inappropriate_rate": detected.sum() / misalign_mask.sum().clamp(min=1),
                    "loss/misalign": misalign_losses.sum() / misalign_mask.sum().clamp(min=1),
                }
            )
        loss = cut_loss(align_logps, align_mask, misalign_losses, misalign_mask)
        self.store(
            **{"loss/align_mle": masked_mean(-align_logps, align_mask), "cut/negative_share": len(pairs) / max(n_align, 1)}
        )
        return (loss, {"logps": logps}) if return_outputs else loss
