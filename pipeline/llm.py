"""The one LLM client: a local HF model or any OpenAI-compatible chat endpoint (vLLM, llama.cpp
server, OpenAI, heedful's own server), for every stage that has an LLM write or judge text
(`simulate`'s users and judge, `c3po_data`'s generator, feedback evaluation's judge).

Configuration (`LLMSettings`): `kind: hf | openai`. The older spellings are accepted and
mapped: `backend: hf | openai` (the simulator's) and `kind: local` (the generators' = `hf`).

API key policy (openai kind), first match wins:
  1. `api_key_file`: a file readable by its owner only (mode 0600); a file that others can
     read is refused, a missing or empty one is an error;
  2. the environment variable named by `api_key_env` (default `OPENAI_API_KEY`);
  3. `HEEDFUL_SIMULATOR_API_KEY`, the simulator's old variable: still read, with a
     deprecation warning;
  4. none: a placeholder, for local servers that check no key.
The key is never logged or written into a manifest or an identity string.

Sampling: temperature 0 means greedy decoding on both kinds; the endpoint then gets
`temperature: 0` and no `top_p` (HF generate does not sample, so `top_p` would be ignored
there too).

Engine (hf kind, `engine:`): as the stages pick theirs (docs/generation.md) -- `auto` samples
with the faster of CTranslate2 (greedy replies equal to HF's) and HF generate on a CPU (measured
once per host and model: pipeline/engine_probe.py), HF generate elsewhere; `hf` insists on
HF. The identity does not name the engine: like the device, it is how, not what, is sampled.

`CachedLLM` (pipeline/llm_cache.py) wraps either client with the persistent call cache.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .chat import Messages, render_many
from .generation import Completion, EngineSetting, SamplingSettings, check_local_engine
from .models import ConfigAdapter, config_model
from .paths import ConfigPath
from .prefix_logits import PrefixMemo, last_token_logits

log = logging.getLogger("heedful.llm")

API_KEY_ENV = "OPENAI_API_KEY"
DEPRECATED_API_KEY_ENV = "HEEDFUL_SIMULATOR_API_KEY"
_KIND_SPELLINGS = {"hf": "hf", "local": "hf", "openai": "openai"}


class LLMSettings(BaseModel):
    """Which LLM writes or judges text. `model: null` with kind hf = the stage's default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    kind: Literal["hf", "openai"] = Field(
        default="hf",
        description="hf: a local model; openai: an OpenAI-compatible endpoint (old spellings: `backend:`, `kind: local`)",
    )
    model: str | None = Field(default=None, description="alias/folder/hub id (hf) or the served model's name (openai)")
    adapter: ConfigAdapter | None = Field(
        default=None, description="hf only: a LoRA adapter folder (checked when the config is read)"
    )
    engine: EngineSetting = "auto"
    base_url: str | None = Field(default=None, description="openai: e.g. http://127.0.0.1:8000/v1 (default: OpenAI's API)")
    api_key_file: ConfigPath | None = Field(default=None, description="openai: file holding the key (chmod 600)")
    api_key_env: str = Field(default=API_KEY_ENV, description="openai: environment variable holding the key")
    sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(max_new_tokens=256, temperature=0.7),
        description="for callers that ask for plain text (`complete`)",
    )
    batch_size: int = Field(default=8, ge=1, description="hf: conversations per generate() call")
    concurrency: int = Field(default=8, ge=1, description="openai: parallel requests")
    timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return check_local_engine(value)

    def credential_fields(self) -> tuple[str, ...]:
        """Where the key is read: not part of what a stage computes (pipeline/fingerprint.py)."""
        return ("api_key_file",)

    def fingerprint_folders(self) -> tuple[str, ...]:
        """hf: the model and adapter, by content when they are local folders (pipeline/fingerprint.py);
        an openai model is a served name."""
        return ("model", "adapter") if self.kind == "hf" else ()

    @field_validator("model")
    @classmethod
    def _local_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        """hf: a relative folder is the one beside the pipeline config, as its `model:` (an openai model is a served name)."""
        return config_model(value, info) if info.data.get("kind") == "hf" else value

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "backend" in data:
            backend = data.pop("backend")
            if "kind" in data and _KIND_SPELLINGS.get(data["kind"], data["kind"]) != _KIND_SPELLINGS.get(backend, backend):
                raise ValueError(
                    f"give `kind` (or its old spelling `backend`), not both: kind={data['kind']!r}, backend={backend!r}"
                )
            data["kind"] = backend
        if data.get("kind") in _KIND_SPELLINGS:
            data["kind"] = _KIND_SPELLINGS[data["kind"]]
        elif "kind" in data:
            raise ValueError(f"kind {data['kind']!r}: expected hf or openai (old spellings: local, backend: hf|openai)")
        return data

    @model_validator(mode="after")
    def _openai_needs_model(self) -> LLMSettings:
        if self.kind == "openai" and not self.model:
            raise ValueError("kind 'openai' needs model (the served model's name)")
        if self.kind == "openai" and self.adapter:
            raise ValueError("adapter is for kind 'hf' (an endpoint serves its own weights)")
        return self


