"""FastSFTTrainer: TRL's SFTTrainer whose loss projects only the positions that have a label.

Why: on a CPU, TRL's fused LM head (trl 1.16) scores every position of the padded batch,
prompt and padding included (it keeps only the labelled ones on Triton devices), and its
torch fallback builds each [tokens, vocab] tile's softmax, one-hot and gradient in several
full passes. With a 49k vocabulary that head is most of a small model's step: on `tiny`, a
follow-up-likelihood fine-tune (12 steps of 8 x 128 tokens, a short follow-up after a long
conversation) spent 59 of its 60 s there. Here the body's hidden states at the labelled
positions go through heedful's `ChunkedLogps` (trainers/fastpref/logps.py): the same
log-probabilities, a tile at a time, and with a frozen head (LoRA) the gradient built in the
forward while the tile is in hand.

Everything else stays TRL's (tokenization, collator, optimizer, checkpoints, logging), and so
do the numbers: the loss is -sum(log p(label)) over the labelled tokens divided by their count
(or by `num_items_in_batch`, as TRL divides), and the logged `entropy`, `mean_token_accuracy`
and `num_tokens` are TRL's (tests/test_fast_sft.py checks loss, gradients and metrics against
SFTTrainer). The core covers the `nll` loss on one process on a CPU, for a model whose logits
are its body's last hidden states times the head's weight; anything else (a GPU, where TRL's
Triton kernel already scores only labelled positions; DeepSpeed or FSDP, which shard the head;
DFT loss, label smoothing, a custom
`compute_loss_func`, MoE aux loss, logit scaling or soft-capping, a prompt-learning adapter
or one on the head) runs TRL's own step: `fast` is then False and `fast_off_reason` says why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from .fastpref.logps import TILE_ELEMENTS, ChunkedLogps, autocast_forward, backbone_and_head, first_unsupported, unwrap_peft

log = logging.getLogger(__name__)

#: what the collator passes that is not the body's input
_NOT_BODY_INPUTS = ("labels", "shift_labels", "num_items_in_batch", "use_cache")


class FastSFTTrainer(SFTTrainer):
    """`SFTTrainer(...)` plus keyword-only options:

    fast           score only the labelled positions with heedful's chunked head (default True);
                   False is exactly TRL's SFTTrainer
    tile_elements  elements of one [tokens, vocab] log-prob tile
    """

    args: SFTConfig

    def __init__(self, *args: Any, fast: bool = True, tile_elements: int = TILE_ELEMENTS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tile_elements = tile_elements
        self.fast_off_reason: str | None = self._unsupported() if fast else "fast=False"
        self.fast = self.fast_off_reason is None
        if fast and not self.fast:
            log.info("SFT: TRL's own step (the labelled-positions core does not cover %s)", self.fast_off_reason)

    def _unsupported(self) -> str | None:
        model = self.accelerator.unwrap_model(self.model)
        base = unwrap_peft(model)
        parallel = getattr(self.accelerator, "parallelism_config", None)
        checks = {
            # the device training runs on (DeepSpeed and FSDP place the model later, and shard the head)
            "a device other than the CPU": self.args.device.type != "cpu" or base.device.type != "cpu",
            "DeepSpeed or FSDP": bool(self.is_deepspeed_enabled or self.is_fsdp_enabled),
            f"loss_type {self.args.loss_type!r}": self.args.loss_type not in ("nll", "chunked_nll"),
            "label smoothing": self.label_smoother is not None,
            "a compute_loss_func": self.compute_loss_func is not None,
            "MoE aux loss": self.aux_loss_enabled,
            "several processes": self.accelerator.num_processes > 1,
            "context or sequence parallelism": bool(
                getattr(parallel, "cp_enabled", False) or getattr(parallel, "sp_enabled", False)
            ),
        }
        # first_unsupported adds what every chunked head needs of the model, logits the head's own
        # product among it (soft-capping, a logit scale: fastpref.logps.logit_changes)
        return first_unsupported(checks, model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.fast or return_outputs:  # the logits for compute_metrics: TRL's path builds them
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        body, head = backbone_and_head(self.accelerator.unwrap_model(model))
        with autocast_forward(self.accelerator, model):  # accelerate's autocast, as TRL's forward runs under it
            hidden = body(**{k: v for k, v in inputs.items() if k not in _NOT_BODY_INPUTS}, use_cache=False).last_hidden_state
            if "shift_labels" in inputs:
                labels = inputs["shift_labels"]
            else:
                hidden, labels = hidden[:, :-1], inputs["labels"][:, 1:]
            mask = labels != -100
            logp, entropy, _, top1 = ChunkedLogps.apply(
                hidden[mask], head.weight, head.bias, labels[mask], self.tile_elements, True, torch.is_grad_enabled()
            )
        n_labelled = mask.sum()
        # clamped as TRL clamps: an accumulation window without labels is a zero, not 0/0
        divisor = n_labelled if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=logp.device)
        loss = -logp.sum() / divisor.clamp(min=1)
        if logp.numel() == 0:  # no label in this micro-batch: a zero that is still connected to the model, as TRL's
            loss = loss + hidden.sum() * 0.0

        n = n_labelled.item()
        self._metrics[mode]["entropy"].append(entropy.sum().item() / n if n else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(top1.sum().item() / n if n else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                self._total_train_tokens += int(inputs["attention_mask"].sum().item())
            else:  # padding-free: one packed row
                self._total_train_tokens += int(inputs["position_ids"].size(1))
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
