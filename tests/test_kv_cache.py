"""The in-place key/value cache (pipeline/kv_cache.py): generation's logits bit-equal to transformers'
concatenating cache, with a buffer that grows, behind a repeated prefix cache, and after operations
that replace a layer's tensors; and decode steps write into one buffer instead of copying it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from feedback.simulator import prompts
from pipeline.chat import render_many
from pipeline.generation import SamplingSettings, _grow_cache, chat_generate
from pipeline.kv_cache import GrowingLayer, generation_cache, make_growing
from pipeline.models import device_policy, load_causal_lm, load_tokenizer
from pipeline.prefix_logits import cache_keyword, prefixed_batch


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny", device_policy("cpu")).eval(), load_tokenizer("tiny")


def greedy_logits(model, enc: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def ragged_batch(tokenizer) -> dict:
    tokenizer.padding_side = "left"
    texts = ["Why is the sky blue at noon, and why red at dusk?", "Hello", "Name three rivers in Europe."]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


@pytest.mark.parametrize("reserve", [24, 3])  # room for every new token; a buffer that must grow twice
def test_generation_with_the_growing_cache_is_bit_equal(tiny, reserve):
    model, tokenizer = tiny
    enc = ragged_batch(tokenizer)
    expected_ids, expected = greedy_logits(model, {**enc, cache_keyword(model): DynamicCache(config=model.config)}, 24)
    cache = generation_cache(model, reserve)
    assert cache is not None and all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    got_ids, got = greedy_logits(model, {**enc, cache_keyword(model): cache}, 24)
    assert torch.equal(got_ids, expected_ids)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == enc["input_ids"].shape[1] + 24 - 1


def test_a_repeated_prefix_cache_grows_in_place_and_matches(tiny):
    """chat_generate's shared-start path: the prefix cache is repeated across rows (a tensor the
    growing layer did not make), then adopted; the logits are the concatenating cache's."""
    model, tokenizer = tiny
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:4]]
    texts = render_many(tokenizer, [prompts.judge_messages(*item) for item in items])
    token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    plain = prefixed_batch(model, token_lists, tokenizer.pad_token_id or 0)
    grown = prefixed_batch(model, token_lists, tokenizer.pad_token_id or 0)
    assert plain is not None and grown is not None
    keyword = cache_keyword(model)
    make_growing(grown[keyword], 16)
    expected_ids, expected = greedy_logits(model, plain, 16)
    got_ids, got = greedy_logits(model, grown, 16)
    assert torch.equal(got_ids, expected_ids) and torch.equal(got, expected)


def test_decode_steps_write_into_one_buffer():
    layer = GrowingLayer(reserve=4)
    first = torch.randn(2, 3, 5, 8)
    keys, values = layer.update(first, first + 1)
    buffer = layer._key_buffer
    assert buffer.shape[-2] == 9 and torch.equal(keys, first) and torch.equal(values, first + 1)
    steps = [torch.randn(2, 3, 1, 8) for _ in range(4)]
    for step in steps:
        keys, values = layer.update(step, step * 2)
    assert layer._key_buffer is buffer  # no copy while the room lasts
    assert keys.data_ptr() == buffer.data_ptr() and keys.shape[-2] == 9
    torch.testing.assert_close(keys, torch.cat([first, *steps], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([first + 1, *[s * 2 for s in steps]], dim=-2), rtol=0, atol=0)
    keys, _ = layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8))  # full: a buffer twice as long
    assert layer._key_buffer is not buffer and layer._key_buffer.shape[-2] >= 18 and keys.shape[-2] == 10


@pytest.mark.parametrize("operation", ["crop", "select", "repeat"])
def test_operations_that_replace_the_tensors_are_adopted(operation):
    """DynamicLayer's own operations reassign `keys`/`values`; the next update must start from what
    they left, exactly as the concatenating layer does."""
    start, step = torch.randn(2, 1, 6, 4), torch.randn(4, 1, 1, 4)
    growing, plain = GrowingLayer(reserve=8), DynamicLayer()
    for layer in (growing, plain):
        layer.update(start, start)
        if operation == "crop":
            layer.crop(-2)
        elif operation == "select":
            layer.batch_select_indices(torch.tensor([1]))
        else:
            layer.batch_repeat_interleave(2)
        expected = layer.update(step[: layer.keys.shape[0]], step[: layer.keys.shape[0]])
        if layer is growing:
            got = expected
    assert got[0].shape == expected[0].shape
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_chat_generate_hands_generate_a_growing_cache(tiny, monkeypatch):
    model, tokenizer = tiny
    enc = ragged_batch(tokenizer)
    _grow_cache(model, enc, 8)
    assert all(isinstance(layer, GrowingLayer) for layer in enc[cache_keyword(model)].layers)
    monkeypatch.setenv("HEEDFUL_GROWING_KV", "0")  # the switch: generate builds its own cache
    off = ragged_batch(tokenizer)
    _grow_cache(model, off, 8)
    assert cache_keyword(model) not in off
    monkeypatch.delenv("HEEDFUL_GROWING_KV")
    conversations = [[{"role": "user", "content": "Say something about rivers."}], [{"role": "user", "content": "Hi"}]]
    sampling = SamplingSettings(max_new_tokens=12, temperature=0.0)
    on = chat_generate(model, tokenizer, conversations, sampling, batch_size=2)
    monkeypatch.setenv("HEEDFUL_GROWING_KV", "0")
    assert chat_generate(model, tokenizer, conversations, sampling, batch_size=2) == on


def test_no_cache_is_passed_where_generate_would_run_without_one(tiny, monkeypatch):
    """A generation config with `use_cache: false`: generate feeds the whole sequence every step, so a
    cache passed in would be appended to again and again (wrong logits); neither the in-place cache
    nor the shared-start cache is handed over."""
    model, tokenizer = tiny
    monkeypatch.setattr(model.generation_config, "use_cache", False)
    assert generation_cache(model, 8) is None
    enc = ragged_batch(tokenizer)
    _grow_cache(model, enc, 8)
    assert cache_keyword(model) not in enc
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:3]]
    texts = render_many(tokenizer, [prompts.judge_messages(*item) for item in items])
    assert prefixed_batch(model, [tokenizer.encode(t, add_special_tokens=False) for t in texts], 0) is None
