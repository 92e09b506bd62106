"""C3PO (Stephan et al., "RLVF: Learning from Verbal Feedback without Overgeneralization", 2024).

One verbal feedback, three kinds of prompts:
  in-scope      the feedback applies: DPO with chosen = revised reply, rejected = baseline reply;
  near-scope    related, the feedback must NOT apply: keep the original model's own reply;
  out-of-scope  unrelated: keep the original model's own reply.

    L = L_DPO(in) + sigma_soft * R(out-of-scope) + sigma_hard * R(near-scope)

R is the NLL of the original model's reply or the KL from the reference (the original
model) to the policy on those replies' tokens. `reduction="sequence"` sums R over a reply's
tokens and averages over replies (the paper's -log pi(y|x), in the same units as DPO's
sequence log-probs); `reduction="token"` averages over tokens instead, as the authors' code
does through the HF loss, which makes the constraint about reply-length times weaker. The
defaults live in `C3POConfig` (trainers/c3po_config.py) only. The math is in plain
functions; `C3POTrainer` wires it into a transformers `Trainer` (one padded batch holds
chosen, rejected, near and out rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .c3po_config import C3POConfig, Reduction
from .sequences import FeedbackTrainer, forward_logits, masked_mean, pad_right, shift_mask, token_logps

ROLES = ("chosen", "rejected", "near", "out")


# ----------------------------------------------------------------------------- math


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO on sequence log-probs [B]: per-pair losses, chosen and rejected rewards."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """'sequence': sum over each row's masked tokens, mean over rows; 'token': mean over all masked tokens."""
    if reduction == "token":
        return masked_mean(per_token, mask)
    return (per_token * mask).sum(-1).mean()


def completion_nll(logps: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens (per sequence, or per token)."""
    return reduce(-logps, mask, reduction)


def kl_to_reference(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, temperature: float, reduction: Reduction
) -> torch.Tensor:
    """KL(reference || policy) of the next-token distributions at masked positions, softened
    by `temperature` and scaled by T^2 (knowledge-distillation form). `mask` is aligned with
    the logits (1 where the position predicts a completion token)."""
    ref = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    pol = torch.log_softmax(policy_logits.float() / temperature, dim=-1)
    per_token = (ref.exp() * (ref - pol)).sum(-1)
    return reduce(per_token, mask, reduction) * temperature**2


def c3po_loss(
    dpo_losses: torch.Tensor, out_of_scope: torch.Tensor, near_scope: torch.Tensor, sigma_soft: float, sigma_hard: float
) -> torch.Tensor:
    """L_DPO (mean over pairs) + sigma_soft * out-of-scope term + sigma_hard * near-scope term."""
    return dpo_losses.mean() + sigma_soft * out_of_scope + sigma_hard * near_scope


# ----------------------------------------------------------------------------- data


@dataclass
class C3POCollator:
    """Examples hold token ids per role: `{role}_prompt` and `{role}_completion` for role in
    chosen/rejected/near/out (chosen and rejected share the in-scope prompt). Returns one
    right-padded batch with rows ordered [chosen..., rejected..., near..., out...]."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for role in ROLES:
            for ex in examples:
                prompt, completion = ex[f"{role}_prompt"], ex[f"{role}_completion"]
                ids.append(list(prompt) + list(completion))
                masks.append([0] * len(prompt) + [1] * len(completion))
        input_ids = pad_right(ids, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(r) for r in ids], 0, input_ids.shape[1]),
            "completion_mask": pad_right(masks, 0, input_ids.shape[1]),
        }


