"""Batched chat sampling with HF generate: shared by generate, simulate and data-generation stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

Messages = list[dict[str, str]]


class SamplingSettings(BaseModel):
    """Sampling knobs; temperature 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=50, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)


@dataclass
class Completion:
    text: str
    num_tokens: int
    finished: bool  # ended with EOS rather than hitting max_new_tokens


def render_prompts(tokenizer, conversations: list[Messages]) -> list[str]:
    """Apply the chat template with the assistant turn opened."""
    return [
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) for conv in conversations
    ]


def chat_generate(
    model,
    tokenizer,
    conversations: list[Messages],
    sampling: SamplingSettings,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[Completion]]:
    """Sample `num_samples` replies per conversation, `batch_size` conversations at a time.

    Seeded per batch, so a rerun with the same config reproduces the same replies.
    """
    import torch
    from transformers import set_seed

    tokenizer.padding_side = "left"
    texts = render_prompts(tokenizer, conversations)
    eos_ids = _eos_ids(model, tokenizer)
    out: list[list[Completion]] = []
    device = next(model.parameters()).device
    n_batches = (len(texts) + batch_size - 1) // batch_size
    for b in range(n_batches):
        chunk = texts[b * batch_size : (b + 1) * batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        set_seed(seed + b)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            repetition_penalty=sampling.repetition_penalty,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            generated = model.generate(**enc, **kwargs)
        new = generated[:, enc["input_ids"].shape[1] :]
        for i in range(len(chunk)):
            replies = []
            for j in range(num_samples):
                tokens = new[i * num_samples + j].tolist()
                finished = False
                for k, tok in enumerate(tokens):
                    if tok in eos_ids:
                        tokens, finished = tokens[:k], True
                        break
                while tokens and tokens[-1] == tokenizer.pad_token_id:
                    tokens.pop()
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                replies.append(Completion(text, len(tokens), finished))
            out.append(replies)
        if on_batch is not None:
            on_batch(b + 1, n_batches)
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
