"""Decoding on a CPU: a model's linear layers through oneDNN with weights packed once.

Why: a decode step multiplies a few rows (one per sequence in the batch) by every weight matrix.
At those shapes PyTorch's default fp32 CPU matmul (MKL) is far from the machine's peak: on a
2-core AMD EPYC, SmolLM2-135M at 7 rows took 100 ms a step, 81% of it in matmuls running at
10-45 GFLOP/s, the 49k-vocabulary head alone 29 ms. oneDNN's linear with the weight reordered
once into its blocked layout does the same products 2-2.3x faster for the body's matrices and
~5x for the head (bench/generate.py, docs/generation.md); it is what PyTorch's own compiler
uses for CPU inference (`torch._inductor` freezing), here without compiling anything.

bf16 weights (a CPU with bf16 units, where heedful computes in bf16: pipeline/precision.py) take the
same route where oneDNN has bf16 kernels: on a 2-core Xeon with AMX the head's product for 8 rows
went from 2.8 ms (bf16, PyTorch's default) to 1.6 ms, against 8.3 ms in fp32 (docs/speed.md).

The math is the same; float rounding differs (~1e-6 on an fp32 layer's output; bf16 outputs were
bit-equal in our measurements), so a greedy reply can in principle differ at a near-tie, as between
two machines. Only inference uses it: a call with gradients enabled, fewer than `min_rows` rows (in
fp32 a single row is a matrix-vector product, as fast on MKL) or more than `MAX_ROWS` rows (a long
prefill, where MKL is as fast) runs the layer's own forward. Only plain `nn.Linear` layers with
fp32 (or, where supported, bf16) CPU weights are routed: a subclass with its own forward (a
bitsandbytes 4-bit layer, whose fp32 "weight" is packed 4-bit storage; PEFT's VB-LoRA and the
like) keeps it, and so does a LoRA adapter's own low-rank pair (slower packed: `_routable`). The
packed copies live only while a block is open (one `chat_generate` call): packing SmolLM2-135M's
layers takes about 0.3 s, and a copy kept across calls would hold a second set of weights and go
stale when PEFT merges an adapter through `weight.data`, which changes neither the storage nor the
version a cache could key on. The one long-lived block is
`heedful serve`'s HF engine (serving/engine.py), for the life of a model whose weights nothing
changes: whoever opens a block must not merge into or edit the model's weights inside it.

`HEEDFUL_PACKED_LINEAR=0` turns it off (the benchmark's comparison arm).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

#: rows (tokens across the batch) from which and up to which an fp32 call goes through the packed
#: weight: one row is a matrix-vector product, which MKL does as fast (SmolLM2-135M: 18.8 vs 18.3 ms
#: of a step). A bf16 one-row product is slower by PyTorch's default (the head: 4.2 vs 1.8 ms, Xeon
#: with AMX), so bf16 calls take the packed weight from `MIN_ROWS_BF16` rows.
MIN_ROWS, MIN_ROWS_BF16, MAX_ROWS = 2, 1, 256
ENV = "HEEDFUL_PACKED_LINEAR"


def available() -> bool:
    """Whether this PyTorch has oneDNN's packed linear (and it is not turned off)."""
    import torch

    if os.environ.get(ENV, "1").strip() in ("0", "false", "no"):
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


@functools.cache
def routed_dtypes() -> tuple[Any, ...]:
    """The weight dtypes oneDNN packs here: fp32, and bf16 on a CPU with native bf16 products
    (AVX512_BF16 or AMX: oneDNN also "supports" bf16 on plain AVX-512 by emulating it, unmeasured)."""
    import torch

    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    bf16 = mkldnn_bf16 is not None and mkldnn_bf16() and any(check is not None and check() for check in native)
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def min_rows(dtype: Any) -> int:
    """Fewest rows a call of this dtype needs to go through the packed weight."""
    import torch

    return MIN_ROWS_BF16 if dtype == torch.bfloat16 else MIN_ROWS


