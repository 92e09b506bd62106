"""TRL's KTO loss and its logged metrics, on packed log-probs.

Exactly TRL 1.x KTOTrainer (Ethayarajh et al., 2024, Eqn. 7) for its two loss types:
    z0 = clamp(mean_batch(pi(y'|x) - ref(y'|x)), min=0), detached   (KL from mismatched pairs y')
    kto:               desirable 1 - sigmoid(beta * (r - z0)), undesirable 1 - sigmoid(beta * (z0 - r))
    apo_zero_unpaired: desirable 1 - sigmoid(beta * r),        undesirable sigmoid(beta * r)   (no KL term)
with r = pi(y|x) - ref(y|x) summed over the reply's tokens; each row's loss is weighted by the
desirable / undesirable weight and the batch loss is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .logps import PackedLogps

#: TRL loss types this core computes exactly; anything else runs TRL's own path
KTO_LOSS_TYPES = frozenset({"kto", "apo_zero_unpaired"})


@dataclass
class KtoLoss:
    loss: torch.Tensor
    kl: torch.Tensor  # the batch's KL estimate z0 (0 for apo_zero_unpaired), detached
    chosen_logps: torch.Tensor  # the desirable rows' reply log-probs
    rejected_logps: torch.Tensor  # the undesirable rows'
    chosen_rewards: torch.Tensor  # beta * log-ratio, detached
    rejected_rewards: torch.Tensor


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KtoLoss:
    """TRL's KTO loss of one batch: `logps` [n] the policy's reply log-probs (with gradient),
    `labels` [n] True for desirable rows, `kl_logps` [n] the policy's log-probs of the mismatched
    replies (None: no KL term, as TRL's apo_zero_unpaired)."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not in the fast core: {sorted(KTO_LOSS_TYPES)}")
    labels = labels.to(device=logps.device, dtype=torch.bool)
    if kl_logps is not None and ref_kl_logps is not None:
        kl = (kl_logps.detach() - ref_kl_logps.to(kl_logps)).mean().clamp(min=0)
    else:
        kl = logps.new_zeros(())
    ratio = logps - ref_logps.to(logps)
    chosen_ratio, rejected_ratio = ratio[labels], ratio[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_ratio - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_ratio))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen_ratio)
        rejected_losses = F.sigmoid(beta * rejected_ratio)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return KtoLoss(
        losses.nanmean(),
        kl.detach(),
        logps[labels],
        logps[~labels],
        beta * chosen_ratio.detach(),
        beta * rejected_ratio.detach(),
    )


def kto_metrics(logps: PackedLogps, labels: torch.Tensor, out: KtoLoss) -> dict[str, float]:
    """What TRL's KTOTrainer logs per step (one process), from the packed batch: the reply tokens
    are the first n sequences (the mismatched KL replies, n..2n-1, are not logged)."""
    n = labels.shape[0]
    on_reply = logps.token_seq < n
    desirable = torch.zeros_like(on_reply)
    desirable[on_reply] = labels.to(device=on_reply.device, dtype=torch.bool)[logps.token_seq[on_reply]]
    undesirable = on_reply & ~desirable
    tokens = int(on_reply.sum())
    metrics = {
        "kl": float(out.kl),
        "entropy": float(logps.entropy[on_reply].sum()) / tokens if tokens else 0.0,
    }
    if int(desirable.sum()):
        metrics["logits/chosen"] = float(logps.mean_logit[desirable].sum()) / int(desirable.sum())
    if int(undesirable.sum()):
        metrics["logits/rejected"] = float(logps.mean_logit[undesirable].sum()) / int(undesirable.sum())
    n_chosen, n_rejected = out.chosen_rewards.numel(), out.rejected_rewards.numel()
    if n_chosen:
        metrics["rewards/chosen"] = float(out.chosen_rewards.nansum()) / n_chosen
        metrics["logps/chosen"] = float(out.chosen_logps.detach().nansum()) / n_chosen
    if n_rejected:
        metrics["rewards/rejected"] = float(out.rejected_rewards.nansum()) / n_rejected
        metrics["logps/rejected"] = float(out.rejected_logps.detach().nansum()) / n_rejected
    if n_chosen and n_rejected:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
