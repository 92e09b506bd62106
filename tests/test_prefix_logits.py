"""Next-token logits with the prompts' shared start computed once equal a plain forward of each
whole prompt (the judge's P(Yes) rests on them), with and without a LoRA adapter; generation that
continues from the shared start's cache equals left-padded generation of the whole prompts."""

from __future__ import annotations

import pytest
import torch

from feedback.simulator import prompts
from pipeline.chat import render_many
from pipeline.generation import SamplingSettings, chat_generate
from pipeline.llm import HFClient
from pipeline.models import device_policy, load_causal_lm, load_tokenizer
from pipeline.prefix_logits import MIN_SHARED_TOKENS, last_token_logits, prefixed_batch, shared_prefix_length


def plain_last_logits(model, token_lists: list[list[int]]) -> torch.Tensor:
    """Each prompt alone, no padding, no cache: what the shared-prefix path must reproduce."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([t])).logits[:, -1].float() for t in token_lists])


def judge_token_lists(tokenizer) -> list[list[int]]:
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:5]]
    texts = render_many(tokenizer, [prompts.judge_messages(*item) for item in items])
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_shared_prefix_logits_equal_each_prompt_alone(tiny_model_path, lora_adapter, with_adapter):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter if with_adapter else None).eval()
    token_lists = judge_token_lists(tokenizer)
    shared = shared_prefix_length(token_lists)
    assert shared >= MIN_SHARED_TOKENS and len({len(t) for t in token_lists}) > 1  # a real shared start, ragged tails
    expected = plain_last_logits(model, token_lists)
    for batch_size in (1, 2, 5):  # one row, a ragged last batch, all at once
        got = last_token_logits(model, token_lists, batch_size, tokenizer.pad_token_id or 0)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prompts_without_a_shared_start_are_left_padded_alone(tiny_model_path):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in ("Hello there", "Why is the sky blue at noon?")]
    assert shared_prefix_length(token_lists) < MIN_SHARED_TOKENS
    got = last_token_logits(model, token_lists, 2, tokenizer.pad_token_id or 0)
    torch.testing.assert_close(got, plain_last_logits(model, token_lists), atol=1e-4, rtol=1e-4)
    assert last_token_logits(model, [], 2, 0).shape == (0, got.shape[1])  # nothing asked, nothing computed


def test_judge_yes_probability_matches_the_plain_forward(tiny_model_path):
    client = HFClient("tiny", batch_size=3, engine="hf")
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:5]]
    conversations = [prompts.judge_messages(*item) for item in items]
    yes, no = (client.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    logits = plain_last_logits(client.model, judge_token_lists(client.tokenizer))
    expected = logits[:, [yes, no]].softmax(-1)[:, 0].tolist()
    assert client.yes_probability(conversations) == pytest.approx(expected, abs=1e-5)


def test_judge_reply_likelihood_matches_the_plain_forward(tiny_model_path):
    """The judge's other signal, a reply's mean token log-probability after its context, scored
    from the reply's positions only, equals each (context, reply) alone through the full
    log-softmax; replies of different lengths share batches; an empty reply scores -20."""
    client = HFClient("tiny", batch_size=2, engine="hf")
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:4]]
    contexts = [prompts.expectation_context(need, request) for need, request, _ in items]
    replies = [a for *_, a in items[:3]] + [""]
    assert len({len(r) for r in replies}) == 4
    expected = []
    for context, reply in zip(render_many(client.tokenizer, contexts), replies):
        p = client.tokenizer.encode(context, add_special_tokens=False)
        r = client.tokenizer.encode(reply, add_special_tokens=False)
        if not r:
            expected.append(-20.0)
            continue
        with torch.no_grad():
            logp = client.model(input_ids=torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        expected.append(logp[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)].mean().item())
    assert client.reply_logprob(contexts, replies) == pytest.approx(expected, abs=1e-5)


def feedback_prompt_ids(tokenizer, n: int = 4) -> list[list[int]]:
    """A simulated user's feedback prompts: one system turn and few-shot examples, then each reply."""
    items = [(need, request, answer) for need, request, answer, _ in prompts.CALIBRATION[:n]]
    texts = render_many(tokenizer, [prompts.feedback_messages(*item) for item in items])
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_generation_from_the_shared_start_cache_matches_left_padded_generation(tiny_model_path, lora_adapter):
    tokenizer = load_tokenizer("tiny")
    # with the random adapter: bare tiny greedily repeats each prompt's last token, the same for all
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval()
    token_lists = feedback_prompt_ids(tokenizer)
    pad = tokenizer.pad_token_id or 0
    prefixed = prefixed_batch(model, token_lists, pad, repeat=2)
    assert prefixed is not None and prefixed["input_ids"].shape[0] == 8  # two rows per prompt
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(t) for t in token_lists]
    plain = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    plain = {k: v.repeat_interleave(2, dim=0) for k, v in plain.items()}
    greedy = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=pad)
    with torch.no_grad():
        a = model.generate(**plain, **greedy)
        b = model.generate(**prefixed, **greedy)
    new_tokens = a.sequences[:, plain["input_ids"].shape[1] :]
    assert torch.equal(new_tokens, b.sequences[:, prefixed["input_ids"].shape[1] :])
    assert len({tuple(row.tolist()) for row in new_tokens[::2]}) > 1  # the prompts' continuations differ
    assert len({tuple(row.tolist()) for row in new_tokens.T}) > 1  # and are not one token repeated
    for step_a, step_b in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(step_b, step_a, atol=1e-4, rtol=1e-4)


