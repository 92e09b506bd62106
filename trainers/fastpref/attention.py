"""Attention of a packed [prompt | chosen | rejected] unit as two causal pieces, not one masked square.

Why: with the 4D mask of packing.py, SDPA computes every (query, key) score of the row,
L x L, and then masks most of them: for a 40-token prompt and two 215-token replies about 29%
of the 473 x 473 scores are used. The attention is exactly two pieces per unit:

- prompt + chosen attend causally to themselves: SDPA with `is_causal`, whose kernel skips
  the blocks above the diagonal;
- the rejected tokens attend to the prompt and causally to each other: queries = rejected,
  keys = prompt + rejected, a [k, p + k] mask (the prompt column block all True, a lower
  triangle after it).

Same scores, same softmax, same output as the masked square (to float rounding); padding
positions get zeros (nothing reads them). The layout travels as the `pair_segments` keyword
that transformers passes from the model's forward to its attention function; `install` puts this
function in SDPA's place, where a call without the keyword is transformers' SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

#: per row, (start, prompt, chosen, rejected) token counts of each unit placed in it
Segments = Sequence[Sequence[tuple[int, int, int, int]]]


def _piece(query, key, value, mask, scaling, causal):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, is_causal=causal)


def _rejected_mask(prompt: int, rejected: int, device) -> torch.Tensor:
    """[rejected, prompt + rejected]: all of the prompt, then causal over the rejected reply."""
    sees_prompt = torch.ones(rejected, prompt, dtype=torch.bool, device=device)
    causal = torch.ones(rejected, rejected, dtype=torch.bool, device=device).tril()
    return torch.cat([sees_prompt, causal], dim=1)


def pair_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, L, D], key/value [B, Hkv, L, D] -> [B, L, H, D]."""
    if pair_segments is None or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    width = query.shape[2]
    rows = []
    # rows by `unbind` and each row's positions by one `split` (views whose backward is one stack /
    # one cat), not by slicing: every slice's backward allocated a zero tensor of the whole batch and
    # added it into the gradient (14 per layer: ~3% of a SmolLM2 DPO step on a 2-core CPU)
    for (q, k, v), units in zip(zip(query.unbind(0), key.unbind(0), value.unbind(0), strict=True), pair_segments, strict=True):
        sizes, end = [], 0
        for start, prompt, chosen, rejected in units:  # one partition of the row: per unit a gap before it and its 3 parts
            sizes += [start - end, prompt, chosen, rejected]
            end = start + prompt + chosen + rejected
        sizes.append(width - end)
        qs, ks, vs = (t.split(sizes, dim=1) for t in (q, k, v))
        pieces = []
        for u, (_, prompt, chosen, rejected) in enumerate(units):
            gap, own = 4 * u, slice(4 * u + 1, 4 * u + 3)  # the prompt and the chosen reply
            if sizes[gap]:
                pieces.append(q.new_zeros(q.shape[0], sizes[gap], v.shape[-1]))
            if prompt + chosen:
                cq, ck, cv = (torch.cat(t[own], dim=1).unsqueeze(0) for t in (qs, ks, vs))
                pieces.append(_piece(cq, ck, cv, None, scaling, True)[0])
            if rejected:
                r, p = 4 * u + 3, 4 * u + 1
                keys = torch.cat([ks[p], ks[r]], dim=1).unsqueeze(0)
                values = torch.cat([vs[p], vs[r]], dim=1).unsqueeze(0)
                mask = _rejected_mask(prompt, rejected, q.device)
                pieces.append(_piece(qs[r].unsqueeze(0), keys, values, mask, scaling, False)[0])
        if sizes[-1]:
            pieces.append(q.new_zeros(q.shape[0], sizes[-1], v.shape[-1]))
        rows.append(torch.cat(pieces, dim=1))
    out = torch.stack(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def install() -> None:
    """Route SDPA attention through `pair_attention_forward`: calls without `pair_segments` (every
    model that is not running a packed DPO batch) go to transformers' SDPA unchanged. Why the SDPA
    entry and not a new implementation name switched on for a block: gradient checkpointing
    recomputes a layer during backward, after such a block has ended; the keyword travels with
    the layer's saved inputs, so the recomputation takes the same path."""
    if AttentionInterface._global_mapping.get("sdpa") is not pair_attention_forward:
        AttentionInterface.register("sdpa", pair_attention_forward)
