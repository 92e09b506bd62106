"""A transformers Trainer with a pluggable loss: weighted BCE (P[Love]) and weighted token
cross-entropy (fine-grained segments). Kept here so stages stay small; pairwise and SFT
losses come from TRL (RewardTrainer, SFTTrainer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def weighted_bce(pos_weight: float) -> Callable:
    """BCE with positives weighted by `pos_weight` (class imbalance). The optimum logit moves
    by +log(pos_weight); `PLoveReward` subtracts it again so probabilities stay calibrated."""
    import torch
    import torch.nn.functional as F

    def loss(model, inputs):
        labels = inputs.pop("labels").float()
        outputs = model(**inputs)
        logits = outputs.logits.squeeze(-1).float()
        weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight), outputs

    return loss


def weighted_token_ce(class_weights: list[float] | None) -> Callable:
    """Cross-entropy over labelled tokens only (-100 elsewhere), optionally class-weighted."""
    import torch
    import torch.nn.functional as F

    def loss(model, inputs):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=weight, ignore_index=-100
        ), outputs

    return loss


def loss_trainer(model, tokenizer, dataset, args_kwargs: dict[str, Any], loss_fn: Callable, collator=None):
    """`transformers.Trainer` whose loss is `loss_fn(model, inputs) -> (loss, outputs)`."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    class _LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = loss_fn(model, dict(inputs))
            return (loss, outputs) if return_outputs else loss

    return _LossTrainer(
        model=model,
        args=TrainingArguments(**args_kwargs),
        train_dataset=dataset,
        data_collator=collator or DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )


def balanced_weights(labels: list[int], num_classes: int = 2) -> list[float]:
    """n / (k * n_c) per class (sklearn's 'balanced'); classes absent from `labels` get 1."""
    n = len(labels)
    counts = [labels.count(c) for c in range(num_classes)]
    return [n / (num_classes * c) if c else 1.0 for c in counts]
