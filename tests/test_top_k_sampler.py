"""TopKSampler (pipeline/top_k_sampler.py): HF's sampling distribution drawn from the top k tokens,
inside a greedy `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from pipeline.generation import SamplingSettings, chat_generate, hf_sampling_kwargs
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.top_k_sampler import TopKSampler


def _hf_probs(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What HF's do_sample draws from: its warpers in generate's order, then softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(warpers(None, scores.clone()), dim=-1)


def _full(sampler: TopKSampler, scores: torch.Tensor) -> torch.Tensor:
    probs, ids = sampler.probabilities(scores)
    return torch.zeros_like(scores).scatter_(-1, ids, probs)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 50, 0.95), (0.7, 50, 0.9), (1.3, 0, 0.8), (1.0, 20, 1.0), (0.5, 0, 1.0), (1.0, 1, 0.9)]
)
def test_the_distribution_is_hfs(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    # peaked and flat rows, so top-p keeps a few tokens in some rows and many in others
    scores = torch.randn(6, 3000, generator=gen) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [8.0], [0.1]])
    ours = _full(TopKSampler(temperature, top_k, top_p), scores)
    hf = _hf_probs(scores, temperature, top_k, top_p)
    assert torch.allclose(ours, hf, atol=1e-6), (ours - hf).abs().max()
    assert ((ours > 0) == (hf > 0)).all()  # the same support, not only close values
    # bf16-like logits: many tokens tie with the k-th score, and HF keeps them all. Where top-p then
    # cuts through equal scores, which of them go depends on each sort's order, so compare each
    # row's probabilities as a sorted list (the same distribution up to swapping equal-score tokens)
    tied = torch.randint(-6, 6, (6, 3000), generator=gen).float() / 2
    ours, hf = _full(TopKSampler(temperature, top_k, top_p), tied), _hf_probs(tied, temperature, top_k, top_p)
    assert torch.allclose(ours.sort(-1).values, hf.sort(-1).values, atol=1e-6)
    if top_p == 1.0:
        assert torch.allclose(ours, hf, atol=1e-6)


def test_draws_follow_the_distribution_and_the_seed():
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -9.0]])
    sampler = TopKSampler(temperature=1.0, top_k=5, top_p=0.9)
    expected = _hf_probs(scores, 1.0, 5, 0.9)[0]
    torch.manual_seed(3)
    picks = [int(sampler(None, scores).argmax()) for _ in range(6000)]
    counts = torch.bincount(torch.tensor(picks), minlength=7).float() / len(picks)
    # 6000 draws: a binomial share's standard deviation is at most 0.0065; 0.03 is over 4.5 of them
    assert (counts - expected).abs().max() < 0.03, (counts, expected)
    assert counts[expected == 0].sum() == 0  # never a token top-k or top-p dropped
    out = sampler(None, scores.expand(4, -1).contiguous())
    assert (torch.isfinite(out).sum(-1) == 1).all() and (out.max(-1).values == 0).all()
    torch.manual_seed(11)
    a = [int(sampler(None, scores).argmax()) for _ in range(50)]
    torch.manual_seed(11)
    assert a == [int(sampler(None, scores).argmax()) for _ in range(50)]


def test_generate_samples_through_it(tiny_model_path, lora_adapter):
    """In `generate`: top_k 1 is greedy decoding (the sampler, not HF, picks every token), top_k 50
    samples (seeded), and the greedy settings add no processor. With an adapter, so greedy replies
    differ (bare `tiny` writes one empty reply to every chat prompt)."""
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", adapter=lora_adapter).eval()
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]

    def texts(settings, seed):
        return [r[0].text for r in chat_generate(model, tok, convs, settings, batch_size=4, seed=seed)]

    greedy = texts(SamplingSettings(max_new_tokens=8, temperature=0), 0)
    assert len(set(greedy)) > 1 and all(greedy)
    assert texts(SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=1), 5) == greedy
    sampled = SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=50)
    assert texts(sampled, 5) == texts(sampled, 5) != texts(sampled, 6)
    # several samples per prompt are rows of their own (HF refuses num_return_sequences when greedy)
    two = chat_generate(model, tok, convs, sampled, num_samples=2, batch_size=4, seed=5, share_prefix=False)
    assert [len(r) for r in two] == [2, 2, 2, 2]
    greedy_two = chat_generate(model, tok, convs, SamplingSettings(max_new_tokens=8, temperature=0), num_samples=2, seed=0)
    assert [[c.text for c in r] for r in greedy_two] == [[g, g] for g in greedy]
    assert "logits_processor" not in hf_sampling_kwargs(SamplingSettings(temperature=0))
    assert isinstance(hf_sampling_kwargs(sampled)["logits_processor"][0], TopKSampler)


def test_generation_config_filters_it_does_not_apply_are_named(caplog):
    from transformers import GenerationConfig

    from pipeline.top_k_sampler import warn_unapplied

    def said():
        return sorted(
            r.getMessage().split(" sets ")[1].split(";")[0] for r in caplog.records if r.name == "pipeline.top_k_sampler"
        )

    with caplog.at_level("WARNING", logger="pipeline.top_k_sampler"):
        warn_unapplied(GenerationConfig())  # nothing set: nothing said
        assert said() == []
        warn_unapplied(GenerationConfig(min_p=0.05, typical_p=0.9))
        warn_unapplied(GenerationConfig(min_p=0.05))  # said once per value
    assert said() == ["min_p=0.05", "typical_p=0.9"]
