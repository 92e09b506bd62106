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
functions; `C3POTrainer` wires it into a transformers `Trainer`. A batch is packed where the
model allows (`pack_examples`: an example's in-scope prompt runs once for both replies, no
padding; the same loss and gradients, tested), else one padded batch holds chosen, rejected,
near and out rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .c3po_config import C3POConfig, Reduction
from .fastpref.logps import chunked_kl
from .sequences import FeedbackTrainer, masked_mean, pad_right, projects_hidden_states, score_completions, shift_mask

ROLES = ("chosen", "rejected", "near", "out")
#: packed rows hold units up to this many tokens (a batch of 4 demo examples fits one row)
ROW_TOKENS = 2048


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


def near_and_out(
    per_position: torch.Tensor, near_positions: int, n_replies: int, reduction: Reduction
) -> tuple[torch.Tensor, torch.Tensor]:
    """The near- and out-of-scope terms from per-position values of the near replies' positions
    followed by the out replies' (`near_positions` of them are near's), `n_replies` replies each."""
    near = reduce_positions(per_position[:near_positions], n_replies, reduction)
    return near, reduce_positions(per_position[near_positions:], n_replies, reduction)


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
    chosen/rejected/near/out (chosen and rejected share the in-scope prompt), and an `index`,
    passed on as `example_index` (the trainer's reference cache is keyed by it).

    `packed` False (or None, until a `C3POTrainer` decides for its model): one right-padded batch,
    rows ordered [chosen..., rejected..., near..., out...]. True: `pack_examples`' batch, no padding
    and the in-scope prompt run once for both replies."""

    pad_token_id: int
    packed: bool | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.packed:
            return pack_examples(examples, self.pad_token_id)
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


def pack_examples(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One packed batch (trainers/fastpref/packing.py) of C3PO examples.

    Why: the padded batch runs the in-scope prompt twice (once before each reply) and pads every
    row to the longest of the 4n. Here an example's in-scope prompt, revision and baseline are one
    unit (the baseline sees the prompt, never the revision), its near and out rows a unit each
    (prompt and reply), placed into rows of up to `ROW_TOKENS` (or the longest unit's length)
    with no padding between them; the attention is the DPO core's two causal pieces per unit, so no
    unit sees another. (The rows' [L, L] mask, kept for eager attention, bounds the row length.) On the C3PO demo's rows (prompts ~40 tokens, replies
    ~64) the body runs on about a fifth fewer tokens. An example whose two prompts differ
    (`fit_length` trimmed them differently) gets a unit per reply.

    Besides `pack`'s tensors: `role_seq` [4, n], the sequence id (`score_seq`'s numbering) of each
    example's chosen, rejected, near and out reply, and `example_index` when every example has one.
    """
    from .fastpref.packing import Unit, pack

    units: list[Unit] = []
    owner: list[tuple[int, int]] = []  # per example and role: (unit, 0 = the unit's first reply | 1 = its second)
    for ex in examples:
        if ex["chosen_prompt"] == ex["rejected_prompt"]:
            units.append(Unit(list(ex["chosen_prompt"]), list(ex["chosen_completion"]), list(ex["rejected_completion"])))
            owner += [(len(units) - 1, 0), (len(units) - 1, 1)]
        else:
            for role in ("chosen", "rejected"):
                units.append(Unit(list(ex[f"{role}_prompt"]), list(ex[f"{role}_completion"]), []))
                owner.append((len(units) - 1, 0))
        for role in ("near", "out"):
            units.append(Unit(list(ex[f"{role}_prompt"]), list(ex[f"{role}_completion"]), []))
            owner.append((len(units) - 1, 0))
    batch = pack(units, pad_token_id, capacity=min(sum(len(u) for u in units), ROW_TOKENS))
    sequence = [unit + second * len(units) for unit, second in owner]  # pack numbers second replies after all first ones
    batch["role_seq"] = torch.tensor(sequence, dtype=torch.long).view(len(examples), len(ROLES)).t().contiguous()
    batch["n_sequences"] = 2 * len(units)
    if all("index" in ex for ex in examples):
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
        if isinstance(self.data_collator, C3POCollator) and self.data_collator.packed is None:
            self.data_collator = replace(self.data_collator, packed=self.packs(self.model))

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        cfg = self.method
        terms = self._packed_terms(model, inputs) if "role_seq" in inputs else self._padded_terms(model, inputs)
        losses, chosen_r, rejected_r = dpo_loss(terms.chosen, terms.rejected, terms.ref_chosen, terms.ref_rejected, cfg.beta)
        loss = c3po_loss(losses, terms.out, terms.near, cfg.sigma_soft, cfg.sigma_hard, terms.chosen_nll, cfg.rpo_alpha)
        if cfg.rpo_alpha:
            self.store(**{"loss/chosen_nll": terms.chosen_nll})
        self.store(
            **{
                "loss/dpo": losses.mean(),
                f"loss/near_scope_{cfg.regularizer}": terms.near,
                f"loss/out_of_scope_{cfg.regularizer}": terms.out,
                "rewards/chosen": chosen_r.mean(),
                "rewards/rejected": rejected_r.mean(),
                "rewards/margins": (chosen_r - rejected_r).mean(),
                "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            }
        )
        return (loss, {"logps": terms.logps}) if return_outputs else loss

    def packs(self, model: Any) -> bool:
        """Whether batches for `model` can be packed (`pack_examples`): one process on at most one
        device (DDP and DataParallel wrap the model's forward), a causal LM whose scores come from
        the body's hidden states, SDPA attention without attention dropout (eager attention, or SDPA
        with dropout, would score each packed row's whole [L, L] square), and (KL regulariser) a frozen
        head. Anything else takes the padded batch, among it a model with a sliding attention window
        (the packed pieces attend over the whole causal context; fastpref.logps.attention_window).
        Decided once, when the trainer is built: set `full_forward` before that (a packed batch with
        `full_forward` on is an error)."""
        from .fastpref.logps import attention_window, unwrap_peft

        config = unwrap_peft(model).config
        attention = getattr(config, "_attn_implementation", None) or "sdpa"
        return (
            not self.full_forward
            and self.args.world_size == 1
            and self.args.n_gpu <= 1
            and projects_hidden_states(model)
            and attention == "sdpa"
            and not getattr(config, "attention_dropout", 0.0)
            and attention_window(model) is None
            and not (self.method.regularizer == "kl" and head_trains(model))
        )

    def _padded_terms(self, model: Any, inputs: dict[str, torch.Tensor]) -> LossTerms:
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
        if kl_rows is not None:
            if policy.logits is not None:
                per_position = kl_per_position(policy.logits, ref_kl, cfg.kl_temperature)
            else:
                assert policy.hidden is not None
                per_position = chunked_kl(policy.hidden, ref_kl, policy.head.weight, policy.head.bias, cfg.kl_temperature)
            near, out = near_and_out(per_position, int(m["near"].sum().item()), n, cfg.reduction)
        else:
            near = completion_nll(lp["near"], m["near"], cfg.reduction)
            out = completion_nll(lp["out"], m["out"], cfg.reduction)
        chosen_nll = completion_nll(lp["chosen"], m["chosen"], "token")
        return LossTerms(seq["chosen"], seq["rejected"], ref_chosen, ref_rejected, near, out, chosen_nll, logps)

    def _packed_terms(self, model: Any, inputs: dict[str, Any]) -> LossTerms:
        """The loss terms of a packed batch (`pack_examples`): the same numbers as the padded batch's."""
        cfg = self.method
        if self.full_forward or not projects_hidden_states(model):
            raise ValueError("a packed C3PO batch needs the model's body and head (C3POCollator(packed=False) otherwise)")
        kl = cfg.regularizer == "kl"
        roles, n = inputs["role_seq"], inputs["role_seq"].shape[1]
        policy = score_packed(model, inputs, kl)
        seq = dict(zip(ROLES, (policy.sequence[r] for r in roles)))
        count = dict(zip(ROLES, (policy.tokens[r] for r in roles)))
        ref_chosen, ref_rejected, ref_kl = self.packed_reference(model, inputs, kl)
        if kl:
            assert policy.hidden is not None
            per_position = chunked_kl(policy.hidden, ref_kl, policy.head.weight, policy.head.bias, cfg.kl_temperature)
            near, out = near_and_out(per_position, int(count["near"].sum().item()), n, cfg.reduction)
        else:
            near = sequence_nll(seq["near"], count["near"], cfg.reduction)
            out = sequence_nll(seq["out"], count["out"], cfg.reduction)
        chosen_nll = sequence_nll(seq["chosen"], count["chosen"], "token")
        return LossTerms(seq["chosen"], seq["rejected"], ref_chosen, ref_rejected, near, out, chosen_nll, policy.sequence)

    def packed_reference(self, model: Any, inputs: dict[str, Any], kl: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`reference_scores` for a packed batch: from the per-example cache when every example is
        in it, else one reference forward over the packed batch (its new examples then cached)."""
        index = inputs.get("example_index")
        keys = index.tolist() if index is not None else None
        if keys is not None and all(key in self._ref_cache for key in keys):
            entries = [self._ref_cache[key] for key in keys]
        else:
            roles = inputs["role_seq"]
            with self.reference(model) as ref:
                scores = score_packed(ref, inputs, kl)
            chosen, rejected = scores.sequence[roles[0]], scores.sequence[roles[1]]
            parts: list[Any] = [None] * (2 * roles.shape[1])
            if kl and scores.hidden is not None:
                counts = scores.tokens[roles[2:].flatten()].tolist()
                parts = [h.clone() for h in scores.hidden.split(counts)]  # type: ignore[no-untyped-call]
            n = roles.shape[1]
            entries = [ReferenceEntry(chosen[i], rejected[i], parts[i], parts[n + i]) for i in range(n)]
            for key, entry in zip(keys or [], entries):
                if key not in self._ref_cache:
                    self._keep(key, entry)
        return stacked(entries, kl)

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
        return stacked([found[k] for k in range(n)], kl_rows is not None)

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
            self._keep(keys[i], entry)
        return entries

    def _keep(self, key: int, entry: ReferenceEntry) -> None:
        """Cache one example's reference numbers while `ref_cache_bytes` has room."""
        if self._ref_cache_used + entry.nbytes() <= self.ref_cache_bytes:
            self._ref_cache[key] = entry
            self._ref_cache_used += entry.nbytes()


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


@dataclass
class LossTerms:
    """What C3PO's loss is made of, from either batch layout: policy and reference sequence
    log-probs of the revisions and baselines [n], the near- and out-of-scope terms, the revisions'
    per-token NLL, and the policy's log-probs for `return_outputs`."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    near: torch.Tensor
    out: torch.Tensor
    chosen_nll: torch.Tensor
    logps: torch.Tensor


@dataclass
class PackedScores:
    """A packed C3PO batch, scored: per sequence (`score_seq`'s numbering) the summed log-probs of
    its tokens [S] (0 for the near and out replies under the KL) and its number of scored tokens [S];
    under the KL, the hidden states at the near replies' positions, then the out replies' [M, H]
    (example order, each reply's positions in order: the padded path's row-major order), and the head."""

    sequence: torch.Tensor
    tokens: torch.Tensor
    hidden: torch.Tensor | None
    head: Any


def score_packed(model: Any, batch: dict[str, Any], kl: bool) -> PackedScores:
    """Score a `pack_examples` batch: the body once over the packed rows, then only the scored
    positions through the head (chunked log-probs), except the near and out replies' positions
    under the KL, whose hidden states are returned for `chunked_kl`."""
    from .fastpref.logps import TILE_ELEMENTS, ChunkedLogps, packed_hidden

    hidden, head = packed_hidden(model, batch)
    seq, roles, total = batch["score_seq"], batch["role_seq"], batch["n_sequences"]
    tokens = torch.bincount(seq, minlength=total)
    kl_seqs = roles[2:].flatten() if kl else roles.new_empty(0)
    on_kl = torch.zeros(total, dtype=torch.bool, device=seq.device)
    on_kl[kl_seqs] = True
    on_kl = on_kl[seq]
    keep = (~on_kl).nonzero(as_tuple=True)[0]
    logp = ChunkedLogps.apply(  # type: ignore[no-untyped-call]
        hidden[keep], head.weight, head.bias, batch["score_target"][keep], TILE_ELEMENTS, False, torch.is_grad_enabled()
    )[0]
    sequence = logp.new_zeros(total).index_add(0, seq[keep], logp)
    kl_hidden = None
    if kl:
        rank = torch.zeros(total, dtype=torch.long, device=seq.device)
        rank[kl_seqs] = torch.arange(len(kl_seqs), device=seq.device)
        where = on_kl.nonzero(as_tuple=True)[0]
        order = torch.sort(rank[seq[where]], stable=True).indices
        kl_hidden = hidden[where[order]]
    return PackedScores(sequence, tokens, kl_hidden, head)


def sequence_nll(sums: torch.Tensor, tokens: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """`completion_nll` from replies' summed log-probs and token counts: 'sequence' the mean of the
    replies' NLL, 'token' the NLL per token over all of them."""
    if reduction == "token":
        return -sums.sum() / tokens.sum().clamp(min=1)
    return -sums.mean()


def stacked(entries: list[ReferenceEntry], kl: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A batch's reference numbers from its examples' entries: chosen and rejected log-probs [n] and,
    with the KL, the near replies' hidden states then the out replies' (example order)."""
    chosen = torch.stack([e.chosen for e in entries])
    rejected = torch.stack([e.rejected for e in entries])
    if not kl:
        return chosen, rejected, None
    near = [e.near for e in entries if e.near is not None]
    out = [e.out for e in entries if e.out is not None]
    return chosen, rejected, torch.cat(near + out)


def head_trains(model: Any) -> bool:
    """Whether the LM head has trainable weights (the KL then takes the full logits: ChunkedKL needs it frozen)."""
    from .fastpref.logps import unwrap_peft

    head = unwrap_peft(model).get_output_embeddings()
    return head is None or any(p.requires_grad for p in head.parameters())
