"""Prompts that start alike, their common start computed once: next-token logits, and the inputs
HF `generate` continues from a prefix cache (`pipeline.generation.chat_generate`).

Why: the simulated user's judge asks "Satisfied? Yes/No" with the same system turn and few-shot
examples before every reply (feedback/simulator/prompts.py): about 220 of each prompt's 260
tokens are that shared start. Run once and its keys/values reused (a KV-cache prefix, as the
CTranslate2 engine does for generation), a batch only computes each prompt's own tail; and
only the last position goes through the 49k-vocabulary head (`logits_to_keep=1`), not every
position as a plain forward does. The numbers are the plain forward's up to float rounding
(tests/test_prefix_logits.py). Sampling reuses the same cache: a simulated user's feedback and
answers are generated behind that same kind of shared start (`prefixed_batch`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Sequence
from typing import Any

#: a shared start shorter than this is not worth a separate forward
MIN_SHARED_TOKENS = 16


def shared_prefix_length(token_lists: Sequence[Sequence[Any]]) -> int:
    """Length of the token prefix all lists share, leaving each at least one token of its own."""
    if not token_lists:
        return 0
    first, limit = token_lists[0], min(len(tokens) for tokens in token_lists) - 1
    n = 0
    while n < limit and all(tokens[n] == first[n] for tokens in token_lists):
        n += 1
    return n


class PrefixMemo:
    """The last shared start run, and its cache, kept for the next calls that start with it.

    Why: a judge asks every round with the same ~220-token instructions, a few replies at a time;
    computed per call, that start was most of each call (1.0 of 1.7 s for 4 replies, SmolLM2 on
    one thread). Only for weights that do not change between calls: a cache of other weights
    would give other numbers (`HFClient` keeps one for a model it loaded itself). One start at a
    time: for a 7B model's ~220 tokens, about 0.1-0.2 GB of keys and values."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.cache: Any = None
        #: held through a call that uses the memo: two threads on one client never pair one call's
        #: start with the other's cache
        self.lock = threading.Lock()

    def covers(self, token_lists: Sequence[Sequence[int]]) -> bool:
        """Whether every list starts with the memo's start and has a token of its own after it."""
        n = len(self.tokens)
        return self.cache is not None and all(len(t) > n and list(t[:n]) == self.tokens for t in token_lists)

    def keep(self, tokens: list[int], cache: Any) -> None:
        self.tokens, self.cache = list(tokens), cache


def last_token_logits(
    model: Any, token_lists: list[list[int]], batch_size: int, pad_id: int, memo: PrefixMemo | None = None
) -> Any:
    """[len(token_lists), vocab] float32 logits of the token after each list, `batch_size` lists per
    forward. Rows are left-padded after the shared prefix; explicit position ids give every real
    token the position it has in its own unpadded sequence. With a `memo`, a start an earlier call
    ran is reused when every list begins with it; otherwise the start these lists share with it
    (or, with none kept, with each other) is run and kept for later calls."""
    with memo.lock if memo is not None else contextlib.nullcontext():
        return _last_token_logits(model, token_lists, batch_size, pad_id, memo)


