"""The simulator's LLM, pluggable: a local HF model or any OpenAI-compatible endpoint.

Both backends do two things, batched across conversations:
  generate(conversations, sampling, seed) -> one Completion each
  yes_probability(conversations)          -> P(Yes) / (P(Yes) + P(No)) for the next token
and local models a third: reply_logprob(contexts, replies) -> mean log-probability of a reply
(OpenAI-compatible chat APIs do not return prompt log-probabilities).
`CachedLLM` wraps either one with the persistent cache; only misses reach the model.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.generation import Completion, SamplingSettings

from .cache import LLMCache, cache_key

Messages = list[dict[str, str]]
log = logging.getLogger("heedful.simulate")


class ChatLLM(Protocol):
    identity: str

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int) -> list[Completion]: ...

    def yes_probability(self, conversations: list[Messages]) -> list[float]: ...

    # optional: mean log-probability of `reply` as the assistant's next turn (local models only)
    # def reply_logprob(self, contexts: list[Messages], replies: list[str]) -> list[float]: ...


class SimulatorLLMSettings(BaseModel):
    """`backend: hf` (a model alias, folder or hub id) or `backend: openai` (URL + key file)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    backend: str = Field(default="hf", pattern="^(hf|openai)$")
    model: str = Field(default="smollm2-135m", description="alias/folder/hub id (hf) or the served model name (openai)")
    base_url: str | None = Field(default=None, description="e.g. http://127.0.0.1:8000/v1 (openai backend)")
    api_key_file: str | None = Field(default=None, description="file holding the API key (mode 0600); none for local servers")
    concurrency: int = Field(default=8, ge=1, description="parallel requests (openai backend)")
    timeout_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "SimulatorLLMSettings":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


# ----------------------------------------------------------------------------- local HF model


class HFBackend:
    """A causal LM through pipeline.models / pipeline.generation (batched, seeded)."""

    def __init__(self, name: str, device: str | None = None, batch_size: int = 8, adapter: str | Path | None = None,
                 model=None, tokenizer=None):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        self.name = name
        self.batch_size = batch_size
        self.tokenizer = tokenizer or load_tokenizer(name)
        self.model = model if model is not None else load_causal_lm(name, device_policy(device), adapter=adapter).eval()
        self.identity = f"hf:{name}"
        if adapter is not None:
            from pipeline.artifacts import hash_path

            self.identity += f"+adapter:{hash_path(Path(adapter))[:16]}"
        self._yes_no = None

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int) -> list[Completion]:
        from pipeline.generation import chat_generate

        replies = chat_generate(self.model, self.tokenizer, conversations, sampling, num_samples=1,
                                batch_size=self.batch_size, seed=seed)
        return [r[0] for r in replies]

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        """One forward pass per batch: softmax over the first tokens of 'Yes' and 'No'."""
        import torch

        from pipeline.generation import render_prompts

        if self._yes_no is None:
            self._yes_no = [self.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
        yes, no = self._yes_no
        self.tokenizer.padding_side = "left"
        texts = render_prompts(self.tokenizer, conversations)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1].float()
            pair = torch.stack([logits[:, yes], logits[:, no]], dim=-1).softmax(-1)
            out.extend(pair[:, 0].tolist())
        return out

    def reply_logprob(self, contexts: list[Messages], replies: list[str], max_reply_tokens: int = 128) -> list[float]:
        """Mean log-probability per token of each reply after its context (right-padded batches)."""
        import torch

        from pipeline.generation import render_prompts

        prompts_ = render_prompts(self.tokenizer, contexts)
        seqs = []
        for prompt, reply in zip(prompts_, replies):
            p = self.tokenizer.encode(prompt, add_special_tokens=False)
            r = self.tokenizer.encode(reply, add_special_tokens=False)[:max_reply_tokens]
            seqs.append((p, r))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        out: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
            with torch.no_grad():
                logp = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            for i, (p, r) in enumerate(chunk):
                if not r:
                    out.append(-20.0)  # an empty reply is as unlikely as it gets
                    continue
                positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
                out.append(logp[i, positions, ids[i, len(p) : len(p) + len(r)]].mean().item())
        return out


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint


