"""Rollouts: several sampled replies per prompt from the LoRA policy, laid out for PPO.

Layout: prompts left-padded to Q tokens, responses right-padded to R tokens. A response
is its tokens up to and including the first EOS (the model must learn to stop, so the
EOS is an action with a log-prob); a reply that hits `max_new_tokens` has no EOS and is
marked unfinished. After the end, tokens are pad and the mask is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [N, Q] left-padded
    query_mask: torch.Tensor  # [N, Q]
    response_ids: torch.Tensor  # [N, R] right-padded
    response_mask: torch.Tensor  # [N, R] 1 up to and including the EOS
    lengths: torch.Tensor  # [N] response tokens incl. EOS
    text_lengths: torch.Tensor  # [N] response tokens excl. EOS (what reward models see)
    finished: torch.Tensor  # [N] bool: ended with EOS
    prompt_index: torch.Tensor  # [N] which prompt of the step
    texts: list[str] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)  # per sample, as the reward models get them
    scopes: list[str | None] | None = None  # per sample: its prompt's scope, when the prompts have one
    # filled by the trainer
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # per-token reward-model rewards, before KL
    rewards: torch.Tensor | None = None  # after KL shaping (and whitening)
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def response_token_ids(self) -> list[list[int]]:
        """The tokens reward models align dense rewards to (EOS excluded)."""
        return [self.response_ids[i, : int(self.text_lengths[i])].tolist() for i in range(len(self))]

    def select(self, index: torch.Tensor) -> Rollout:
        """Rows `index`, trimmed to the padding they need (fewer wasted FLOPs per micro-batch)."""
        index = index.to(self.query_ids.device)
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[index]
            elif isinstance(value, list) and value:
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        sub = Rollout(**picked)
        width = int(sub.lengths.max())
        first = int((sub.query_mask.sum(0) > 0).float().argmax())  # first column any row uses
        for name in (
            "response_ids",
            "response_mask",
            "logprobs",
            "ref_logprobs",
            "values",
            "entropy",
            "scores",
            "rewards",
            "kl",
            "advantages",
            "returns",
        ):
            value = getattr(sub, name)
            if value is not None:
                setattr(sub, name, value[:, :width])
        sub.query_ids, sub.query_mask = sub.query_ids[:, first:], sub.query_mask[:, first:]
        return sub


def encode_prompts(
    tokenizer, conversations: list[list[dict[str, str]]], max_prompt_length: int, device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chat-template the prompts, left-pad, keep the last `max_prompt_length` tokens.
    Returns ids, mask and how many prompts were cut."""
    from pipeline.chat import render_many

    texts = render_many(tokenizer, conversations)
    tokenizer.padding_side = "left"
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cut = sum(len(ids) > max_prompt_length for ids in encoded)
    encoded = [ids[-max_prompt_length:] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    query_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    query_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return query_ids, query_mask, cut


def cut_at_eos(
    generated: torch.Tensor, eos_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, G] sampled tokens -> (response_ids, mask, lengths, finished) with everything after
    the first EOS replaced by pad and masked out; width trimmed to the longest response."""
    N, G = generated.shape
    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= generated == e
    finished = is_eos.any(1)
    first_eos = torch.where(finished, is_eos.float().argmax(1), torch.full((N,), G, device=generated.device))
    lengths = torch.where(finished, first_eos + 1, torch.full_like(first_eos, G))
    positions = torch.arange(G, device=generated.device).unsqueeze(0)
    mask = (positions < lengths.unsqueeze(1)).long()
    response = torch.where(mask.bool(), generated, torch.full_like(generated, pad_id))
    width = max(int(lengths.max()), 1)
    return response[:, :width], mask[:, :width], lengths, finished


def eos_token_ids(model, tokenizer) -> list[int]:
    from pipeline.generation import _eos_ids

    return _eos_ids(model, tokenizer)


@torch.no_grad()
def hf_sample(
    policy,
    tokenizer,
    query_ids,
    query_mask,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: list[int],
    batch_size: int | None = None,
) -> torch.Tensor:
    """Batched HF generation (greedy when temperature is 0); returns [N * num_samples, G] new tokens.
    Samples of one prompt are adjacent (row i * num_samples + j)."""
    from pipeline.generation import SamplingSettings, hf_sampling_kwargs
    from pipeline.kv_cache import cache_kwargs

    # top_k=0 / top_p=1 switch the filters off; None would fall back to generation_config (top_k 50)
    settings = SamplingSettings.model_construct(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = hf_sampling_kwargs(settings, getattr(policy, "generation_config", None))
    chunks = []
    step = batch_size or query_ids.shape[0]
    for start in range(0, query_ids.shape[0], step):
        # one row per sample (what num_return_sequences does; HF refuses it for the greedy call
        # that top-k sampling runs in, pipeline/top_k_sampler.py)
        ids = query_ids[start : start + step].repeat_interleave(num_samples, dim=0)
        mask = query_mask[start : start + step].repeat_interleave(num_samples, dim=0)
        out = policy.generate(
            input_ids=ids,
            attention_mask=mask,
            **sampling,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            **cache_kwargs(policy, max_new_tokens),  # written in place, not concatenated (pipeline/kv_cache.py)
        )
        chunks.append(out[:, ids.shape[1] :])
    width = max(c.shape[1] for c in chunks)
    pad = tokenizer.pad_token_id
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad) for c in chunks])


def build_rollout(
    tokenizer,
    query_ids,
    query_mask,
    generated,
    num_samples: int,
    eos_ids: list[int],
    prompts: list[Any],
    scopes: list[str | None] | None = None,
) -> Rollout:
    """Assemble a Rollout from prompts and their sampled continuations."""
    response_ids, response_mask, lengths, finished = cut_at_eos(generated, eos_ids, tokenizer.pad_token_id)
    text_lengths = lengths - finished.long()
    rollout = Rollout(
        query_ids=query_ids.repeat_interleave(num_samples, dim=0),
        query_mask=query_mask.repeat_interleave(num_samples, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        lengths=lengths,
        text_lengths=text_lengths,
        finished=finished,
        prompt_index=torch.arange(query_ids.shape[0], device=query_ids.device).repeat_interleave(num_samples),
        prompts=[p for p in prompts for _ in range(num_samples)],
        scopes=[s for s in scopes for _ in range(num_samples)] if scopes and any(scopes) else None,
    )
    rollout.texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.response_token_ids()]
    return rollout
