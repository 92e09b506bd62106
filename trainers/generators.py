"""Text generators for data generation and judging: a local HF model or any
OpenAI-compatible chat endpoint (vLLM, llama.cpp server, OpenAI, heedful's own server).

The API key comes from a file (mode 0600 expected) or an environment variable, and is never
logged or written into a manifest.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.generation import SamplingSettings

Messages = list[dict[str, str]]


class GeneratorSettings(BaseModel):
    """Which LLM writes (or judges) text. `model: null` with kind local = the pipeline's model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    kind: Literal["local", "openai"] = "local"
    model: str | None = None
    adapter: str | None = Field(default=None, description="local only: a LoRA adapter folder")
    base_url: str | None = Field(default=None, description="openai: e.g. http://127.0.0.1:8000/v1")
    api_key_file: str | None = Field(default=None, description="openai: file holding the key (chmod 600)")
    api_key_env: str = "OPENAI_API_KEY"
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=256, temperature=0.7))
    batch_size: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)


class Generator(Protocol):
    name: str

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]: ...


class LocalGenerator:
    """Batched sampling from a local causal LM through the spine's `chat_generate`."""

    def __init__(self, model_name: str, settings: GeneratorSettings, device: str | None = None, model=None, tokenizer=None):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        self.name = model_name
        self.settings = settings
        self.tokenizer = tokenizer or load_tokenizer(model_name)
        self.model = model if model is not None else load_causal_lm(model_name, device_policy(device), adapter=settings.adapter).eval()

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]:
        from pipeline.generation import chat_generate

        replies = chat_generate(self.model, self.tokenizer, conversations, self.settings.sampling, 1, self.settings.batch_size, seed)
        return [r[0].text for r in replies]


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible server, one request per conversation."""

    def __init__(self, settings: GeneratorSettings):
        from openai import OpenAI

        if not settings.model:
            raise ValueError("generator.kind openai needs generator.model (the served model's name)")
        self.name = settings.model
        self.settings = settings
        self.client = OpenAI(base_url=settings.base_url, api_key=read_api_key(settings), timeout=settings.timeout_s)

    def complete(self, conversations: list[Messages], seed: int = 0) -> list[str]:
        s = self.settings.sampling
        out = []
        for i, messages in enumerate(conversations):
            response = self.client.chat.completions.create(
                model=self.settings.model, messages=messages, max_tokens=s.max_new_tokens,
                temperature=s.temperature, top_p=s.top_p, seed=seed + i,
            )
            out.append((response.choices[0].message.content or "").strip())
        return out


def read_api_key(settings: GeneratorSettings) -> str:
    """The key from `api_key_file` (refused if others can read it) or `api_key_env`;
    local servers that need none get a placeholder."""
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"generator.api_key_file: {path} not found")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"generator.api_key_file: {path} is readable by others; chmod 600 it")
        return path.read_text().strip()
    return os.environ.get(settings.api_key_env) or "not-needed"


def make_generator(settings: GeneratorSettings, default_model: str, device: str | None = None, model=None, tokenizer=None) -> Generator:
    """A generator for `settings`; `model`/`tokenizer` reuse an already loaded local model."""
    if settings.kind == "openai":
        return OpenAIGenerator(settings)
    name = settings.model or default_model
    reuse = model is not None and (settings.model in (None, default_model)) and settings.adapter is None
    return LocalGenerator(name, settings, device, model if reuse else None, tokenizer if reuse else None)