def model_min_rows(model: Any) -> int | None:
    """Fewest rows at which some of `model`'s routable layers take the packed weight (None: no
    layer is routable), so a caller opens a block only where a call could use it."""
    return min((min_rows(layer.weight.dtype) for layer in _routable(model)), default=None)


def routable_bytes(model: Any) -> int:
    """Bytes of the weights `packed_linears` would pack for `model` (one more copy of them)."""
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in _routable(model))


#: PEFT's containers of a LoRA layer's own down- and up-projections, and the largest rank whose pair
#: keeps PyTorch's forward (measured at rank 16; a larger one keeps the packed route, unmeasured)
LORA_CONTAINERS, LORA_MAX_RANK = ("lora_A", "lora_B"), 64


def _routable(model: Any) -> list[Any]:
    """`model`'s plain `nn.Linear` layers with CPU weights of a dtype oneDNN packs here, except a
    LoRA adapter's own rank-r projections.

    Why not those: a rank-16 product is a sliver of arithmetic whose cost is the call, and the packed
    call costs more than PyTorch's own. Measured (2026-12-06, 2-core AMX Xeon, SmolLM2-135M with the
    quickstart's r16 adapter unmerged, 4 replies of up to 64 greedy tokens, 5 alternating rounds):
    with the adapter's projections packed 8.4-9.5 s (bf16) and 8.3-9.1 s (fp32) per call, with only
    the base layers packed 6.6-7.7 s and 6.9-7.7 s, the same replies."""
    import torch

    if not available():
        return []
    adapters = {
        id(layer)
        for m in model.modules()
        for name in LORA_CONTAINERS
        if isinstance(getattr(m, name, None), torch.nn.ModuleDict)
        for layer in getattr(m, name).values()
        if isinstance(layer, torch.nn.Linear) and min(layer.in_features, layer.out_features) <= LORA_MAX_RANK
    }
    return [
        m
        for m in model.modules()
        if type(m).forward is torch.nn.Linear.forward
        and type(m.weight) is torch.nn.Parameter
        and m.weight.device.type == "cpu"
        and m.weight.dtype in routed_dtypes()
        and id(m) not in adapters
    ]


@contextlib.contextmanager
def packed_linears(model: Any) -> Iterator[int]:
    """Within the block, `model`'s plain fp32 (or bf16) CPU `nn.Linear` layers (not a LoRA adapter's own
    low-rank pair: `_routable`) take small no-grad calls through packed weights; yields how many layers
    are routed. Blocks may nest or run on several threads at once; the last to leave restores the
    layers and drops their packed copies, so nothing stays on the model. (A deep copy made inside a
    block keeps a routed forward bound to the copy: it computes with the copy's own weights, packed
    on first use.)"""
    layers = _routable(model)
    with _LOCK:
        for layer in layers:
            count = _ROUTED.get(layer, 0)
            if count == 0:
                layer.forward = functools.partial(_forward, layer)
            _ROUTED[layer] = count + 1
    try:
        yield len(layers)
    finally:
        with _LOCK:
            for layer in layers:
                _ROUTED[layer] -= 1
                if _ROUTED[layer] == 0:
                    del _ROUTED[layer]
                    layer.__dict__.pop("forward", None)
                    _PACKED.pop(layer, None)


_LOCK = threading.Lock()
_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> blocks using it
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # open layer -> ((storage, version), packed)


def _forward(layer: Any, x: Any) -> Any:
    """The layer's forward: small no-grad calls in the weight's dtype through the packed weight,
    else its own."""
    import torch

    rows = x.numel() // max(x.shape[-1], 1)
    weight = layer.weight
    if torch.is_grad_enabled() or x.dtype != weight.dtype or not min_rows(x.dtype) <= rows <= MAX_ROWS:
        return type(layer).forward(layer, x)
    key = (weight.data_ptr(), weight._version)
    known = _PACKED.get(layer)
    if known is None or known[0] != key:
        known = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _PACKED[layer] = known
    bias = None if layer.bias is None else layer.bias.detach()
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), known[1], bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])
