"""The served model: base + optional PEFT adapter, chat-templated generation, micro-batched.

Concurrent requests are batched: a request that can share a forward pass (no `seed`, no
`stop` strings, the same sampling settings) waits up to `batch_window` seconds for others
and they are generated together, left-padded, in one `generate` call (`MicroBatcher`).
With 100 concurrent clients that is a handful of batched calls instead of 100 serialized
ones. Requests with a seed (reproducible sampling) or stop strings, and streams, run alone.
The model itself is used by one call at a time (a lock): on CPU one call already uses every
core, and it keeps `generate` state (seeds, streamer threads) from interleaving.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class PromptTooLong(ValueError):
    pass


@dataclass
class _Job:
    text: str  # the prompt with the chat template applied (rendered once, when the request came in)
    n_prompt: int
    max_tokens: int
    temperature: float
    top_p: float
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return (self.temperature, self.top_p)


@dataclass
class _Prepared:
    """A request ready to generate: rendered, encoded (on the model's device), its keywords built."""

    text: str
    enc: Any
    n_prompt: int
    stop: list[str]
    seed: int | None
    kwargs: dict[str, Any]


class MicroBatcher:
    """One worker thread: takes the first waiting job, collects compatible jobs for `window` seconds
    (at most `max_batch`), and runs them as one batched `generate`."""

    def __init__(self, engine: ChatEngine, max_batch: int, window: float):
        self.engine, self.max_batch, self.window = engine, max_batch, window
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="heedful-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Generated:
        if not self._thread.is_alive():
            raise RuntimeError("the engine was closed")
        self._queue.put(job)
        return job.future.result()

    def stop(self) -> None:
        """Let the worker finish what it has and exit (it holds the engine, and so the model, alive)."""
        self._queue.put(None)
        self._thread.join(60)

    def _work(self) -> None:
        import time

        held: list[_Job] = []  # taken from the queue but incompatible with the batch that ran
        stopping = False
        while True:
            first = held.pop(0) if held else (None if stopping else self._queue.get())
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.window
            for job in list(held):
                if len(batch) < self.max_batch and job.group == first.group:
                    batch.append(job)
                    held.remove(job)
            while len(batch) < self.max_batch:
                try:
                    waiting = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                (batch if waiting.group == first.group else held).append(waiting)
            try:
                results = self.engine._generate_batch(batch)
            except BaseException as exc:  # every waiting request gets the error, none hangs
                for job in batch:
                    job.future.set_exception(exc)
            else:
                for job, result in zip(batch, results):
                    job.future.set_result(result)


class ChatEngine:
    def __init__(
        self,
        model: str,
        adapter: str | Path | None = None,
        device: str | None = None,
        max_batch: int = 16,
        batch_window: float = 0.005,
    ):
        from pipeline.generation import _eos_ids
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        self.model_name = model
        self.adapter = str(adapter) if adapter else None
        self.policy = device_policy(device)
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_causal_lm(model, self.policy, adapter=adapter).eval()
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        # encoding with padding flips shared state of the Rust tokenizer: a request thread encoding
        # while the batch thread pads got ragged tensors ("expected sequence of length 295, got 298")
        self._tokenize_lock = threading.Lock()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self._batcher = MicroBatcher(self, max_batch, batch_window) if max_batch > 1 else None

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher = None

    @property
    def special_tokens(self) -> list[str]:
        return list(getattr(self.tokenizer, "all_special_tokens", []) or [])

    def _render(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Any]:
        """(the prompt text, its token ids); a prompt too long for the context is refused here."""
        with self._tokenize_lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        n = enc["input_ids"].shape[1]
        if n + max_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt is {n} tokens and max_tokens is {max_tokens}: together more than the "
                f"model's context of {self.context_length} tokens"
            )
        return text, enc

    def _kwargs(self, max_tokens: int, temperature: float, top_p: float, stop: list[str]):
        kwargs = dict(max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        return kwargs

    def generate(
        self,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Generated:
        req = self._prepare(messages, max_tokens, temperature, top_p, stop, seed)  # too long: refused before any queue
        if self._batcher is not None and seed is None and not req.stop:
            return self._batcher.submit(_Job(req.text, req.n_prompt, max_tokens, temperature, top_p))
        out = self._run(req)
        return self._finish(out[0, req.n_prompt :].tolist(), req.n_prompt, max_tokens, req.stop)

    def _prepare(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
        seed: int | None,
    ) -> _Prepared:
        """What `generate` and `stream` both do before generating: render and encode the prompt
        (refusing one too long for the context), and build the `generate` keywords."""
        stop = list(stop or [])
        text, enc = self._render(messages, max_tokens)
        kwargs = self._kwargs(max_tokens, temperature, top_p, stop)
        return _Prepared(text, enc.to(self.policy.device), enc["input_ids"].shape[1], stop, seed, kwargs)

    def _run(self, req: _Prepared, **extra: Any):
        """One `generate` call on the model, alone (the lock), seeded when the request asked."""
        import torch
        from transformers import set_seed

        with self._lock, torch.inference_mode():
            if req.seed is not None:
                set_seed(req.seed)
            return self.model.generate(**req.enc, **req.kwargs, **extra)

    def _finish(self, tokens: list[int], n_prompt: int, max_tokens: int, stop: list[str]) -> Generated:
        tokens, ended = self._cut_eos(tokens[:max_tokens])
        finish = "stop" if ended else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop)
        return Generated(text.strip(), n_prompt, len(tokens), "stop" if stopped else finish)

    def _cut_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The reply up to its first end-of-turn token, and whether it had one."""
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                return tokens[:i], True
        return tokens, False

    def _generate_batch(self, jobs: list[_Job]) -> list[Generated]:
        """Jobs with the same sampling settings in one left-padded `generate`; each is cut to its own
        max_tokens (greedy: the same tokens as alone, up to float rounding in padded attention)."""
        import torch

        texts = [j.text for j in jobs]
        with self._tokenize_lock:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.policy.device)
        longest = max(j.max_tokens for j in jobs)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**enc, **self._kwargs(longest, jobs[0].temperature, jobs[0].top_p, []))
        width = enc["input_ids"].shape[1]
        return [self._finish(out[i, width:].tolist(), j.n_prompt, j.max_tokens, []) for i, j in enumerate(jobs)]

    def stream(
        self,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> tuple[int, Iterator[str], dict]:
        """(prompt_tokens, iterator of text deltas, info filled with completion_tokens/finish_reason at the end)."""
        from transformers import TextIteratorStreamer

        req = self._prepare(messages, max_tokens, temperature, top_p, stop, seed)
        stop, n_prompt = req.stop, req.n_prompt
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        info: dict = {"completion_tokens": 0, "finish_reason": "length"}
        result: dict = {}

        def work():
            try:
                result["out"] = self._run(req, streamer=streamer)
            except BaseException as exc:  # surface to the consumer, never hang it
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()

        def deltas() -> Iterator[str]:
            received, emitted, stopped = "", "", False
            for piece in streamer:
                received += piece
                cut, stopped = _cut_at_stop(received, stop)
                # hold back text that could be the start of a stop string
                safe = cut if stopped else received[: len(received) - _partial_stop(received, stop)]
                if len(safe) > len(emitted):
                    yield safe[len(emitted) :]
                    emitted = safe
                if stopped:
                    info["finish_reason"] = "stop"
                    break
            if stopped:  # we left the loop early: drain it, so generate() can finish
                for _ in streamer:
                    pass
            thread.join()
            if "error" in result:
                raise result["error"]
            if not stopped and len(received) > len(emitted):
                yield received[len(emitted) :]
            out = result.get("out")
            if out is not None:
                tokens, ended = self._cut_eos(out[0, n_prompt:].tolist())
                if ended:
                    info["finish_reason"] = "stop"
                info["completion_tokens"] = len(tokens)

        return n_prompt, deltas(), info


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
