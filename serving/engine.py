"""The served model: base + optional PEFT adapter, chat-templated generation, one request at a time.

Generation is serialized with a lock: on CPU one request already uses every core, and it
keeps `generate` state (seeds, streamer threads) from interleaving.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class PromptTooLong(ValueError):
    pass


class ChatEngine:
    def __init__(self, model: str, adapter: str | Path | None = None, device: str | None = None):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        self.model_name = model
        self.adapter = str(adapter) if adapter else None
        self.policy = device_policy(device)
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_causal_lm(model, self.policy, adapter=adapter).eval()
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._lock = threading.Lock()
        eos = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        self.eos_ids = sorted(eos)

    @property
    def special_tokens(self) -> list[str]:
        return list(getattr(self.tokenizer, "all_special_tokens", []) or [])

    def _encode(self, messages: list[dict[str, str]], max_tokens: int):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        n = enc["input_ids"].shape[1]
        if n + max_tokens > self.context_length:
            raise PromptTooLong(f"prompt is {n} tokens and max_tokens is {max_tokens}: together more than the "
                                f"model's context of {self.context_length} tokens")
        return enc.to(self.policy.device), n

    def _kwargs(self, max_tokens: int, temperature: float, top_p: float, stop: list[str]):
        kwargs = dict(max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        return kwargs

    def generate(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> Generated:
        import torch
        from transformers import set_seed

        stop = stop or []
        enc, n_prompt = self._encode(messages, max_tokens)
        with self._lock, torch.inference_mode():
            if seed is not None:
                set_seed(seed)
            out = self.model.generate(**enc, **self._kwargs(max_tokens, temperature, top_p, stop))
        tokens = out[0, n_prompt:].tolist()
        finish = "length"
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens, finish = tokens[:i], "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop)
        return Generated(text.strip(), n_prompt, len(tokens), "stop" if stopped else finish)

    def stream(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None
               ) -> tuple[int, Iterator[str], dict]:
        """(prompt_tokens, iterator of text deltas, info filled with completion_tokens/finish_reason at the end)."""
        import torch
        from transformers import TextIteratorStreamer, set_seed

        stop = stop or []
        enc, n_prompt = self._encode(messages, max_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        info: dict = {"completion_tokens": 0, "finish_reason": "length"}
        result: dict = {}

        def work():
            with self._lock, torch.inference_mode():
                if seed is not None:
                    set_seed(seed)
                try:
                    result["out"] = self.model.generate(**enc, streamer=streamer,
                                                        **self._kwargs(max_tokens, temperature, top_p, stop))
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
                    yield safe[len(emitted):]
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
                yield received[len(emitted):]
            out = result.get("out")
            if out is not None:
                tokens = out[0, n_prompt:].tolist()
                for i, tok in enumerate(tokens):
                    if tok in self.eos_ids:
                        tokens = tokens[:i]
                        info["finish_reason"] = "stop"
                        break
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
