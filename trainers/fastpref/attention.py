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

On a CUDA GPU (fp16/bf16) the same two pieces run as two variable-length attention calls per
layer for the whole batch, not two SDPA calls per unit: `pair_kernel` picks PyTorch's own
`torch.nn.attention.varlen.varlen_attn` or, where that is missing, flash-attn's
`flash_attn_varlen_func`. Piece one is each unit's prompt + chosen reply, causal; piece two has
each unit's rejected reply as queries and its prompt + rejected reply as keys, causal with the
mask aligned to the bottom-right corner (flash-attention's rule when queries are fewer than
keys: query j sees keys up to j + prompt), which is exactly "all of the prompt, then causal".
Not run here (no GPU): its index plumbing is tested on CPU through a stand-in kernel with the
same contract (tests/test_preference_core.py), and `bench/gpu_check.py` compares it with the
SDPA pieces on a GPU.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from .logps import _compute_dtype

#: per row, (start, prompt, chosen, rejected) token counts of each unit placed in it
Segments = Sequence[Sequence[tuple[int, int, int, int]]]

#: a variable-length attention kernel: (q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], cu_q, cu_k
#: (int32 [N + 1] offsets), max_q, max_k, scale) -> [Tq, H, D], causal aligned bottom-right
VarlenKernel = Callable[..., torch.Tensor]

#: `attention` choices of the packed core: auto (varlen kernels on a CUDA GPU in fp16/bf16, else the
#: SDPA pieces), sdpa (the SDPA pieces everywhere), varlen (insist: an error where it cannot run)
ATTENTION_CHOICES = ("auto", "sdpa", "varlen")


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """PyTorch's `varlen_attn` through the keywords this torch's version has: causal as
    `window_size=(-1, 0)` (later releases) or `is_causal=True` (its first); grouped key/value heads
    through `enable_gqa` where it exists, else repeated to the query heads; a scale it cannot take
    folded into q (its default is 1/sqrt(head size))."""
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options(varlen_attn)
    kwargs: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in options else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in options:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in options:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _varlen_options(function: Callable) -> frozenset[str]:
    """The keywords `function` takes, read once per function (it is called twice per layer and step)."""
    return frozenset(inspect.signature(function).parameters)


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)


def varlen_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None where a varlen kernel can run the packed pieces here; otherwise why not."""
    if device.type != "cuda":
        return f"the varlen attention kernels run on a CUDA GPU; this model is on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the varlen attention kernels compute in fp16/bf16, not {dtype} (train in bf16)"
    if head_dim % 8 or head_dim > 256:
        return f"the varlen attention kernels take head sizes up to 256 in multiples of 8, not {head_dim}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the varlen attention kernels need an Ampere or newer GPU (compute capability 8.0)"
    if _varlen_kernel() is None:
        return "neither PyTorch's torch.nn.attention.varlen with a causal option nor flash-attn >= 2.1 is installed"
    return None


@functools.cache
def _varlen_kernel() -> VarlenKernel | None:
    """PyTorch's own varlen attention where this torch has it, else flash-attn's (>= 2.1: older
    releases aligned the causal mask top-left, which would hide the prompt from the rejected reply)."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        if {"window_size", "is_causal"} & _varlen_options(varlen_attn):
            return _torch_varlen
    except ImportError:
        pass
    try:
        import flash_attn
    except ImportError:
        return None
    major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    return _flash_attn_varlen if (major, minor) >= (2, 1) else None


