"""The served model: base + optional PEFT adapter, chat-templated generation, micro-batched.

Concurrent requests are batched: a request that can share a forward pass (no `seed`, no
`stop` strings, the same sampling settings) waits up to `batch_window` seconds for others
and they are generated together, left-padded, in one `generate` call (`MicroBatcher`).
With 100 concurrent clients that is a handful of batched calls instead of 100 serialized
ones. Requests with a seed (reproducible sampling) or stop strings, and streams, run alone.
The model itself is used by one call at a time (a lock): on CPU one call already uses every
core, and it keeps `generate` state (seeds, streamer threads) from interleaving.

Two engines behind the same requests (`engine`, resolved by pipeline.generation's
`pick_serving_engine`, as the stages resolve theirs; `auto` measures which is faster on this
CPU): HF `generate` on the loaded model, or CTranslate2 on CPU (pipeline/ct2_engine.py: the weights converted once, the adapter merged in,
greedy replies equal to HF's). With ct2 the conversion runs when the engine is built -- for a
hot-swapped version, while it loads off to the side, before the switch. Batches go through one
`generate_batch` with a budget per request; seeded requests, stop strings and streams through
CTranslate2's token streaming (`Ct2Generator.stream_ids`), stopped at the token that completes a
stop string as HF's `stop_strings` stops. Or both (`hf+ct2`, what `auto` picks where CTranslate2 is
faster only for a lone request, pipeline/engine_probe.py): everything that runs alone (a request
that found no company in its window, seeded ones, stop strings, streams) on CTranslate2, micro-batches
of two or more on HF (with `max_batch` 1 there are none: that is ct2 alone). It costs memory: HF's
weights, their packed copy and CTranslate2's; and in bf16 a greedy reply can differ at a near-tie
between the engines (CTranslate2 computes in fp32), as batched and alone do.

A Chain-of-Hindsight adapter (its `coh.json`, pipeline/hindsight.py) is served as it was trained and
evaluated: every prompt's assistant turn opens with its phrase, and every reply -- batched, alone or
streamed -- ends where one of its chain's phrases begins (finish_reason "stop"), as a stop string.
A micro-batch stops each row at the phrases (HF's `stop_strings`; on CTranslate2 a step callback),
its `completion_tokens` counted through the phrase as alone.

On a CPU the HF side keeps its linear layers' weights packed for oneDNN for the engine's life where
memory has room for the copy (pipeline/cpu_linear.py `packed_linears`, opened here and closed by
`close`; pipeline/host_memory.py): nothing in serving changes a loaded model's weights (a new
adapter version is a new engine), so the copies cannot go stale.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator
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
    sampling: Any  # pipeline.generation.SamplingSettings: the same request for the ct2 engine


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
        engine: str = "hf",
    ):
        from pipeline.generation import _eos_ids, pick_serving_engine
        from pipeline.hindsight import adapter_phrase
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        self.model_name = model
        self.adapter = str(adapter) if adapter else None
        phrase = adapter_phrase(adapter)  # a bad coh.json fails here, before the model loads
        self.phrase = phrase.text if phrase is not None else ""
        self.phrase_stops = list(phrase.stop) if phrase is not None else []
        self.engine = pick_serving_engine(engine, device, model)
        if self.engine == "hf+ct2" and max_batch <= 1:  # no micro-batches: every request runs alone, on ct2
            self.engine = "ct2"
        self.policy = device_policy("cpu" if "ct2" in self.engine else device)
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model: Any = None
        self.ct2: Any = None
        self._packed = contextlib.ExitStack()
        if "ct2" in self.engine:
            from transformers import AutoConfig

            from pipeline.ct2_engine import Ct2Generator
            from pipeline.models import resolve_model

            # converts (adapter merged) here, so a version is ready before it is switched to; the start a
            # request shares with the previous one (system prompt, few-shot examples) is computed once
            # and kept, a few such starts at most (pipeline/ct2_engine.py `_static_prefix`)
            self.ct2 = Ct2Generator(model, adapter, prefix_cache="across_calls")
            config = AutoConfig.from_pretrained(resolve_model(model))
            self.eos_ids = sorted(self.tokenizer.convert_tokens_to_ids(self.ct2.eos_tokens))
        if "hf" in self.engine:
            from pipeline.cpu_linear import packed_linears, routable_bytes
            from pipeline.host_memory import room_for

            self.model = load_causal_lm(model, self.policy, adapter=adapter).eval()
            config = getattr(self.model, "config", None)
            self.eos_ids = _eos_ids(self.model, self.tokenizer)
            # on a CPU the decode steps' small products run on weights packed once for the engine's life
            # (pipeline/cpu_linear.py; packing per request would cost ~0.3 s each): one more copy of the
            # linear weights in memory, taken only where it fits (pipeline/host_memory.py), dropped by
            # `close`; HEEDFUL_PACKED_LINEAR=0 turns it off
            if room_for(routable_bytes(self.model), "packed copies of the linear layers' weights"):
                self._packed.enter_context(packed_linears(self.model))
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        # encoding with padding flips shared state of the Rust tokenizer: a request thread encoding
        # while the batch thread pads got ragged tensors ("expected sequence of length 295, got 298")
        self._tokenize_lock = threading.Lock()
        self._batcher = MicroBatcher(self, max_batch, batch_window) if max_batch > 1 else None

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher = None
        # the packed copies go now, not when the last reference does; without the lock: an abandoned HF
        # stream may still be generating under it, and a block may close while another thread computes
        self._packed.close()
        if self.ct2 is not None:  # likewise the converted model, once no call uses it
            with self._lock:
                self.ct2.generator = None

    @property
    def special_tokens(self) -> list[str]:
        return list(getattr(self.tokenizer, "all_special_tokens", []) or [])

    def _render(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Any]:
        """(the prompt text, its token ids); a prompt too long for the context is refused here."""
        with self._tokenize_lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + self.phrase
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

    @staticmethod
    def _sampling(max_tokens: int, temperature: float, top_p: float):
        """The request as SamplingSettings for the ct2 engine: no top-k, no repetition penalty (as `_kwargs`)."""
        from pipeline.generation import SamplingSettings

        return SamplingSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=0)

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
        if self._batcher is not None and seed is None and not stop:  # a batch stops each row at the CoH phrases
            return self._batcher.submit(_Job(req.text, req.n_prompt, max_tokens, temperature, top_p))
        if self.ct2 is not None:
            tokens, ended = self._ct2_reply(req)
            return self._finish(tokens, req.n_prompt, max_tokens, req.stop, ended)
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
        stop = [*(stop or []), *self.phrase_stops]
        text, enc = self._render(messages, max_tokens)
        kwargs = self._kwargs(max_tokens, temperature, top_p, stop)
        sampling = self._sampling(max_tokens, temperature, top_p)
        return _Prepared(text, enc.to(self.policy.device), enc["input_ids"].shape[1], stop, seed, kwargs, sampling)

    def _run(self, req: _Prepared, **extra: Any):
        """One `generate` call on the model, alone (the lock), seeded when the request asked, else (sampling)
        from a random seed (`_unpredictable_rng`)."""
        import torch
        from transformers import set_seed

        from pipeline.kv_cache import cache_kwargs

        with self._lock, torch.inference_mode():
            if req.seed is not None:
                set_seed(req.seed)
            elif req.kwargs.get("do_sample"):
                _unpredictable_rng()
            cache = cache_kwargs(self.model, req.kwargs.get("max_new_tokens") or 64)
            return self.model.generate(**req.enc, **req.kwargs, **cache, **extra)

    def _ct2_reply(self, req: _Prepared, on_text: Callable[[str], bool] | None = None) -> tuple[list[int], bool]:
        """One request on the ct2 engine, token by token, alone (the lock): (reply ids, ended by a
        stop token). Stops after the token that completes a stop string (as HF's `stop_strings`),
        or when `on_text(reply so far)` returns False (a stream nobody reads any more)."""
        tokens: list[int] = []
        with self._lock:
            for token in self.ct2.stream_ids(req.text, req.sampling, seed=req.seed):
                tokens.append(token)
                if not req.stop and on_text is None:
                    continue
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if on_text is not None and not on_text(text):
                    break
                if _cut_at_stop(text, req.stop)[1]:
                    break
        return tokens, len(tokens) < req.sampling.max_new_tokens

    def _finish(self, tokens: list[int], n_prompt: int, max_tokens: int, stop: list[str], ended: bool | None = None) -> Generated:
        """`tokens`: the reply (cut at its first stop token here), or with `ended` given, already cut;
        `stop`: the request's stop strings with the CoH phrases (`_prepare`), a micro-batch's the phrases."""
        if ended is None:
            tokens, ended = self._cut_eos(tokens[:max_tokens])
        finish = "stop" if ended else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop)
        if stopped:  # the tokens through the one that completes the stop string, as a request alone stops
            tokens = tokens[: self._through_stop(tokens, stop)]
        return Generated(text.strip(), n_prompt, len(tokens), "stop" if stopped else finish)

    def _through_stop(self, tokens: list[int], stop: list[str]) -> int:
        """How many of `tokens` it takes to complete a stop string (their text contains one): a micro-batch
        is cut at a CoH phrase after generating, so its count must not include what came after."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if _cut_at_stop(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True), stop)[1]:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _cut_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The reply up to its first end-of-turn token, and whether it had one."""
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                return tokens[:i], True
        return tokens, False

    def _generate_batch(self, jobs: list[_Job]) -> list[Generated]:
        """Jobs with the same sampling settings in one left-padded `generate` (ct2: one `generate_batch`
        with a budget per job); each is cut to its own max_tokens (greedy: the same tokens as alone, up
        to float rounding in padded attention). With both engines (hf+ct2) a lone job goes to CTranslate2."""
        if self.ct2 is not None and (self.model is None or len(jobs) == 1):
            return self._ct2_batch(jobs)
        import torch

        from pipeline.kv_cache import cache_kwargs

        texts = [j.text for j in jobs]
        with self._tokenize_lock:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.policy.device)
        longest = max(j.max_tokens for j in jobs)
        with self._lock, torch.inference_mode():
            if jobs[0].temperature > 0:
                _unpredictable_rng()
            # a CoH adapter's rows stop at its phrases (HF stops rows one by one); a user's stops never batch
            kwargs = self._kwargs(longest, jobs[0].temperature, jobs[0].top_p, self.phrase_stops)
            out = self.model.generate(**enc, **kwargs, **cache_kwargs(self.model, longest))
        width = enc["input_ids"].shape[1]
        return [self._finish(out[i, width:].tolist(), j.n_prompt, j.max_tokens, self.phrase_stops) for i, j in enumerate(jobs)]

    def _ct2_batch(self, jobs: list[_Job]) -> list[Generated]:
        budgets = [j.max_tokens for j in jobs]
        sampling = self._sampling(max(budgets), jobs[0].temperature, jobs[0].top_p)
        with self._lock:  # seed None: unseeded requests sample on, without a generator restart
            replies = self.ct2.generate_ids(
                [j.text for j in jobs],
                sampling,
                seed=None,
                max_batch_size=len(jobs),
                max_new_tokens=budgets,
                stop_strings=self.phrase_stops,  # a CoH adapter's rows stop at its phrases
            )
        return [
            self._finish(ids, j.n_prompt, j.max_tokens, self.phrase_stops, len(ids) < j.max_tokens)
            for (ids,), j in zip(replies, jobs)
        ]

    def stream(
        self,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> tuple[int, Generator[str, None, None], dict]:
        """(prompt_tokens, iterator of text deltas, info filled with completion_tokens/finish_reason at the end)."""
        req = self._prepare(messages, max_tokens, temperature, top_p, stop, seed)
        stop, n_prompt = req.stop, req.n_prompt
        info: dict = {"completion_tokens": 0, "finish_reason": "length"}
        done: dict = {}  # the pieces' source fills `tokens` and `ended` once it has finished
        pieces = self._ct2_pieces(req, done) if self.ct2 is not None else self._hf_pieces(req, done)

        def deltas() -> Generator[str, None, None]:
            received, emitted, stopped = "", "", False
            # the streamed text is `generate`'s, which cuts at a stop string and then strips the reply: no
            # leading whitespace (a reply after a CoH phrase starts with a space), and whitespace held back
            # until text follows it
            try:
                for piece in pieces:
                    received += piece
                    cut, stopped = _cut_at_stop(received, stop)
                    # hold back text that could be the start of a stop string
                    safe = (cut if stopped else received[: len(received) - _partial_stop(received, stop)]).strip()
                    if len(safe) > len(emitted):
                        yield safe[len(emitted) :]
                        emitted = safe
                    if stopped:
                        info["finish_reason"] = "stop"
                        break
                if stopped:  # we left the loop early: drain it, so the generation can finish
                    for _ in pieces:
                        pass
            finally:  # these deltas closed early (the client went away): the generation stops now, not when collected
                pieces.close()
            received = received.strip()
            if not stopped and len(received) > len(emitted):
                yield received[len(emitted) :]
            if done:
                if done["ended"]:
                    info["finish_reason"] = "stop"
                info["completion_tokens"] = done["tokens"]

        return n_prompt, deltas(), info

    def _hf_pieces(self, req: _Prepared, done: dict) -> Generator[str, None, None]:
        """Text pieces from HF `generate` in a thread through a `TextIteratorStreamer`; a stream left
        unread (the client went away) stops the generation at its next step, as on ct2, instead of
        holding the model to the end of its budget."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict = {}
        abandoned = threading.Event()

        def work():
            try:
                result["out"] = self._run(req, streamer=streamer, stopping_criteria=_stops_when(abandoned))
            except BaseException as exc:  # surface to the consumer, never hang it
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            abandoned.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        out = result.get("out")
        if out is not None:
            tokens, ended = self._cut_eos(out[0, req.n_prompt :].tolist())
            done.update(tokens=len(tokens), ended=ended)

    def _ct2_pieces(self, req: _Prepared, done: dict) -> Generator[str, None, None]:
        """Text pieces from CTranslate2's token streaming in a thread: each new token's text (held
        back while it ends in an incomplete character); a stream left unread stops the decoding."""
        pending: queue.Queue[str | None] = queue.Queue()
        abandoned = threading.Event()
        result: dict = {}

        def on_text(text: str) -> bool:
            pending.put(text)
            return not abandoned.is_set()

        def work():
            try:
                result["tokens"], result["ended"] = self._ct2_reply(req, on_text)
            except BaseException as exc:  # surface to the consumer, never hang it
                result["error"] = exc
            finally:
                pending.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted = ""
        try:
            while (text := pending.get(timeout=600)) is not None:
                if not text.endswith("\ufffd") and len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted) :]
                    emitted = text
        finally:
            abandoned.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        final = self.tokenizer.decode(result["tokens"], skip_special_tokens=True)
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted) :]
        done.update(tokens=len(result["tokens"]), ended=result["ended"])


def _unpredictable_rng() -> None:
    """torch's global RNG from a random source, for sampling without a seed. Why: a seeded request
    (`set_seed`) leaves it in a state its sender can compute, so the unseeded requests after it would
    continue a stream one user can predict for another; and torch starts it from a fixed seed in every
    process, so after a restart the unseeded replies would replay."""
    import secrets

    import torch

    torch.manual_seed(secrets.randbits(63))


def _stops_when(event: threading.Event) -> Any:
    """A transformers `StoppingCriteriaList` that stops every row once `event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Abandoned(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Abandoned()])


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