def test_chat_generate_runs_the_shared_start_once(tiny_model_path):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    items = [(need, request, answer) for need, request, answer, _ in prompts.CALIBRATION[:4]]
    conversations = [prompts.feedback_messages(*item) for item in items]
    token_lists = feedback_prompt_ids(tokenizer)
    shared = shared_prefix_length(token_lists)
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    sampled = SamplingSettings(max_new_tokens=5, temperature=1.0)  # tiny's greedy replies are blank
    try:
        shared_run = chat_generate(model, tokenizer, conversations, sampled, batch_size=4, seed=1)
        calls_shared, widths[:] = list(widths), []
        plain_run = chat_generate(model, tokenizer, conversations, sampled, batch_size=4, seed=1, share_prefix=False)
        calls_plain = list(widths)
    finally:
        hook.remove()
    assert [[c.text for c in r] for r in shared_run] == [[c.text for c in r] for r in plain_run]
    assert all(r[0].text for r in plain_run)
    longest = max(len(t) for t in token_lists)
    assert calls_plain[0] == (4, longest)  # every prompt in full
    assert calls_shared[0] == (1, shared)  # the shared start, once
    assert calls_shared[1] == (4, longest - shared)  # then only the rows' own tokens
    assert len(calls_shared) == len(calls_plain) + 1


def test_several_samples_of_each_prompt_come_back_in_order(tiny_model_path):
    """The prefixed batch repeats each prompt's row itself (generate cannot repeat a given cache):
    sampled replies, seeded, equal the plain path's, sample for sample."""
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    system = {"role": "system", "content": "You are a patient guide who answers questions about rivers and lakes."}
    conversations = [[system, {"role": "user", "content": f"Name {n} things you like about rivers."}] for n in (2, 5, 9)]
    sampled = SamplingSettings(max_new_tokens=8, temperature=1.0)
    shared = chat_generate(model, tokenizer, conversations, sampled, num_samples=2, batch_size=3, seed=3)
    plain = chat_generate(model, tokenizer, conversations, sampled, num_samples=2, batch_size=3, seed=3, share_prefix=False)
    assert [[c.text for c in r] for r in shared] == [[c.text for c in r] for r in plain]
    assert len({c.text for r in shared for c in r}) == 6  # six different replies, so a misordering would show


def test_a_sliding_window_model_is_left_padded_as_before(tiny_model_path):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    token_lists = feedback_prompt_ids(tokenizer)
    assert prefixed_batch(model, token_lists, 0) is not None
    model.config.sliding_window = 64  # padding between the start and a row would take window slots
    assert prefixed_batch(model, token_lists, 0) is None
    model.config.sliding_window = None
    model.generation_config.cache_implementation = "static"  # generate refuses a cache beside its own
    assert prefixed_batch(model, token_lists, 0) is None


def test_one_prompt_once_has_nothing_to_share(tiny_model_path):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    one = feedback_prompt_ids(tokenizer, 1)
    assert prefixed_batch(model, one, 0) is None
    assert prefixed_batch(model, one, 0, repeat=3)["input_ids"].shape[0] == 3  # three samples of it share it all
