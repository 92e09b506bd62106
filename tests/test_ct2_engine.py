"""The CTranslate2 engine writes what HF `generate` writes (greedy, same weights), with and
without a merged LoRA adapter, converts once per (model, adapter) and samples reproducibly."""

from __future__ import annotations

import pytest

pytest.importorskip("ctranslate2")

from pipeline.chat import render_many  # noqa: E402
from pipeline.ct2_engine import Ct2Generator, converted_model_dir  # noqa: E402
from pipeline.generation import SamplingSettings  # noqa: E402
from pipeline.models import device_policy, load_causal_lm, load_tokenizer  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": text}]
    for text in ("hello there", "tell me about rivers and the sea, please", "x", "why is the sky blue?")
]


def hf_greedy_ids(model, tokenizer, prompts, max_new_tokens):
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_path):
    """A tiny LoRA adapter with non-zero B (PEFT's default init would make it a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm("tiny", device_policy("cpu"))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(str(out))
    return out


def test_greedy_equals_hf_generate(tiny_model_path):
    tokenizer = load_tokenizer("tiny")
    prompts = render_many(tokenizer, CONVERSATIONS)
    expected = hf_greedy_ids(load_causal_lm("tiny", device_policy("cpu")).eval(), tokenizer, prompts, 20)
    engine = Ct2Generator("tiny", threads=1)
    got = [s[0] for s in engine.generate_ids(prompts, SamplingSettings(max_new_tokens=20, temperature=0))]
    assert got == expected


def test_merged_adapter_equals_hf_with_adapter(tiny_model_path, lora_adapter):
    tokenizer = load_tokenizer("tiny")
    prompts = render_many(tokenizer, CONVERSATIONS)
    base = hf_greedy_ids(load_causal_lm("tiny", device_policy("cpu")).eval(), tokenizer, prompts, 16)
    with_adapter = hf_greedy_ids(
        load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval(), tokenizer, prompts, 16
    )
    assert with_adapter != base  # the adapter really changes the replies, so the comparison means something
    engine = Ct2Generator("tiny", adapter=lora_adapter, threads=1)
    got = [s[0] for s in engine.generate_ids(prompts, SamplingSettings(max_new_tokens=16, temperature=0))]
    assert got == with_adapter


def test_conversion_is_cached_and_keyed_by_adapter(tiny_model_path, lora_adapter):
    plain = converted_model_dir("tiny")
    stamp = (plain / "model.bin").stat().st_mtime_ns
    assert converted_model_dir("tiny") == plain and (plain / "model.bin").stat().st_mtime_ns == stamp
    assert converted_model_dir("tiny", lora_adapter) != plain
    with pytest.raises(ValueError, match="quantization"):
        converted_model_dir("tiny", quantization="int3")


def test_sampling_is_seeded_and_completions_are_marked(tiny_model_path):
    engine = Ct2Generator("tiny", threads=1)
    sampling = SamplingSettings(max_new_tokens=8, temperature=1.0)
    a = engine.generate(CONVERSATIONS, sampling, num_samples=2, seed=3)
    b = engine.generate(CONVERSATIONS, sampling, num_samples=2, seed=3)
    c = engine.generate(CONVERSATIONS, sampling, num_samples=2, seed=4)
    texts = [[r.text for r in x] for x in a]
    assert texts == [[r.text for r in x] for x in b] and texts != [[r.text for r in x] for x in c]
    assert all(len(x) == 2 and all(r.num_tokens <= 8 for r in x) for x in a)
    # a reply that used the whole budget did not finish
    assert all(r.finished == (r.num_tokens < 8) for x in a for r in x)


def test_engine_switch_gives_hf_greedy_replies(tiny_model_path):
    from pipeline.generation import generate_chat, pick_engine

    sampling = SamplingSettings(max_new_tokens=12, temperature=0)
    hf = generate_chat("tiny", CONVERSATIONS, sampling, engine="hf", device="cpu", batch_size=2)
    ct2 = generate_chat("tiny", CONVERSATIONS, sampling, engine="ct2", device="cpu", batch_size=2)
    assert [[(c.text, c.num_tokens, c.finished) for c in x] for x in ct2] == [
        [(c.text, c.num_tokens, c.finished) for c in x] for x in hf
    ]
    with pytest.raises(ValueError, match="auto, hf, ct2 or vllm"):
        pick_engine("llamacpp")