def build_examples(
    tokenizer: Any,
    in_scope: list[dict[str, Any]],
    near_scope: list[dict[str, Any]],
    out_of_scope: list[dict[str, Any]],
    max_length: int,
) -> list[dict[str, list[int]]]:
    """Token examples, one per row of the largest scope (smaller scopes are cycled).

    in_scope rows: prompt, revised (chosen), baseline (rejected); near/out rows: prompt,
    baseline (the original model's own reply). `baseline_finished` / `revised_finished` false
    marks a reply cut off at the sampling limit: it gets no end-of-turn token.
    """
    from pipeline.chat import render_ids

    from .sequences import completion_ids, fit_length

    if not in_scope or not near_scope or not out_of_scope:
        raise ValueError(f"C3PO needs rows of every scope (in {len(in_scope)}, near {len(near_scope)}, out {len(out_of_scope)})")

    def encode(prompt: Any, text: str, finished: bool = True) -> tuple[list[int], list[int]]:
        return fit_length(render_ids(tokenizer, prompt), completion_ids(tokenizer, text, finished), max_length)

    n = max(len(in_scope), len(near_scope), len(out_of_scope))
    examples = []
    for i in range(n):
        row, near, out = in_scope[i % len(in_scope)], near_scope[i % len(near_scope)], out_of_scope[i % len(out_of_scope)]
        example: dict[str, list[int]] = {}
        example["chosen_prompt"], example["chosen_completion"] = encode(
            row["prompt"], row["revised"], row.get("revised_finished", True)
        )
        example["rejected_prompt"], example["rejected_completion"] = encode(
            row["prompt"], row["baseline"], row.get("baseline_finished", True)
        )
        example["near_prompt"], example["near_completion"] = encode(
            near["prompt"], near["baseline"], near.get("baseline_finished", True)
        )
        example["out_prompt"], example["out_completion"] = encode(
            out["prompt"], out["baseline"], out.get("baseline_finished", True)
        )
        examples.append(example)
    return examples


def split_roles(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(ROLES, tensor.chunk(len(ROLES), dim=0)))


# ----------------------------------------------------------------------------- trainer


class C3POTrainer(FeedbackTrainer, Trainer):
    """DPO on in-scope pairs plus a constraint that keeps near- and out-of-scope replies."""

    def __init__(self, *args: Any, method: C3POConfig | None = None, ref_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_feedback(ref_model)
        self.method = method or C3POConfig()

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        cfg = self.method
        input_ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        logits = forward_logits(model, input_ids, attention)
        logps = token_logps(logits, input_ids)
        mask = shift_mask(completion)
        sequence = (logps * mask).sum(-1)
        n = input_ids.shape[0] // len(ROLES)
        # The reference sees chosen+rejected (DPO); with the KL regulariser also near+out.
        ref_rows = slice(0, 4 * n) if cfg.regularizer == "kl" else slice(0, 2 * n)
        with self.reference(model) as ref:
            ref_logits = forward_logits(ref, input_ids[ref_rows], attention[ref_rows])
        ref_sequence = (token_logps(ref_logits, input_ids[ref_rows]) * mask[ref_rows]).sum(-1)

        seq, ref_seq, m, lp = (
            split_roles(sequence),
            ref_sequence.chunk(ref_sequence.shape[0] // n),
            split_roles(mask),
            split_roles(logps),
        )
        losses, chosen_r, rejected_r = dpo_loss(seq["chosen"], seq["rejected"], ref_seq[0], ref_seq[1], cfg.beta)
        if cfg.regularizer == "kl":
            pol, refl = split_roles(logits[:, :-1]), ref_logits[:, :-1].chunk(4)
            near = kl_to_reference(pol["near"], refl[2], m["near"], cfg.kl_temperature, cfg.reduction)
            out = kl_to_reference(pol["out"], refl[3], m["out"], cfg.kl_temperature, cfg.reduction)
        else:
            near = completion_nll(lp["near"], m["near"], cfg.reduction)
            out = completion_nll(lp["out"], m["out"], cfg.reduction)
        loss = c3po_loss(losses, out, near, cfg.sigma_soft, cfg.sigma_hard)
        self.store(
            **{
                "loss/dpo": losses.mean(),
                f"loss/near_scope_{cfg.regularizer}": near,
                f"loss/out_of_scope_{cfg.regularizer}": out,
                "rewards/chosen": chosen_r.mean(),
                "rewards/rejected": rejected_r.mean(),
                "rewards/margins": (chosen_r - rejected_r).mean(),
                "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            }
        )
        return (loss, {"logits": logits}) if return_outputs else loss
