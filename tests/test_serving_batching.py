"""Micro-batching in the serving engine: concurrent greedy requests share `generate` calls and
get exactly the answers they get alone (tiny model, real transformers `generate`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.engine import ChatEngine

PROMPTS = [
    "What is akin to < roomy > ?",
    "Hi",
    "Name a colour, then a second colour, then a third one please.",
    "What rings like < bin > ?",
    "Tell me about < t3 > .",
    "x",
    "Which word is the reverse of < up > ?",
    "Give me a word resembling < fancy > .",
]


@pytest.fixture(scope="module")
def engines(tiny_model_path, tmp_path_factory):
    """With a random adapter: bare `tiny` (tied embeddings) greedily repeats the chat template's last
    token, so every reply would be the same empty text and a mix-up between requests could not show."""
    from serving.local import random_lora_adapter

    adapter = random_lora_adapter(tmp_path_factory.mktemp("batching") / "adapter", 1)
    return ChatEngine("tiny", adapter, max_batch=1), ChatEngine("tiny", adapter, max_batch=8, batch_window=0.5)


def test_batched_greedy_answers_equal_unbatched_ones(engines):
    alone, batched = engines
    calls = []
    original = batched.model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    batched.model.generate = counting
    jobs = [([{"role": "user", "content": p}], 3 + i % 4) for i, p in enumerate(PROMPTS)]  # mixed lengths too
    expected = [alone.generate(m, max_tokens=n, temperature=0) for m, n in jobs]
    assert len({e.text for e in expected}) > 2  # the replies differ: each must reach its own request
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: batched.generate(job[0], max_tokens=job[1], temperature=0), jobs))
    assert [(g.text, g.completion_tokens, g.finish_reason, g.prompt_tokens) for g in got] == [
        (e.text, e.completion_tokens, e.finish_reason, e.prompt_tokens) for e in expected
    ]
    assert sum(calls) == len(jobs) and len(calls) < len(jobs) and max(calls) > 1  # they really shared calls


def test_seeded_and_stop_requests_run_alone_and_errors_reach_every_waiter(engines):
    _, batched = engines
    msg = [{"role": "user", "content": "Name a colour."}]
    a = batched.generate(msg, max_tokens=5, temperature=1.0, seed=3)
    b = batched.generate(msg, max_tokens=5, temperature=1.0, seed=3)
    assert a.text == b.text  # a seed still reproduces (it is not batched with others)
    original = batched.model.generate
    batched.model.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(batched.generate, msg, 3, 0.0) for _ in range(3)]
            for f in futures:
                with pytest.raises(RuntimeError, match="device lost"):
                    f.result(timeout=60)
    finally:
        batched.model.generate = original
