"""C3PO (Stephan et al., "RLVF: Learning from Verbal Feedback without Overgeneralization", 2024).

One verbal feedback, three kinds of prompts:
  in-scope      the feedback applies: DPO with chosen = revised reply, rejected = baseline reply;
  near-scope    related, the feedback must NOT apply: keep the original model's own reply;
  out-of-scope  unrelated: keep the original model's own reply.

    L = L_DPO(in) + sigma_soft * R(out-of-scope) + sigma_hard * R(near-scope)  [+ rpo_alpha * NLL(revision)]

The last term (`rpo_alpha`, 1.0 by default; not in the paper, 0 drops it) is RPO's remedy: the
DPO term can make the revision preferred over the baseline without making it the reply the
model writes (measured on a length feedback, docs/arena.md); an NLL on the revision does.
R is the NLL of the original model's reply or the KL from the reference (the original
model) to the policy on those replies' tokens. Only completion positions go through the LM
head (`sequences.score_completions`): full-vocabulary logits are kept only where the KL needs
them, at the near- and out-of-scope replies' positions, and there the KL runs in tiles from
hidden states (`fastpref.logps.ChunkedKL`). The reference is frozen: its numbers per example
(sequence log-probs, hidden states at the KL positions) are computed once and reused. `reduction="sequence"` sums R over a reply's
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
from .fastpref.logps import chunked_kl
from .sequences import FeedbackTrainer, masked_mean, pad_right, projects_hidden_states, score_completions, shift_mask

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


def kl_per_position(policy_logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(reference || policy) of the next-token distributions at each position ([M, V] logits
    -> [M]), softened by `temperature` and scaled by T^2 (knowledge-distillation form)."""
    ref = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    pol = torch.log_softmax(policy_logits.float() / temperature, dim=-1)
    return (ref.exp() * (ref - pol)).sum(-1) * temperature**2


def reduce_positions(per_position: torch.Tensor, n_replies: int, reduction: Reduction) -> torch.Tensor:
    """Values at the completion positions of `n_replies` replies, stacked ([M]): 'sequence' sums per
    reply and averages over replies; 'token' averages over positions."""
    if reduction == "token":
        return per_position.sum() / max(per_position.shape[0], 1)
    return per_position.sum() / max(n_replies, 1)


def kl_to_reference(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, n_replies: int, temperature: float, reduction: Reduction
) -> torch.Tensor:
    """The KL regulariser of `n_replies` replies from their positions' logits ([M, V] each)."""
    return reduce_positions(kl_per_position(policy_logits, ref_logits, temperature), n_replies, reduction)


def c3po_loss(
    dpo_losses: torch.Tensor,
    out_of_scope: torch.Tensor,
    near_scope: torch.Tensor,
    sigma_soft: float,
    sigma_hard: float,
    chosen_nll: torch.Tensor | None = None,
    rpo_alpha: float | None = None,
) -> torch.Tensor:
    """L_DPO (mean over pairs) + sigma_soft * out-of-scope term + sigma_hard * near-scope term
    (+ rpo_alpha * the revisions' per-token NLL, when set)."""
    loss = dpo_losses.mean() + sigma_soft * out_of_scope + sigma_hard * near_scope
    if rpo_alpha and chosen_nll is not None:
        loss = loss + rpo_alpha * chosen_nll
    return loss


# ----------------------------------------------------------------------------- data


