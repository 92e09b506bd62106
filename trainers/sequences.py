"""What the language-feedback trainers (C3PO, CUT, CoH) share: encoding a completion
(prompts render through `pipeline.chat.render_ids`) into token ids with a completion mask, right-padding, per-token log-probs, and a
transformers `Trainer` base that logs averaged loss terms the way TRL's trainers do.

`score_completions` is the forward pass they share: the model's body runs on the padded batch,
and only the positions that predict a completion token go through the 49k-vocabulary head (in
tiles, `trainers/fastpref/logps.ChunkedLogps`), instead of the model's full logits for every
prompt and padding position and their log-softmax (most of a step's memory traffic on a CPU).

Completions are tokenized on their own and appended to the rendered prompt, so the same
response has the same tokens under different prompts (CUT compares a response under two
prompts token by token) and the same tokens the model emits when sampling.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


def completion_ids(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Tokens of a reply; `add_eos` ends it with the end-of-turn token (it finished)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def fit_length(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Trim to `max_length`: the prompt loses its start (down to half the budget), then the
    completion loses its end. Keeps at least one completion token."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep_prompt = min(len(prompt), max(max_length - len(completion), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, completion[: max(max_length - len(prompt), 1)]


def join(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    """input_ids and completion_mask (1 on completion tokens) of prompt + completion."""
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def pad_right(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def gather_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position (logits already aligned with `tokens`), in the
    logits' dtype and without keeping the full log-softmax tensor."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, in float32: [B, T-1]. Position t-1 of the result scores token t."""
    return gather_logps(logits[:, :-1].float(), input_ids[:, 1:])


def shift_mask(mask: torch.Tensor) -> torch.Tensor:
    """Align a per-token mask with `token_logps` (drop the first position)."""
    return mask[:, 1:].to(torch.float32)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked-in tokens: of the whole batch (HF's labels loss convention) or along
    `dim`; 0 where there are none, instead of NaN."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


class FeedbackTrainer:
    """Mixin over `transformers.Trainer`: stores loss terms per step and logs their means.

    Subclasses implement `compute_loss` and call `self.store(name=value, ...)`.
    The reference model is the policy with its LoRA adapter switched off unless an explicit
    `ref_model` is given (when training continues from an existing adapter).
    """

    def _init_feedback(self, ref_model=None) -> None:
        self._stored: dict[str, list[float]] = defaultdict(list)
        self.ref_model = ref_model
        # Our losses are means over the batch: let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        #: score with the model's full forward and logits at every position (the path before
        #: `score_completions`; models it cannot take use it anyway; bench/c3po_step.py's baseline)
        self.full_forward = False
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    def store(self, **values: Any) -> None:
        for key, value in values.items():
            self._stored[key].append(float(value.detach().float().mean()) if torch.is_tensor(value) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stored:
            logs.update({k: sum(v) / len(v) for k, v in self._stored.items() if v})
            self._stored.clear()
        super().log(logs, start_time)  # type: ignore[misc]

    @contextlib.contextmanager
    def reference(self, model):
        """Forward passes inside this block are the frozen reference model's."""
        if self.ref_model is not None:
            with torch.no_grad():
                yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise ValueError("a reference model is needed: train a PEFT adapter or pass ref_model")
        with torch.no_grad(), unwrapped.disable_adapter():
            yield unwrapped


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits at the input's positions (a prompt-learning adapter's virtual tokens,
    which PEFT puts before them, left out)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -input_ids.shape[1] :]


def projects_hidden_states(model) -> bool:
    """Whether a completion's scores can come from the body's hidden states and the LM head alone.

    True for a (PEFT-wrapped) transformers causal LM whose logits are the head applied to the last
    hidden states. False for a wrapper whose own forward must run (DDP, FSDP: gradient
    synchronisation hooks on it), for models that transform the logits after the head
    (soft-capping, a logit scale or divisor, a logit multiplier: fastpref.logps.logit_changes), and
    for an adapter on the LM head or a prompt-learning adapter (fastpref.logps.body_then_head):
    those take the full forward."""
    from .fastpref.logps import body_then_head

    if not (hasattr(model, "get_base_model") or hasattr(model, "base_model_prefix")):
        return False
    return body_then_head(model) is None


@dataclass
class CompletionScores:
    """A padded batch's completion tokens, scored.

    logps: [B, T-1] log p(x_t | x_<t) where `shift_mask(completion_mask)` is 1, 0 elsewhere
        (aligned with `token_logps`); also 0 on the `distribution_rows`, scored as below instead.
    For the `distribution_rows` (a KL needs the whole next-token distribution, not one token's
    log-prob), at their completion positions in row-major order: `logits` [M, V] on the full
    forward, or `hidden` [M, H] (the body's last hidden states) and `head` when only completion
    positions are projected.
    """

    logps: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: Any = None


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is its tokens then padding. Then causal attention alone gives every real position
    exactly what the padding mask gives it (a real token never looks right, at the padding), and
    SDPA without a mask runs its causal kernel, which skips the blocks above the diagonal instead
    of scoring the full [length, length] square; the padding positions' own states change, and
    nothing reads them. Only a [B, T] padding mask qualifies: a 4D [B, 1, T, T] mask (CoH's
    forgetful causal mask) hides keys causal attention would show, so it must reach the model."""
    if attention_mask.dim() != 2:
        return False
    keep = attention_mask.bool()
    return bool((keep[:, 1:] <= keep[:, :-1]).all())


def score_completions(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    distribution_rows: slice | None = None,
    full_forward: bool = False,
) -> CompletionScores:
    """Log-probs of the completion tokens; for `distribution_rows`, what a KL over the vocabulary needs.

    Only completion positions reach the head; the others' logits are never computed. Equal to
    `token_logps(forward_logits(...))` at those positions (a test). `full_forward` (or a model
    `projects_hidden_states` rejects) takes the model's own forward and full logits instead."""
    from .fastpref.logps import TILE_ELEMENTS, ChunkedLogps, backbone_and_head

    scored = completion_mask[:, 1:].bool()
    whole = torch.zeros_like(scored)
    if distribution_rows is not None:
        whole[distribution_rows] = scored[distribution_rows]
    tiled = scored & ~whole
    targets = input_ids[:, 1:]
    if full_forward or not projects_hidden_states(model):
        all_logits = forward_logits(model, input_ids, attention_mask)[:, :-1]
        tiled_logps = gather_logps(all_logits[tiled].float(), targets[tiled])
        out = CompletionScores(tiled_logps, logits=all_logits[whole] if distribution_rows is not None else None)
    else:
        body, head = backbone_and_head(model)
        mask = None if right_padded(attention_mask) else attention_mask
        hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
        tiled_logps = ChunkedLogps.apply(
            hidden[tiled], head.weight, head.bias, targets[tiled], TILE_ELEMENTS, False, torch.is_grad_enabled()
        )[0]
        out = CompletionScores(tiled_logps, hidden=hidden[whole] if distribution_rows is not None else None, head=head)
    out.logps = tiled_logps.new_zeros(scored.shape).index_put(tiled.nonzero(as_tuple=True), tiled_logps)
    return out