def pair_kernel(attention: str | VarlenKernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> VarlenKernel | None:
    """The varlen kernel for the packed pieces, or None for the SDPA pieces. `attention` is one of
    ATTENTION_CHOICES or a kernel with VarlenKernel's contract (tests pass a CPU stand-in)."""
    if callable(attention):
        return attention
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if attention == "sdpa":
        return None
    why = varlen_unavailable(device, dtype, head_dim)
    if why is not None:
        if attention == "varlen":
            raise ValueError(f"attention: varlen: {why}; use attention: auto or sdpa")
        return None
    return _varlen_kernel()


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=None) -> torch.Tensor:
    """The varlen kernels' contract in plain torch, one SDPA call per sequence: the CPU stand-in
    that tests and `bench/gpu_check.py --dry-run` pass as the kernel (flash-attn's and PyTorch's
    varlen kernels run only on a CUDA GPU), checking what those kernels require of the caller.
    Sequence i's queries q[cu_q[i]:cu_q[i+1]] attend to its keys k[cu_k[i]:cu_k[i+1]], causal with
    the mask aligned to the bottom-right corner (query j sees keys up to j + len_k - len_q); each
    key/value head is shared by a group of query heads."""
    for cu, tokens, longest in ((cu_q, len(q), max_q), (cu_k, len(k), max_k)):
        if not (cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == tokens and bool((cu.diff() > 0).all())):
            raise ValueError(f"offsets {cu.tolist()} ({cu.dtype}) do not partition {tokens} tokens into non-empty sequences")
        if longest != int(cu.diff().max()):
            raise ValueError(f"max length {longest} is not the longest sequence, {int(cu.diff().max())}")
    if len(cu_q) != len(cu_k) or q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {len(cu_q)} / {len(cu_k)} offsets")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v in one dtype, not {q.dtype}, {k.dtype}, {v.dtype}")
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki, vi = (t[cu_k[i] : cu_k[i + 1]].repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k, v))
        n_q, n_k = qi.shape[1], ki.shape[1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(out)


@functools.lru_cache(maxsize=8)
def _varlen_index(segments: tuple[tuple[tuple[int, int, int, int], ...], ...], width: int, device: torch.device):
    """Flat token indices ([rows x width] flattened) and int32 offsets of the two pieces' sequences:
    prompt + chosen per unit; rejected queries per unit and their keys, prompt then rejected."""
    own: list[int] = []
    rejected_q: list[int] = []
    rejected_k: list[int] = []
    own_len, q_len, k_len = [0], [0], [0]
    for r, units in enumerate(segments):
        for start, prompt, chosen, rejected in units:
            first = r * width + start
            if prompt + chosen:
                own += range(first, first + prompt + chosen)
                own_len.append(prompt + chosen)
            if rejected:
                tail = first + prompt + chosen
                rejected_q += range(tail, tail + rejected)
                rejected_k += [*range(first, first + prompt), *range(tail, tail + rejected)]
                q_len.append(rejected)
                k_len.append(prompt + rejected)

    def index(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    def offsets(lengths):
        return torch.tensor(lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)

    # cached for later steps: never inference tensors, which a training step could not save for backward
    with torch.inference_mode(False):
        return (
            (index(own), offsets(own_len), max(own_len)),
            (index(rejected_q), index(rejected_k), offsets(q_len), offsets(k_len), max(q_len), max(k_len)),
        )


def _varlen_pieces(query, key, value, segments: Segments, scaling, kernel: VarlenKernel) -> torch.Tensor:
    """The two pieces of every unit of the batch in two kernel calls; [B, H, L, D] in, [B, L, H, D] out.

    In one dtype: under autocast the autocast dtype, as SDPA computes there. The kernels take one
    dtype for q, k and v and no autocast rule casts them, while under autocast with fp32 weights
    (QLoRA's upcast layers, an fp32 model in a bf16 run) the rotary step leaves q and k in fp32
    and v in bf16."""
    rows, heads, width, _ = query.shape
    dtype = _compute_dtype(query)
    q, k, v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], t.shape[-1]).to(dtype) for t in (query, key, value))
    frozen = tuple(tuple(tuple(unit) for unit in units) for units in segments)
    (own, cu_own, max_own), (rej_q, rej_k, cu_q, cu_k, max_q, max_k) = _varlen_index(frozen, width, query.device)
    out = q.new_zeros(rows * width, heads, v.shape[-1])  # padding positions: zeros (nothing reads them)
    if len(own):
        pieces = kernel(q[own], k[own], v[own], cu_own, cu_own, max_own, max_own, scaling)
        out = out.index_copy(0, own, pieces)
    if len(rej_q):
        pieces = kernel(q[rej_q], k[rej_k], v[rej_k], cu_q, cu_k, max_q, max_k, scaling)
        out = out.index_copy(0, rej_q, pieces)
    return out.view(rows, width, heads, -1)


#: keys up to which a piece in bf16/fp16 on a CPU is computed as plain products in fp32
#: (`_small_piece`), not by SDPA's flash kernel
SMALL_PIECE_KEYS = 192


def _piece(query, key, value, mask, scaling, causal):
    dtype = _compute_dtype(query)
    if key.shape[-2] <= SMALL_PIECE_KEYS and query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return _small_piece(query, key, value, mask, scaling, causal, dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, is_causal=causal)


def _small_piece(query, key, value, mask, scaling, causal, dtype):
    """SDPA's result for a short piece, as scores, softmax and product in fp32 from inputs rounded to
    `dtype` (as SDPA would round them), returned in `dtype`.

    Why: PyTorch's CPU flash-attention backward in bf16 costs about ten times its forward at these
    sizes, and plain products are about 2x faster for the whole forward and backward up to ~160 keys
    (a 2-core Xeon with AMX, one piece of 9 heads x 64: 100 keys 1.07 against 2.19 ms, 160 keys 1.89
    against 2.76; level near 200, slower beyond), which is what the quickstart's short pairs are made
    of. Scores and softmax stay in fp32 as in the flash kernel, so the error against float64 is no
    larger (tests/test_preference_core.py). In fp32 SDPA is as fast or faster, so it is kept there.
    A forward without gradient (the reference's) takes the same route, whatever it costs there: the
    policy and its reference must compute alike, so that an untrained adapter's log-ratio is 0."""
    with torch.autocast(query.device.type, enabled=False):
        # contiguous: the same values in the same layout give the same products, however the batch was packed
        q, k, v = (t.to(dtype).float().contiguous() for t in (query, key, value))
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scale
        if causal:  # SDPA's is_causal: the lower triangle from the top-left corner
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v).to(dtype)


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
    pair_kernel: VarlenKernel | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, L, D], key/value [B, Hkv, L, D] -> [B, L, H, D].
    `pair_kernel` (from `pair_kernel()`): the pieces as varlen calls; None: as SDPA calls per unit."""
    if pair_segments is None or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if pair_kernel is not None:
        return _varlen_pieces(query, key, value, pair_segments, scaling, pair_kernel), None
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