@dataclass
class C3POCollator:
    """Examples hold token ids per role: `{role}_prompt` and `{role}_completion` for role in
    chosen/rejected/near/out (chosen and rejected share the in-scope prompt). Returns one
    right-padded batch with rows ordered [chosen..., rejected..., near..., out...], and each
    example's `index` as `example_index` (the trainer's reference cache is keyed by it)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for role in ROLES:
            for ex in examples:
                prompt, completion = ex[f"{role}_prompt"], ex[f"{role}_completion"]
                ids.append(list(prompt) + list(completion))
                masks.append([0] * len(prompt) + [1] * len(completion))
        input_ids = pad_right(ids, self.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": pad_right([[1] * len(r) for r in ids], 0, input_ids.shape[1]),
            "completion_mask": pad_right(masks, 0, input_ids.shape[1]),
        }
        if all("index" in ex for ex in examples):  # keys the trainer's reference cache
            batch["example_index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return batch


def build_examples(
    tokenizer: Any,
    in_scope: list[dict[str, Any]],
    near_scope: list[dict[str, Any]],
    out_of_scope: list[dict[str, Any]],
    max_length: int,
) -> list[dict[str, Any]]:
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
        example: dict[str, Any] = {"index": i}
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

    def __init__(
        self,
        *args: Any,
        method: C3POConfig | None = None,
        ref_model: Any = None,
        ref_cache_bytes: int = 1 << 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_feedback(ref_model)
        self.method = method or C3POConfig()
        #: bytes of reference numbers kept per example across steps (see `reference_scores`)
        self.ref_cache_bytes = ref_cache_bytes
        self._ref_cache: dict[int, ReferenceEntry] = {}
        self._ref_cache_used = 0

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        cfg = self.method
        input_ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        n = input_ids.shape[0] // len(ROLES)
        # With the KL regulariser the near and out rows (2n onward) keep what the KL needs at their
        # completion positions: full logits, or (projecting only completion positions) hidden states.
        kl_rows = slice(2 * n, 4 * n) if cfg.regularizer == "kl" else None
        full = self.full_forward or not projects_hidden_states(model) or (kl_rows is not None and head_trains(model))
        policy = score_completions(model, input_ids, attention, completion, kl_rows, full)
        logps, mask = policy.logps, shift_mask(completion)
        seq, m, lp = split_roles(logps.sum(-1)), split_roles(mask), split_roles(logps)
        ref_chosen, ref_rejected, ref_kl = self.reference_scores(model, inputs, n, kl_rows, full)
        losses, chosen_r, rejected_r = dpo_loss(seq["chosen"], seq["rejected"], ref_chosen, ref_rejected, cfg.beta)
        if kl_rows is not None:
            if policy.logits is not None:
                per_position = kl_per_position(policy.logits, ref_kl, cfg.kl_temperature)
            else:
                assert policy.hidden is not None
                per_position = chunked_kl(policy.hidden, ref_kl, policy.head.weight, policy.head.bias, cfg.kl_temperature)
            near_positions = int(m["near"].sum().item())  # row-major: near's positions come before out's
            near = reduce_positions(per_position[:near_positions], n, cfg.reduction)
            out = reduce_positions(per_position[near_positions:], n, cfg.reduction)
        else:
            near = completion_nll(lp["near"], m["near"], cfg.reduction)
            out = completion_nll(lp["out"], m["out"], cfg.reduction)
        chosen_nll = completion_nll(lp["chosen"], m["chosen"], "token")
        loss = c3po_loss(losses, out, near, cfg.sigma_soft, cfg.sigma_hard, chosen_nll, cfg.rpo_alpha)
        if cfg.rpo_alpha:
            self.store(**{"loss/chosen_nll": chosen_nll})
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
        return (loss, {"logps": logps}) if return_outputs else loss

    def reference_scores(
        self, model: Any, inputs: dict[str, torch.Tensor], n: int, kl_rows: slice | None, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The reference's chosen and rejected sequence log-probs [n] each and, with the KL, what the
        KL needs at the near and out replies' positions (logits on the full forward, else hidden states).

        The reference is frozen, so on the projected path its numbers per example are computed the
        first time the example is seen and kept (`ref_cache_bytes` at most; a cache miss computes
        again): later epochs run no reference forward. The full forward's [positions, vocab] logits
        are too large to keep; that path computes them every step."""
        input_ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        roles = 4 if kl_rows is not None else 2
        index = inputs.get("example_index")
        if full or index is None:
            rows = slice(0, roles * n)
            with self.reference(model) as ref:
                scores = score_completions(ref, input_ids[rows], attention[rows], completion[rows], kl_rows, full)
            sequence = scores.logps.sum(-1)
            return sequence[:n], sequence[n : 2 * n], scores.logits if full else scores.hidden
        keys = index.tolist()
        found = {k: self._ref_cache[key] for k, key in enumerate(keys) if key in self._ref_cache}
        missing = [k for k in range(n) if k not in found]
        if missing:
            found.update(self._reference_entries(model, inputs, n, missing, kl_rows, keys))
        entries = [found[k] for k in range(n)]
        chosen = torch.stack([e.chosen for e in entries])
        rejected = torch.stack([e.rejected for e in entries])
        if kl_rows is None:
            return chosen, rejected, None
        near = [e.near for e in entries if e.near is not None]
        out = [e.out for e in entries if e.out is not None]
        return chosen, rejected, torch.cat(near + out)

    def _reference_entries(
        self, model: Any, inputs: dict[str, torch.Tensor], n: int, missing: list[int], kl_rows: slice | None, keys: list[int]
    ) -> dict[int, ReferenceEntry]:
        """Reference numbers for the batch's examples at positions `missing`, kept in the cache while it has room."""
        roles = 4 if kl_rows is not None else 2
        k = len(missing)
        rows = [role * n + i for role in range(roles) for i in missing]
        ids, attention, completion = inputs["input_ids"][rows], inputs["attention_mask"][rows], inputs["completion_mask"][rows]
        with self.reference(model) as ref:
            scores = score_completions(ref, ids, attention, completion, slice(2 * k, 4 * k) if kl_rows is not None else None)
        sequence = scores.logps.sum(-1)
        hidden: list[Any] = [None] * (2 * k)
        if kl_rows is not None and scores.hidden is not None:
            counts = shift_mask(completion)[2 * k :].sum(-1).long().tolist()
            hidden = list(scores.hidden.split(counts))  # type: ignore[no-untyped-call]
        entries = {}
        for j, i in enumerate(missing):
            entry = ReferenceEntry(sequence[j], sequence[k + j], hidden[j], hidden[k + j])
            entries[i] = entry
            if self._ref_cache_used + entry.nbytes() <= self.ref_cache_bytes:
                self._ref_cache[keys[i]] = entry
                self._ref_cache_used += entry.nbytes()
        return entries


@dataclass
class ReferenceEntry:
    """One example's reference numbers: chosen and rejected sequence log-probs, and (KL) the
    reference's hidden states at its near and out replies' completion positions."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    near: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.chosen, self.rejected, self.near, self.out) if t is not None)


def head_trains(model: Any) -> bool:
    """Whether the LM head has trainable weights (the KL then takes the full logits: ChunkedKL needs it frozen)."""
    from .fastpref.logps import unwrap_peft

    head = unwrap_peft(model).get_output_embeddings()
    return head is None or any(p.requires_grad for p in head.parameters())
