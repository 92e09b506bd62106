"""TRL's sigmoid DPO loss and its metrics, on packed log-probs; plus the optional NLL term.

Exactly TRL 1.x DPOTrainer (loss_type "sigmoid", f-divergence "reverse_kl"):
    loss = mean_i -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
with sequence log-probs summed over reply tokens; rewards = beta * (pi - ref).
The NLL term is TRL's "sft" loss type (RPO, Pang et al. 2024): the mean negative
log-probability of the chosen replies' tokens, weighted by `alpha` (`rpo_alpha` in
trainers/dpo_config.py; issue 13: it makes the preferred reply what the model writes, not
only relatively likelier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .logps import PackedLogps

#: TRL loss types this core computes exactly; anything else runs TRL's own path
SUPPORTED_LOSS_TYPES = frozenset({"sigmoid", "sft"})


@dataclass
class DpoLoss:
    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def dpo_loss(
    logps: PackedLogps,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_types=("sigmoid",),
    loss_weights=None,
) -> DpoLoss:
    """The weighted sum of TRL's `loss_types` (sigmoid, sft) for one packed batch."""
    chosen, rejected = logps.chosen_rejected()
    chosen_ratio = chosen - ref_chosen.to(chosen)
    rejected_ratio = rejected - ref_rejected.to(rejected)
    weights = loss_weights or [1.0] * len(loss_types)
    loss = chosen.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "sigmoid":
            term = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
        elif loss_type == "sft":
            term = -logps.token_logps[logps.token_seq < logps.n_pairs].mean()
        else:
            raise ValueError(f"loss_type {loss_type!r} is not in the fast core: {sorted(SUPPORTED_LOSS_TYPES)}")
        terms[loss_type] = term.detach()
        loss = loss + term * weight
    return DpoLoss(loss, chosen, rejected, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), terms)


def trl_metrics(logps: PackedLogps, out: DpoLoss) -> dict[str, float]:
    """What TRL's DPOTrainer logs per step (single process), from the packed batch."""
    n = logps.n_pairs
    is_chosen = logps.token_seq < n
    chosen_tokens = int(is_chosen.sum())
    rejected_tokens = int((~is_chosen).sum())
    return {
        "entropy": float(logps.entropy.mean()) if logps.entropy.numel() else 0.0,
        "logits/chosen": float(logps.mean_logit[is_chosen].sum()) / chosen_tokens if chosen_tokens else 0.0,
        "logits/rejected": float(logps.mean_logit[~is_chosen].sum()) / rejected_tokens if rejected_tokens else 0.0,
        "mean_token_accuracy": float(logps.top1[is_chosen].float().mean()) if chosen_tokens else 0.0,
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
        "rewards/accuracies": float((out.chosen_rewards > out.rejected_rewards).float().mean()),
        "rewards/margins": float((out.chosen_rewards - out.rejected_rewards).mean()),
        "logps/chosen": float(out.chosen_logps.detach().mean()),
        "logps/rejected": float(out.rejected_logps.detach().mean()),
    }