class LLMClient(Protocol):
    """What every client does, batched across conversations. HF clients also have
    `reply_logprob(contexts, replies)` (chat APIs return no prompt log-probabilities)."""

    name: str  # the model's name, for logs
    identity: str  # names model (+ adapter) or endpoint; part of cache keys and provenance

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int = 0) -> list[Completion]: ...

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]: ...

    def yes_probability(self, conversations: list[Messages]) -> list[float]: ...


# ----------------------------------------------------------------------------- API keys


def read_key_file(path: str | Path, what: str = "api_key_file") -> str:
    """A secret from a file only its owner can read; refused otherwise (never logged)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: {path} not found")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{what}: {path} is readable by others; chmod 600 it (mode is {mode & 0o777:o})")
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{what}: {path} is empty")
    return key


def api_key(settings: LLMSettings) -> str:
    """The key by the module's documented precedence: file, `api_key_env`, the deprecated
    variable, a placeholder."""
    if settings.api_key_file:
        return read_key_file(settings.api_key_file)
    if os.environ.get(settings.api_key_env):
        return os.environ[settings.api_key_env]
    if os.environ.get(DEPRECATED_API_KEY_ENV):
        log.warning("%s is deprecated: set %s (or api_key_file) instead", DEPRECATED_API_KEY_ENV, settings.api_key_env)
        return os.environ[DEPRECATED_API_KEY_ENV]
    return "not-needed"


def openai_sampling(sampling: SamplingSettings) -> dict[str, Any]:
    """Request fields for `sampling`: greedy (temperature 0, no top_p) at temperature 0."""
    kwargs: dict[str, Any] = {"max_tokens": sampling.max_new_tokens}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(temperature=0.0)
    return kwargs


# ----------------------------------------------------------------------------- local HF model


class HFClient:
    """A local causal LM: replies from the engine `engine` picks (pipeline.generation's
    `pick_local_engine`: the faster CPU engine, HF generate otherwise), batched and seeded; the
    scores (`yes_probability`, `reply_logprob`) are forward passes of the HF model.

    A `model` passed in is used as it is, on HF: its weights may be ones no file holds (a policy
    being trained), so a converted copy could be stale. Otherwise, with ct2, the HF model is only
    loaded when a score is first asked for, and the CTranslate2 copy when a reply is.

    With a Chain-of-Hindsight `adapter` the replies open with its phrase and end where a phrase
    begins (pipeline/hindsight.py); the scores are of the text as given.
    """

    def __init__(
        self,
        name: str,
        device: str | None = None,
        batch_size: int = 8,
        adapter: str | Path | None = None,
        model=None,
        tokenizer=None,
        sampling: SamplingSettings | None = None,
        engine: str = "hf",
        new_tokens: int | None = None,
    ):
        from .generation import pick_local_engine
        from .hindsight import adapter_phrase
        from .models import load_tokenizer

        self.name = name
        self.phrase = adapter_phrase(adapter)
        self.batch_size = batch_size
        self.sampling = sampling or LLMSettings().sampling
        self.tokenizer = tokenizer or load_tokenizer(name)
        self._device, self._adapter = device, adapter
        # `new_tokens`: the most this client will be asked to write, where its holder knows (a small job
        # does not start the engine probe: pipeline/engine_probe.py `PROBE_PAYS_FROM`)
        self.engine = "hf" if model is not None else pick_local_engine(engine, device, name, new_tokens)
        self._model = model
        #: the judge's instructions' cache across calls, for a model this client loads (weights
        #: passed in may change between calls: a policy in training, an adapter switched on)
        self._memo = PrefixMemo() if model is None else None
        self._ct2: Any = None
        if self.engine == "hf":
            self._model = self.model  # load now: a wrong name or adapter fails here, not mid-stage
        self.identity = f"hf:{name}"
        if adapter is not None:
            from .artifacts import hash_path

            self.identity += f"+adapter:{hash_path(Path(adapter))[:16]}"
        if self.phrase is not None:  # replies cached before the phrase was applied are not this client's
            self.identity += "+coh"
        self._yes_no: list[int] | None = None

    @classmethod
    def policy(
        cls,
        name: str,
        device: str | None,
        batch_size: int,
        adapter: str | Path | None = None,
        tokenizer=None,
        engine: str = "auto",
        new_tokens: int | None = None,
    ) -> HFClient:
        """The policy in simulated conversations (the simulate stage's, the evaluate stage's users'),
        which asks for a whole round's turns at once: on CTranslate2 they go in one call
        (`ENGINE_BATCH`), as the stages hand it their queues -- it sorts them by length, and a sampled
        call restarts its generator to seed it (~1 s for SmolLM2), so a round pays one restart, not
        one per `batch_size` conversations. `batch_size` is HF's. Not the rule for every client: a
        large local simulator keeps `batch_size` as its memory limit on either engine."""
        from .generation import ENGINE_BATCH, pick_local_engine

        chosen = pick_local_engine(engine, device, name, new_tokens)
        per_call = ENGINE_BATCH if chosen == "ct2" else batch_size
        return cls(name, device, per_call, adapter, None, tokenizer, engine=chosen)

    @property
    def model(self):
        """The HF model (base + adapter), loaded on first use."""
        if self._model is None:
            from .models import device_policy, load_causal_lm

            self._model = load_causal_lm(self.name, device_policy(self._device), adapter=self._adapter).eval()
        return self._model

    @property
    def ct2(self) -> Any:
        """The CTranslate2 generator (engine ct2), built -- converted, once per model and adapter --
        on the first reply asked for: a judge that only scores never converts."""
        if self._ct2 is None and self.engine == "ct2":
            from .ct2_engine import Ct2Generator

            self._ct2 = Ct2Generator(self.name, self._adapter)
        return self._ct2

    def generate(
        self, conversations: list[Messages], sampling: SamplingSettings, seed: int = 0, adapters: list[str] | None = None
    ) -> list[Completion]:
        """One reply per conversation. `adapters`: per conversation, the PEFT adapter of the loaded
        model its reply is written with (`chat_generate`: conditions that differ only in the adapter
        share batches); HF only."""
        from .generation import chat_generate
        from .hindsight import answered_after

        if adapters is not None and (self.engine != "hf" or self.phrase is not None):
            why = "a Chain-of-Hindsight client opens every row with its phrase" if self.phrase else f"not {self.engine}"
            raise ValueError(f"per-row adapters need the HF engine on a plain adapter: {why}")

        def sample(suffix: str) -> list[list[Completion]]:
            if self.engine == "ct2":
                return self.ct2.generate(conversations, sampling, seed=seed, batch_size=self.batch_size, prompt_suffix=suffix)
            return chat_generate(
                self.model,
                self.tokenizer,
                conversations,
                sampling,
                1,
                self.batch_size,
                seed,
                prompt_suffix=suffix,
                adapters=adapters,
            )

        return [r[0] for r in answered_after(self.phrase, sample, self.tokenizer)]

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]:
        return [c.text for c in self.generate(conversations, self.sampling, seed)]

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        """Softmax over the first tokens of 'Yes' and 'No' as the next token; the prompts' shared
        start (a judge's instructions and examples) is computed once (pipeline/prefix_logits.py), and
        on a model this client loaded, once for all the calls that start with it."""
        if self._yes_no is None:
            self._yes_no = [self.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
        yes, no = self._yes_no
        token_lists = [self.tokenizer.encode(t, add_special_tokens=False) for t in render_many(self.tokenizer, conversations)]
        logits = last_token_logits(self.model, token_lists, self.batch_size, self.tokenizer.pad_token_id or 0, self._memo)
        return logits[:, [yes, no]].softmax(-1)[:, 0].tolist()

    def reply_logprob(self, contexts: list[Messages], replies: list[str], max_reply_tokens: int = 128) -> list[float]:
        """Mean log-probability per token of each reply after its context (right-padded batches).

        Only the reply's positions go through the 49k-vocabulary head, in tiles
        (`trainers.sequences.score_completions`): the context's logits and the full log-softmax
        over [rows, length, vocab] are never made (a simulated user's judge calls this every round)."""
        import torch

        from trainers.sequences import score_completions

        seqs = []
        for prompt, reply in zip(render_many(self.tokenizer, contexts), replies):
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
            reply_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
                reply_mask[i, len(p) : len(p) + len(r)] = 1 if p else 0
            with torch.no_grad():
                logps = score_completions(self.model, ids.to(device), mask.to(device), reply_mask.to(device)).logps.cpu()
            # an empty reply (or one with no context to score it after) is as unlikely as it gets
            out += [float(row.sum() / n) if n else -20.0 for row, n in zip(logps, reply_mask[:, 1:].sum(-1).tolist())]
        return out


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint


class OpenAIClient:
    """Chat completions against vLLM, TGI, Ollama or a hosted API; `concurrency` requests at a time."""

    def __init__(self, settings: LLMSettings):
        from openai import OpenAI

        self.settings = settings
        self.name = self.model = str(settings.model)
        self.sampling = settings.sampling
        self.concurrency = settings.concurrency
        self.client = OpenAI(base_url=settings.base_url, api_key=api_key(settings), timeout=settings.timeout_s, max_retries=2)
        self.identity = f"openai:{(settings.base_url or str(self.client.base_url)).rstrip('/')}:{settings.model}"

    def _map(self, fn, items):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, conversations: list[Messages], sampling: SamplingSettings, seed: int = 0) -> list[Completion]:
        def one(args):
            i, messages = args
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, seed=seed + i, **openai_sampling(sampling)
            )
            choice = resp.choices[0]
            text = (choice.message.content or "").strip()
            tokens = resp.usage.completion_tokens if resp.usage else len(text.split())
            return Completion(text, int(tokens), choice.finish_reason == "stop")

        return self._map(one, list(enumerate(conversations)))

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]:
        return [c.text for c in self.generate(conversations, self.sampling, seed)]

    def yes_probability(self, conversations: list[Messages]) -> list[float]:
        """From the first token's top logprobs when the server returns them, else from the text."""

        def one(messages):
            resp = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=10
            )
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


