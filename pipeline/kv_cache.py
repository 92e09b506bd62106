"""A key/value cache that HF `generate` writes into in place, instead of growing it by concatenation.

Why: transformers' `DynamicLayer` appends each decode step's keys and values with `torch.cat`,
which copies every layer's whole cache every step. For a simulated user's ~350-token prompts at
batch 12 (SmolLM2-135M, bf16, 2-core Xeon) that was 2 x 30 copies of ~1.75 MB a step, 18% of the
decode profile. `GrowingLayer` keeps one buffer per layer with room for the tokens still to come
(`reserve`: the call's `max_new_tokens`), copies only the new step into it and hands attention a
view of the filled part. The keys and values are the same numbers in the same layout; only where
they live changes, so the logits are bit-equal to the concatenating cache's
(tests/test_kv_cache.py).

Anything that replaces a layer's `keys` from outside (`batch_repeat_interleave` for a prefix
cache repeated across rows, `crop`, `batch_select_indices`, beam reordering, a deep copy) leaves a
tensor that is not a view of the buffer: the next `update` adopts it into a new buffer, so every
`DynamicLayer` operation keeps working. Sliding-window layers and caches of other kinds are left as
they are.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with room for `reserve` more
    tokens; a buffer that fills up is replaced by one twice as long (a copy every doubling, not
    every step)."""

    def __init__(self, reserve: int = 64) -> None:
        super().__init__()
        self.reserve = max(1, reserve)
        self._key_buffer: Any = None
        self._value_buffer: Any = None
        self._filled = 0

    def _holds_own_view(self) -> bool:
        """Whether `keys` is still the view this layer made of its buffer (nothing replaced it)."""
        keys, buffer = self.keys, self._key_buffer
        return (
            buffer is not None
            and keys is not None
            and keys.dim() == 4
            and keys.data_ptr() == buffer.data_ptr()
            and keys.shape[-2] == self._filled
            and keys.shape[:2] == buffer.shape[:2]
        )

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        own = self._holds_own_view()
        if not own or self._filled + new > self._key_buffer.shape[-2]:
            held = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
            room = held + new + (max(self.reserve, held + new) if own else self.reserve)
            keys = key_states.new_empty((*key_states.shape[:2], room, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:2], room, value_states.shape[-1]))
            if held:
                keys[:, :, :held].copy_(self.keys)
                values[:, :, :held].copy_(self.values)
            self._key_buffer, self._value_buffer, self._filled = keys, values, held
        end = self._filled + new
        self._key_buffer[:, :, self._filled : end].copy_(key_states)
        self._value_buffer[:, :, self._filled : end].copy_(value_states)
        self._filled = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._filled = 0
        super().reset()


def in_place(model: Any) -> bool:
    """Whether `generate` on `model` gets the in-place cache: on a CPU, unless
    `HEEDFUL_GROWING_KV=0` keeps transformers' concatenating one (the benchmark's comparison arm).
    On a GPU the concatenation is a device copy that costs little, and that path is not measured here."""
    if os.environ.get("HEEDFUL_GROWING_KV", "1") == "0" or not takes_a_cache(model):
        return False
    try:
        return next(model.parameters()).device.type == "cpu"
    except (AttributeError, StopIteration, TypeError):
        return False


def takes_a_cache(model: Any) -> bool:
    """Whether `generate` on `model` would build a `DynamicCache` itself, so one passed in is used as
    it would use its own. Not where the generation config says `use_cache: false` (a cache passed
    anyway is fed the whole sequence every step, appended again each time: wrong logits), nor for a
    model transformers gives no default dynamic cache."""
    if getattr(getattr(model, "generation_config", None), "use_cache", True) is False:
        return False
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return not callable(supports) or bool(supports())


def make_growing(cache: Any, reserve: int) -> Any:
    """`cache` (a transformers `DynamicCache`) with each plain `DynamicLayer` swapped for a
    `GrowingLayer` holding what the layer held; returned for chaining. Other layers (sliding
    windows, quantized) and other cache classes are left as they are."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            growing = GrowingLayer(reserve)
            for name in ("keys", "values", "is_initialized", "device"):
                if name in layer.__dict__:
                    setattr(growing, name, layer.__dict__[name])
            layers[i] = growing
    return cache


def cache_kwargs(model: Any, reserve: int) -> dict[str, Any]:
    """`generate` keywords that hand it a fresh growing cache for `reserve` new tokens (under the
    name the model's forward takes), or none (`generation_cache` says when)."""
    from .prefix_logits import cache_keyword

    cache = generation_cache(model, reserve)
    return {} if cache is None else {cache_keyword(model): cache}


def generation_cache(model: Any, reserve: int) -> Any | None:
    """A fresh growing cache for one `generate` call on `model`, or None where `generate` should
    build its own: not `in_place(model)`, or a generation config that names a cache
    implementation of its own (`generate` refuses a cache passed beside one)."""
    if not in_place(model):
        return None
    if getattr(getattr(model, "generation_config", None), "cache_implementation", None) is not None:
        return None
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    except (TypeError, ValueError, AttributeError):  # a config DynamicCache cannot read: let generate decide
        return None
    return make_growing(cache, reserve)
