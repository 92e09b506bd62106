"""Sampling from the top k tokens only, inside HF `generate`'s greedy loop.

HF `generate` samples by masking the logits it filters out (temperature, top-k, top-p warpers),
then `softmax` and `multinomial` over the whole vocabulary every step. On a CPU that is not free:
`multinomial` draws an exponential for every vocabulary entry, ~9 ms a step for 8 rows of
SmolLM2's 49k vocabulary, and top-p sorts all 49k scores after top-k has kept 50 of them; at decode
batch 8 the sampling was ~17% of a step (torch.profiler, idle AVX2 EPYC).

`TopKSampler` draws the same distribution from the k kept tokens only: `topk` (already sorted),
temperature, softmax over k, HF's top-p rule on those k, `multinomial` over k. It runs as the last
logits processor of a *greedy* `generate` call and returns scores where only the drawn token is
finite, so HF's `argmax` picks it. Everything else stays HF's loop (processors such as the
repetition penalty run first, as they do before HF's own warpers; caches, stopping, padding).
The draws come from torch's default generator, so `set_seed` repeats them; they are not the draws
HF's own sampler makes for the same seed (another number of random values per step). Tokens tied
with the k-th score are all kept, as HF keeps them (frequent with bf16 logits). The distribution
is HF's (tests/test_top_k_sampler.py compares it with HF's warpers, ties included).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

log = logging.getLogger(__name__)
#: sampling knobs HF's do_sample path reads from a model's generation_config, with their "off" values
_UNAPPLIED = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
_warned: set[tuple[str, Any]] = set()


def warn_unapplied(generation_config: Any) -> None:
    """Log once per knob and value: a model whose generation_config sets a sampling filter that the
    greedy call running TopKSampler does not apply (heedful samples with temperature, top-k, top-p)."""
    for name, off in _UNAPPLIED.items():
        value = getattr(generation_config, name, off)
        if value not in (off, None) and (name, value) not in _warned:
            _warned.add((name, value))
            log.warning("the model's generation_config sets %s=%s; heedful's sampling does not apply it", name, value)


class TopKSampler(LogitsProcessor):
    """Draws each row's next token from softmax(top-k scores / temperature) cut to top-p; returns
    scores that are 0 at the drawn token and -inf elsewhere (for a greedy `generate` to pick)."""

    def __init__(self, temperature: float, top_k: int, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    def probabilities(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities over each row's kept tokens, their vocabulary ids), both [rows, k],
        highest score first; tokens top-p drops have probability 0."""
        vocab = scores.shape[-1]
        k = self.top_k if 0 < self.top_k < vocab else vocab
        top, ids = scores.topk(k, dim=-1)
        if k < vocab:
            # HF keeps every token tied with the k-th score (common with bf16/fp16 logits): widen
            kth = top[..., -1:]
            widest = int((scores >= kth).sum(-1).max())
            if widest > k:
                top, ids = scores.topk(widest, dim=-1)
                top = top.masked_fill(top < kth, float("-inf"))
        probs = torch.softmax(top.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            # HF's TopPLogitsWarper: in ascending order, drop tokens whose cumulative probability is
            # at most 1 - top_p; the most likely token always stays
            ascending_cum = probs.flip(-1).cumsum(-1)
            drop = (ascending_cum <= 1 - self.top_p).flip(-1)
            drop[..., 0] = False
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs, ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        probs, ids = self.probabilities(scores)
        drawn = ids.gather(-1, torch.multinomial(probs, num_samples=1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, drawn, 0.0)


def hf_generate_sampling(temperature: float, top_k: int, top_p: float) -> dict[str, Any]:
    """`generate` keyword arguments: greedy when temperature is 0; otherwise greedy plus a
    TopKSampler as the last logits processor (the same distribution as HF's do_sample with these
    knobs; top_k 0 and top_p 1 switch a filter off, as in HF)."""
    greedy: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature <= 0:
        return greedy
    return {**greedy, "logits_processor": LogitsProcessorList([TopKSampler(temperature, top_k, top_p)])}
