"""A llama.cpp arm for bench/generate.py: batched greedy decoding on the embedded GGUF.

Measured to decide whether llama.cpp (through llama-cpp-python's low-level bindings) should
become a heedful engine; it is not one yet (docs/generation.md says why and what is missing).
It gets exactly HF's prompt token ids (no second tokenizer), decodes greedily, stops a request
at an end-of-turn id or its budget, and refills a freed slot with the next waiting request in
the same `llama_decode` call (continuous batching), so a finished reply costs nothing further.

The weights: heedful's SmolLM2 is dequantized from the package's Q4_1 GGUF, so the F32 GGUF
written here from that file by llama.cpp's own quantize tool (`ALL_F32`) holds the same
values HF's fp32 model holds; `Q8_0` is a requantized copy (8-bit weights). llama.cpp
computes in its own kernels, so greedy replies can differ from HF's: the bench reports the
agreement. llama-cpp-python has no binary wheel on PyPI; `pip install llama-cpp-python`
builds it from source (about 7 minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

FTYPES = {"f32": 0, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_Q8_0


def unavailable_reason() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python: a source build)"
    return None


def gguf_copy(source: Path, kind: str, cache: Path) -> Path:
    """`source` rewritten by llama.cpp's quantize tool as `kind` (f32 or q8_0), once per cache."""
    import llama_cpp as llama

    target = cache / f"{source.stem}.{kind}.gguf"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    params = llama.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, 2
    partial = target.with_suffix(".partial")
    if llama.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not rewrite {source} as {kind}")
    partial.rename(target)
    return target


class LlamaCppGreedy:
    """Greedy batched decoding with llama.cpp; `generate_ids` matches the bench's engine arm."""

    def __init__(self, gguf: Path, tokenizer, eos_ids: list[int], threads: int, slots: int = 64, context: int = 320):
        import llama_cpp as llama

        self.llama, self.tokenizer, self.eos = llama, tokenizer, set(eos_ids)
        llama.llama_backend_init()
        self.model = llama.llama_model_load_from_file(str(gguf).encode(), llama.llama_model_default_params())
        self.n_vocab = llama.llama_n_vocab(llama.llama_model_get_vocab(self.model))
        params = llama.llama_context_default_params()
        # one KV stream per slot (kv_unified off), each `context` positions long
        params.n_seq_max, params.n_ctx, params.kv_unified = slots, slots * context, False
        params.n_batch, params.n_ubatch = 4096, 512
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama.llama_init_from_model(self.model, params)
        self.memory = llama.llama_get_memory(self.ctx)
        self.slots, self.context = slots, context
        self.batch = llama.llama_batch_init(4096, 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (token, pos, seq, wants_logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, wants_logits
        if self.llama.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")

    def _argmax(self, index: int) -> int:
        pointer = self.llama.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate_ids(self, texts, sampling, max_batch_size=None, max_new_tokens=None) -> list[list[list[int]]]:
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(texts)
        width = min(max_batch_size or len(texts), self.slots)
        prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        waiting = list(range(len(texts)))
        replies: list[list[int]] = [[] for _ in texts]
        free = list(range(width))
        active: dict[int, tuple[int, int]] = {}  # slot -> (request, next position)
        pending: dict[int, int] = {}  # slot -> token to feed next
        self.llama.llama_memory_clear(self.memory, True)
        while waiting or active:
            items, owners = [], []
            for slot, (_request, pos) in active.items():  # one new token per running request
                items.append((pending[slot], pos, slot, True))
                owners.append(slot)
            while waiting and free and len(items) + len(prompts[waiting[0]]) <= 4096:
                request, slot = waiting.pop(0), free.pop(0)
                ids = prompts[request]
                if len(ids) + budgets[request] > self.context:
                    raise ValueError(f"request {request} needs {len(ids) + budgets[request]} positions > {self.context}")
                items += [(tok, j, slot, j == len(ids) - 1) for j, tok in enumerate(ids)]
                owners += [None] * (len(ids) - 1) + [slot]
                active[slot] = (request, len(ids) - 1)
            self._decode(items)
            for index, slot in enumerate(owners):
                if slot is None:
                    continue
                request, pos = active[slot]
                token = self._argmax(index)
                if token not in self.eos:  # replies are cut before the stop token, as HF's reference is
                    replies[request].append(token)
                if token in self.eos or len(replies[request]) >= budgets[request]:
                    del active[slot]
                    self.llama.llama_memory_seq_rm(self.memory, slot, -1, -1)
                    free.append(slot)
                else:
                    active[slot], pending[slot] = (request, pos + 1), token
        return [[r] for r in replies]

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)