def read_api_key(path: str | Path) -> str:
    """The key from a file; warns (never logs the key) when others can read the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"api_key_file {path}: not found")
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("api_key_file %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"api_key_file {path}: empty")
    return key


class OpenAIBackend:
    """Chat completions against vLLM, TGI, Ollama or a hosted API; requests run `concurrency` at a time."""

    def __init__(self, base_url: str, model: str, api_key_file: str | None = None, concurrency: int = 8,
                 timeout_s: float = 120.0):
        from openai import OpenAI

        key = read_api_key(api_key_file) if api_key_file else os.environ.get("HEEDFUL_SIMULATOR_API_KEY", "EMPTY")
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=2)
        self.model = model
        self.concurrency = concurrency
        self.identity = f"openai:{base_url.rstrip('/')}:{model}"

    def _map(self, fn, items):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int) -> list[Completion]:
        def one(args):
            i, messages = args
            kwargs = dict(model=self.model, messages=messages, max_tokens=sampling.max_new_tokens, seed=seed + i)
            if sampling.temperature > 0:
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                kwargs.update(temperature=0.0)
            resp = self.client.chat.completions.create(**kwargs)
            choice = resp.choices[0]
            text = (choice.message.content or "").strip()
            tokens = resp.usage.completion_tokens if resp.usage else len(text.split())
            return Completion(text, int(tokens), choice.finish_reason == "stop")

        return self._map(one, list(enumerate(conversations)))

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        """From the first token's top logprobs when the server returns them, else from the text."""

        def one(messages):
            resp = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=1,
                                                       temperature=0.0, logprobs=True, top_logprobs=10)
            choice = resp.choices[0]
            content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
            if content:
                probs = {"yes": 0.0, "no": 0.0}
                for cand in content[0].top_logprobs or []:
                    word = cand.token.strip().lower()
                    if word in probs:
                        probs[word] += math.exp(cand.logprob)
                if probs["yes"] + probs["no"] > 0:
                    return probs["yes"] / (probs["yes"] + probs["no"])
            text = (choice.message.content or "").strip().lower()
            return 1.0 if text.startswith("yes") else 0.0

        return self._map(one, conversations)


def build_backend(settings: SimulatorLLMSettings, device: str | None = None, batch_size: int = 8,
                  shared: HFBackend | None = None) -> ChatLLM:
    """`shared`: reuse an already loaded HF model of the same name (the policy's, without adapter)."""
    if settings.backend == "openai":
        return OpenAIBackend(settings.base_url or "", settings.model, settings.api_key_file, settings.concurrency,
                             settings.timeout_s)
    if shared is not None and shared.name == settings.model and shared.identity == f"hf:{settings.model}":
        return shared
    return HFBackend(settings.model, device=device, batch_size=batch_size)


# ----------------------------------------------------------------------------- cache wrapper


class CachedLLM:
    """Looks every request up in the cache; sends only the misses to the backend, in one batch."""

    def __init__(self, inner: ChatLLM, cache: LLMCache | None):
        self.inner = inner
        self.cache = cache
        self.identity = inner.identity
        self.hits = 0
        self.misses = 0
        self.generated_tokens = 0

    def _lookup(self, keys: list[str]) -> dict[str, object]:
        return self.cache.get_many(keys) if self.cache is not None else {}

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int,
                 salts: list[str]) -> list[Completion]:
        keys = [cache_key("generate", self.identity, salt, msgs, sampling.model_dump(), seed)
                for salt, msgs in zip(salts, conversations)]
        found = self._lookup(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.inner.generate([conversations[i] for i in todo], sampling, seed)
            new = {keys[i]: {"text": c.text, "num_tokens": c.num_tokens, "finished": c.finished} for i, c in zip(todo, fresh)}
            self.generated_tokens += sum(c.num_tokens for c in fresh)
            if self.cache is not None:
                self.cache.put_many(new)
            found.update(new)
        return [Completion(found[k]["text"], found[k]["num_tokens"], found[k]["finished"]) for k in keys]

    @property
    def has_likelihood(self) -> bool:
        return hasattr(self.inner, "reply_logprob")

    def reply_logprob(self, contexts: list[Messages], replies: list[str], salts: list[str]) -> list[float]:
        keys = [cache_key("logprob", self.identity, salt, ctx, reply) for salt, ctx, reply in zip(salts, contexts, replies)]
        found = self._lookup(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.inner.reply_logprob([contexts[i] for i in todo], [replies[i] for i in todo])
            new = {keys[i]: float(v) for i, v in zip(todo, fresh)}
            if self.cache is not None:
                self.cache.put_many(new)
            found.update(new)
        return [float(found[k]) for k in keys]

    def yes_probability(self, conversations: list[Messages], salts: list[str]) -> list[float]:
        keys = [cache_key("yes", self.identity, salt, msgs) for salt, msgs in zip(salts, conversations)]
        found = self._lookup(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.inner.yes_probability([conversations[i] for i in todo])
            new = {keys[i]: float(p) for i, p in zip(todo, fresh)}
            if self.cache is not None:
                self.cache.put_many(new)
            found.update(new)
        return [float(found[k]) for k in keys]