def shares_default_model(settings: LLMSettings, default_model: str | None) -> bool:
    """Whether `build_client(settings, default_model, ...)` reuses a loaded `default_model` (no adapter)."""
    return settings.kind == "hf" and (settings.model or default_model) == default_model and settings.adapter is None


def build_client(
    settings: LLMSettings,
    default_model: str | None = None,
    device: str | None = None,
    model=None,
    tokenizer=None,
    batch_size: int | None = None,
    model_adapter: str | Path | None = None,
    new_tokens: int | None = None,
) -> HFClient | OpenAIClient:
    """The client for `settings`. hf: `settings.model`, else `default_model`; an already loaded
    `model`/`tokenizer` (of `default_model`) is reused when it is the same one (`settings` names no
    adapter); `model_adapter` is the adapter that loaded model carries, if any (the client's identity
    and a Chain-of-Hindsight phrase follow it). `batch_size` overrides `settings.batch_size` (a
    stage's own knob). `new_tokens`: the most the client will be asked to write, where the caller
    knows (`pick_local_engine`)."""
    if settings.kind == "openai":
        return OpenAIClient(settings)
    name = settings.model or default_model
    if not name:
        raise ValueError("kind 'hf' needs model (an alias, folder or hub id)")
    reuse = model is not None and shares_default_model(settings, default_model)
    return HFClient(
        name,
        device,
        batch_size or settings.batch_size,
        model_adapter if reuse else settings.adapter,
        model if reuse else None,
        tokenizer if reuse else None,
        settings.sampling,
        settings.engine,
        new_tokens,
    )