def _last_token_logits(model: Any, token_lists: list[list[int]], batch_size: int, pad_id: int, memo: PrefixMemo | None) -> Any:
    import torch

    device = next(model.parameters()).device
    if not token_lists:
        return torch.zeros((0, model.get_output_embeddings().weight.shape[0]), device=device)
    prefix_cache = None
    if memo is not None and memo.covers(token_lists):
        shared, prefix_cache = len(memo.tokens), memo.cache
    else:
        # the start shared with the kept one too: what stays the same from call to call (the
        # instructions), not what this call's prompts happen to share after them; else their own
        shared = shared_prefix_length([*token_lists, memo.tokens]) if memo is not None and memo.tokens else 0
        if shared < MIN_SHARED_TOKENS:
            shared = shared_prefix_length(token_lists) if len(token_lists) > 1 else 0
        if shared < MIN_SHARED_TOKENS:
            shared = 0
    if not shares_prefixes(model):
        shared, prefix_cache = 0, None
    with torch.no_grad():
        if shared and prefix_cache is None:
            prefix_cache = run_prefix(model, token_lists[0][:shared])
            if memo is not None:
                memo.keep(token_lists[0][:shared], prefix_cache)
        out = []
        for start in range(0, len(token_lists), batch_size):
            tails = [tokens[shared:] for tokens in token_lists[start : start + batch_size]]
            rows = len(tails)
            ids, mask = padded_tails(tails, shared, pad_id)
            # each real token's position in its own prompt (padding: any, it is masked)
            tail_mask = mask[:, shared:]
            positions = torch.where(tail_mask == 1, mask.cumsum(-1)[:, shared:] - 1, shared)
            kwargs: dict[str, Any] = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
            if prefix_cache is not None:
                kwargs.update({cache_keyword(model): repeated(prefix_cache, rows), "use_cache": True})
            logits = model(input_ids=ids.to(device), logits_to_keep=1, **kwargs).logits[:, -1].float()
            out.append(logits)
    return torch.cat(out)


def padded_tails(tails: list[list[int]], shared: int, pad_id: int) -> tuple[Any, Any]:
    """The layout both paths share: each row's own tokens left-padded to the longest ([rows,
    width] ids) and the attention mask over [shared start | padding | own tokens] ([rows,
    shared + width])."""
    import torch

    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tails), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, tail in enumerate(tails):
        ids[i, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
        mask[i, shared + width - len(tail) :] = 1
    return ids, mask


def run_prefix(model: Any, prefix: list[int]) -> Any:
    """The key/value cache of one forward over `prefix` (batch of one); only its last position goes
    through the head."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def repeated(cache: Any, rows: int) -> Any:
    """A copy of a batch-of-one cache for `rows` rows (the original stays as it was: generation
    appends to the cache it is given)."""
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    return past


def shares_prefixes(model: Any) -> bool:
    """Whether a prefix cache can be repeated across rows and padding may sit between the shared
    start and a row's own tokens: not with a sliding attention window (the padding would take
    window slots the row's own tokens should have), nor when the model's generation config names
    a cache implementation of its own (`generate` refuses a cache passed beside one)."""
    config = getattr(model, "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return getattr(getattr(model, "generation_config", None), "cache_implementation", None) is None


def prefixed_batch(model: Any, token_lists: list[list[int]], pad_id: int, repeat: int = 1) -> dict[str, Any] | None:
    """`generate` inputs for prompts that share a start of at least MIN_SHARED_TOKENS tokens, each
    repeated `repeat` times (samples per prompt), else None: input_ids and attention_mask of the
    full rows, laid out [shared start | left padding | the row's own tokens], and the shared start's
    cache repeated for every row. `generate` derives each real token's position from the mask, so
    every token has the position it has in its own unpadded prompt, and it feeds only the rows' own
    tokens to the model; the shared start is computed once."""
    import torch

    from .kv_cache import takes_a_cache

    # `generate` continues from the cache it is given: not where it would run without one
    if (len(token_lists) < 2 and repeat < 2) or not shares_prefixes(model) or not takes_a_cache(model):
        return None
    shared = shared_prefix_length(token_lists)
    if shared < MIN_SHARED_TOKENS:
        return None
    tails = [tokens[shared:] for tokens in token_lists]
    tail_ids, mask = padded_tails(tails, shared, pad_id)
    ids = torch.cat([torch.tensor([token_lists[0][:shared]]).expand(len(tails), shared), tail_ids], dim=1)
    cache = run_prefix(model, token_lists[0][:shared])
    if not hasattr(cache, "batch_repeat_interleave"):
        return None  # a cache that cannot be repeated across rows: generate the whole prompts
    device = next(model.parameters()).device
    return {
        "input_ids": ids.repeat_interleave(repeat, dim=0).to(device),
        "attention_mask": mask.repeat_interleave(repeat, dim=0).to(device),
        cache_keyword(model): repeated(cache, len(tails) * repeat),
    }


def cache_keyword(model: Any) -> str:
    """`cache` (transformers 5.2x) or `past_key_values` (earlier 5.x), as the model's forward names it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
