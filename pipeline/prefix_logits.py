"""Next-token logits after many prompts that start alike, their common start computed once.

Why: the simulated user's judge asks "Satisfied? Yes/No" with the same system turn and few-shot
examples before every reply (feedback/simulator/prompts.py): about 220 of each prompt's 260
tokens are that shared start. Run once and its keys/values reused (a KV-cache prefix, as the
CTranslate2 engine does for generation), a batch only computes each prompt's own tail; and
only the last position goes through the 49k-vocabulary head (`logits_to_keep=1`), not every
position as a plain forward does. The numbers are the plain forward's up to float rounding
(tests/test_prefix_logits.py).
"""

from __future__ import annotations

import copy
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


def last_token_logits(model: Any, token_lists: list[list[int]], batch_size: int, pad_id: int) -> Any:
    """[len(token_lists), vocab] float32 logits of the token after each list, `batch_size` lists per
    forward. Rows are left-padded after the shared prefix; explicit position ids give every real
    token the position it has in its own unpadded sequence."""
    import torch

    device = next(model.parameters()).device
    if not token_lists:
        return torch.zeros((0, model.get_output_embeddings().weight.shape[0]), device=device)
    shared = shared_prefix_length(token_lists) if len(token_lists) > 1 else 0
    if shared < MIN_SHARED_TOKENS:
        shared = 0
    prefix_cache = None
    with torch.no_grad():
        if shared:
            prefix = torch.tensor([token_lists[0][:shared]], device=device)
            prefix_out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
            prefix_cache = getattr(prefix_out, "cache", None)
            if prefix_cache is None:
                prefix_cache = prefix_out.past_key_values
        out = []
        for start in range(0, len(token_lists), batch_size):
            tails = [tokens[shared:] for tokens in token_lists[start : start + batch_size]]
            rows, width = len(tails), max(len(t) for t in tails)
            ids = torch.full((rows, width), pad_id, dtype=torch.long)
            mask = torch.zeros((rows, shared + width), dtype=torch.long)
            positions = torch.full((rows, width), shared, dtype=torch.long)
            mask[:, :shared] = 1
            for i, tail in enumerate(tails):
                pad = width - len(tail)
                ids[i, pad:] = torch.tensor(tail)
                mask[i, shared + pad :] = 1
                positions[i, pad:] = torch.arange(shared, shared + len(tail))
            kwargs: dict[str, Any] = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
            if prefix_cache is not None:
                past = copy.deepcopy(prefix_cache)
                past.batch_repeat_interleave(rows)
                kwargs.update({_cache_keyword(model): past, "use_cache": True})
            logits = model(input_ids=ids.to(device), logits_to_keep=1, **kwargs).logits[:, -1].float()
            out.append(logits)
    return torch.cat(out)


def _cache_keyword(model: Any) -> str:
    """`cache` (transformers 5.2x) or `past_key_values` (earlier 5.x), as the model's forward names it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
