"""The CTranslate2 engine -- what `engine: auto` picks on a CPU where it is faster -- writes what HF `generate` writes
(greedy, same weights), with and without a merged LoRA adapter, with the shared chat-template
prefix cached and with a budget per request; converts once per (model, adapter) and samples
reproducibly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ctranslate2")

from pipeline.chat import render_many  # noqa: E402
from pipeline.ct2_engine import MIN_CACHED_PREFIX, Ct2Generator, converted_model, hf_greedy_reference  # noqa: E402
from pipeline.generation import SamplingSettings  # noqa: E402
from pipeline.models import device_policy, load_causal_lm, load_tokenizer  # noqa: E402
from pipeline.prefix_logits import shared_prefix_length  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": text}]
    for text in ("hello there", "tell me about rivers and the sea, please", "x", "why is the sky blue?")
]


def hf_greedy_ids(model, tokenizer, prompts, max_new_tokens):
    """HF's greedy replies (the engine's reference), stopped at the tokenizer's own EOS."""
    return hf_greedy_reference(model, tokenizer, prompts, max_new_tokens, [tokenizer.eos_token_id])


def test_greedy_equals_hf_generate(tiny_model_path, lora_adapter):
    """With the adapter: bare `tiny` (tied embeddings) greedily repeats the prompt's last token, the
    same for every chat prompt, so a wrong cached prefix or a mix-up could not show."""
    tokenizer = load_tokenizer("tiny")
    prompts = render_many(tokenizer, CONVERSATIONS)
    # the chat template's system turn is shared: the engine runs it once (static prompt cache)
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert shared_prefix_length(tokens) >= MIN_CACHED_PREFIX
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval()
    expected = hf_greedy_ids(model, tokenizer, prompts, 20)
    assert len({tuple(e) for e in expected}) > 1
    greedy = SamplingSettings(max_new_tokens=20, temperature=0)
    cached = Ct2Generator("tiny", adapter=lora_adapter, threads=1)
    assert [s[0] for s in cached.generate_ids(prompts, greedy)] == expected
    assert [s[0] for s in cached.generate_ids(prompts, greedy)] == expected  # the cached prefix reused
    uncached = Ct2Generator("tiny", adapter=lora_adapter, threads=1, prefix_cache=False)
    assert [s[0] for s in uncached.generate_ids(prompts, greedy)] == expected


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix_length([["a", "b", "c"], ["a", "b", "d", "e"]]) == 2
    assert shared_prefix_length([["a", "b"], ["a", "b", "c"]]) == 1  # "b" stays for the first prompt
    assert shared_prefix_length([["x"], ["y"]]) == 0 and shared_prefix_length([]) == 0


def test_a_budget_per_request_in_one_call_equals_each_alone(tiny_model_path, lora_adapter):
    """Requests of different lengths share a call and leave it at their own budget: each reply is
    HF's greedy reply under that request's max_new_tokens (the adapter makes replies vary)."""
    tokenizer = load_tokenizer("tiny")
    prompts = render_many(tokenizer, CONVERSATIONS)
    budgets = [3, 12, 1, 7]
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval()
    expected = [hf_greedy_ids(model, tokenizer, [p], b)[0] for p, b in zip(prompts, budgets)]
    assert len({len(e) for e in expected}) > 1 and len({tuple(e[:1]) for e in expected}) > 1  # lengths and tokens differ
    engine = Ct2Generator("tiny", adapter=lora_adapter, threads=1)
    greedy = SamplingSettings(max_new_tokens=max(budgets), temperature=0)
    for width in (4, 2):  # one batch; and sorted by length into chunks of 2
        got = [s[0] for s in engine.generate_ids(prompts, greedy, max_new_tokens=budgets, max_batch_size=width)]
        assert got == expected
    with pytest.raises(ValueError, match="one budget"):
        engine.generate_ids(prompts, greedy, max_new_tokens=[4, 4])


def test_merged_adapter_equals_hf_with_adapter(tiny_model_path, lora_adapter):
    tokenizer = load_tokenizer("tiny")
    prompts = render_many(tokenizer, CONVERSATIONS)
    base = hf_greedy_ids(load_causal_lm("tiny", device_policy("cpu")).eval(), tokenizer, prompts, 16)
    with_adapter = hf_greedy_ids(
        load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval(), tokenizer, prompts, 16
    )
    assert with_adapter != base  # the adapter really changes the replies, so the comparison means something
    assert len({tuple(r) for r in with_adapter}) > 1 and all(len(set(r)) > 1 for r in with_adapter)  # not one token repeated
    engine = Ct2Generator("tiny", adapter=lora_adapter, threads=1)
    got = [s[0] for s in engine.generate_ids(prompts, SamplingSettings(max_new_tokens=16, temperature=0))]
    assert got == with_adapter


def test_conversion_is_cached_and_keyed_by_adapter(tiny_model_path, lora_adapter):
    plain = converted_model("tiny").folder
    stamp = (plain / "model.bin").stat().st_mtime_ns
    assert converted_model("tiny").folder == plain and (plain / "model.bin").stat().st_mtime_ns == stamp
    assert converted_model("tiny", lora_adapter).folder != plain
    with pytest.raises(ValueError, match="quantization"):
        converted_model("tiny", quantization="int3")


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


def test_auto_engine_on_cpu_follows_the_probe_and_gives_hf_greedy_replies(tiny_model_path, lora_adapter):
    from pipeline.engine_probe import faster_cpu_engine
    from pipeline.generation import generate_chat, pick_engine

    assert pick_engine("auto", device="cpu", model_name="tiny") == faster_cpu_engine("tiny")
    assert pick_engine("ct2", device="cpu") == "ct2" and pick_engine("hf", device="cpu") == "hf"
    sampling = SamplingSettings(max_new_tokens=12, temperature=0)
    hf = generate_chat("tiny", CONVERSATIONS, sampling, adapter=lora_adapter, engine="hf", device="cpu", batch_size=2)
    auto = generate_chat("tiny", CONVERSATIONS, sampling, adapter=lora_adapter, engine="auto", device="cpu", batch_size=2)
    assert [[(c.text, c.num_tokens, c.finished) for c in x] for x in auto] == [
        [(c.text, c.num_tokens, c.finished) for c in x] for x in hf
    ]
    assert all(c[0].num_tokens > 0 for c in hf)  # real replies, so equality means something
    with pytest.raises(ValueError, match="auto, hf, ct2 or vllm"):
        pick_engine("llamacpp")


def test_a_seed_reaches_the_first_call_of_its_generator_with_no_other_engine_between(tiny_model_path, lora_adapter, monkeypatch):
    """CTranslate2's seed is process-wide and a new generator's worker reads it at its first decoding
    step: an engine seeding a request while another engine (a server's canary) is between its own
    seed and its first call waits until that call is done, so each samples from its own seed; a
    generator that has called before runs without waiting."""
    import threading

    import ctranslate2

    events: list[tuple[str, str]] = []
    inside, release = threading.Event(), threading.Event()
    real_generator, real_seed = ctranslate2.Generator, ctranslate2.set_random_seed

    class Watched:  # the real generator, its calls recorded; the active engine's first call held open
        def __init__(self, *args, **kwargs):
            self.inner = real_generator(*args, **kwargs)

        def generate_batch(self, *args, **kwargs):
            name = threading.current_thread().name
            if name == "active" and not inside.is_set():
                inside.set()
                release.wait(10)
            results = self.inner.generate_batch(*args, **kwargs)
            events.append(("called", name))
            return results

        def __getattr__(self, attribute):
            return getattr(self.inner, attribute)

    def seed(value):
        events.append(("seed", threading.current_thread().name))
        real_seed(value)

    monkeypatch.setattr(ctranslate2, "Generator", Watched)
    monkeypatch.setattr(ctranslate2, "set_random_seed", seed)
    sampled = SamplingSettings(max_new_tokens=12, temperature=1.0)
    prompt = render_many(load_tokenizer("tiny"), [[{"role": "user", "content": "Name a colour."}]])
    active = Ct2Generator("tiny", adapter=lora_adapter, threads=1, prefix_cache=False)
    canary = Ct2Generator("tiny", adapter=lora_adapter, threads=1, prefix_cache=False)
    alone = active.generate_ids(prompt, sampled, seed=5)  # seed 5's reply, nobody else seeding
    events.clear()
    replies: dict[str, list] = {}
    first = threading.Thread(target=lambda: replies.update(active=active.generate_ids(prompt, sampled, seed=5)), name="active")
    second = threading.Thread(target=lambda: replies.update(canary=canary.generate_ids(prompt, sampled, seed=7)), name="canary")
    first.start()
    assert inside.wait(10)
    second.start()
    second.join(0.5)  # free to run: without the lock it seeds now, before the active engine's first call
    release.set()
    first.join(10), second.join(10)
    assert events == [("seed", "active"), ("called", "active"), ("seed", "canary"), ("called", "canary")]
    assert replies["active"] == alone  # seed 5's reply, though the canary seeded 7 meanwhile
    assert replies["canary"] != alone  # (seeds give other replies: the check above can fail)
    events.clear()
    greedy = SamplingSettings(max_new_tokens=4, temperature=0)
    active.generate_ids(prompt, greedy), canary.generate_ids(prompt, greedy)
    assert events == [("called", "MainThread"), ("called", "MainThread")]  # called before: no new seed, no wait


def test_engine_probe_measures_once_keeps_ct2_only_past_the_margin_and_obeys_the_variable(tmp_path, monkeypatch):
    from pipeline import engine_probe

    timings = iter([{"hf": 1.0, "ct2": 0.95}, {"hf": 1.0, "ct2": 0.5}])
    monkeypatch.setattr(engine_probe, "_measure", lambda model, **_: next(timings))
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    cache = tmp_path / "engine_probe.json"
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"  # 1.05x: under the 1.1x margin
    assert engine_probe.faster_cpu_engine("model-b", cache_path=cache) == "ct2"  # 2x
    # remembered per host and model: no third measurement (the iterator is spent)
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "hf"
    assert engine_probe.faster_cpu_engine("model-b", cache_path=cache) == "ct2"
    recorded = json.loads(cache.read_text())
    assert sorted(v["ct2_vs_hf"] for v in recorded.values()) == [1.053, 2.0]
    monkeypatch.setenv(engine_probe.ENV, "hf")
    assert engine_probe.faster_cpu_engine("model-b", cache_path=cache) == "hf"  # the variable answers first
    monkeypatch.setenv(engine_probe.ENV, "fast")
    with pytest.raises(ValueError, match="HEEDFUL_CPU_ENGINE='fast'"):
        engine_probe.faster_cpu_engine("model-b", cache_path=cache)


def test_a_job_too_small_to_repay_the_probe_takes_the_known_answer_or_hf(tmp_path, monkeypatch):
    from pipeline import engine_probe
    from pipeline.generation import pick_engine, pick_local_engine

    measured: list[str] = []
    monkeypatch.setattr(engine_probe, "_measure", lambda model, **_: measured.append(model) or {"hf": 1.0, "ct2": 0.5})
    monkeypatch.setattr(engine_probe, "default_cache_path", lambda: tmp_path / "engine_probe.json")
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    small, large = engine_probe.PROBE_PAYS_FROM - 1, engine_probe.PROBE_PAYS_FROM
    assert pick_engine("auto", "cpu", "model-c", new_tokens=small) == "hf"  # nothing known: HF, no probe
    assert measured == [] and not (tmp_path / "engine_probe.json").exists()
    assert pick_engine("auto", "cpu", "model-c", new_tokens=large) == "ct2"  # worth measuring: 2x
    assert pick_engine("auto", "cpu", "model-c", new_tokens=small) == "ct2"  # now known
    assert pick_engine("auto", "cpu", "model-c") == "ct2" and measured == ["model-c"]
    # a model held in-process (the simulated users' clients) weighs its job the same way
    assert pick_local_engine("auto", "cpu", "model-d", new_tokens=small) == "hf" and measured == ["model-c"]
    assert pick_local_engine("auto", "cpu", "model-d", new_tokens=large) == "ct2" and measured == ["model-c", "model-d"]


def test_a_stages_probe_times_batches_only_and_a_server_then_lone_requests_only(tmp_path, monkeypatch):
    """Lone requests are `heedful serve`'s workload: a stage's probe does not time them (8 of the
    probe's 23 s on SmolLM2, AMX Xeon), and a server that asks later times only them, keeping the
    batch answer the stages used."""
    from pipeline import engine_probe

    calls: list[tuple[bool, bool]] = []

    def measure(model, batch=True, lone=True):
        calls.append((batch, lone))
        return {**({"hf": 1.0, "ct2": 0.5} if batch else {}), **({"hf_single": 1.0, "ct2_single": 2.0} if lone else {})}

    monkeypatch.setattr(engine_probe, "_measure", measure)
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    cache = tmp_path / "engine_probe.json"
    assert engine_probe.faster_cpu_engine("model-a", cache_path=cache) == "ct2" and calls == [(True, False)]
    (entry,) = json.loads(cache.read_text()).values()
    assert "single" not in entry and entry["seconds"] == {"hf": 1.0, "ct2": 0.5}
    assert engine_probe.serving_cpu_engine("model-a", cache_path=cache) == "ct2"
    assert calls == [(True, False), (False, True)]
    (entry,) = json.loads(cache.read_text()).values()
    assert (entry["engine"], entry["ct2_vs_hf"], entry["single"]) == ("ct2", 2.0, "hf")
    assert entry["seconds"] == {"hf": 1.0, "ct2": 0.5, "hf_single": 1.0, "ct2_single": 2.0}
    assert engine_probe.serving_cpu_engine("model-a", cache_path=cache) == "ct2" and len(calls) == 2  # known now


def test_engine_probe_on_tiny_times_both_engines(tiny_model_path):
    from pipeline import engine_probe

    seconds = engine_probe._measure("tiny")
    load = seconds.pop("load")  # the machine's load while the batches were timed (pipeline/host_load.py)
    assert load is not None and 0 <= load.others <= 1 and 0 <= load.steal <= 1
    assert set(seconds) == {"hf", "ct2", "hf_single", "ct2_single"} and all(0 < s < 60 for s in seconds.values())
    assert set(engine_probe._measure("tiny", lone=False)) == {"hf", "ct2", "load"}
    assert set(engine_probe._measure("tiny", batch=False)) == {"hf_single", "ct2_single", "load"}


def test_conversion_freezes_live_objects_only_when_nobody_else_did():
    """The converter's per-layer gc.collect() skips the objects alive before it; a process that froze its
    own (Ray Serve replicas do) keeps them frozen afterwards."""
    import gc

    from pipeline.ct2_engine import _collections_skip_what_exists

    assert gc.get_freeze_count() == 0
    with _collections_skip_what_exists():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        fresh = [[] for _ in range(1000)]  # alive, not frozen: a second freeze would take them in
        with _collections_skip_what_exists():
            pass
        # still frozen, nothing added; frozen objects another thread frees meanwhile (CI saw 2) leave the count
        assert 0 < gc.get_freeze_count() <= frozen, (gc.get_freeze_count(), frozen, len(fresh))
    finally:
        gc.unfreeze()


def test_a_start_shared_across_calls_is_cached_in_blocks_and_changes_no_reply(tiny_model_path, lora_adapter, monkeypatch):
    """A server's requests come one per call: the start a request shares with the previous one
    (here a long system prompt) runs once, in whole blocks, and replies equal the uncached
    engine's; the number of cached starts is bounded (the generator reloads). With the adapter, so
    the replies differ (bare `tiny` writes one reply to every chat prompt)."""
    from pipeline import ct2_engine

    tokenizer = load_tokenizer("tiny")
    system = "You answer briefly. " * 40
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in ("Name a colour.", "Count to three.", "Say hi.", "Name a fruit.")
    ]
    prompts = render_many(tokenizer, conversations)
    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    plain = Ct2Generator("tiny", adapter=lora_adapter, threads=1, prefix_cache=False)
    expected = [plain.generate_ids([p], greedy)[0][0] for p in prompts]
    assert len({tuple(e) for e in expected}) > 1
    engine = Ct2Generator("tiny", adapter=lora_adapter, threads=1, prefix_cache="across_calls")
    prefixes = []
    real = engine._static_prefix
    monkeypatch.setattr(engine, "_static_prefix", lambda tokens: prefixes.append(real(tokens)) or prefixes[-1])
    assert [engine.generate_ids([p], greedy)[0][0] for p in prompts] == expected
    assert prefixes[0] == 0 and all(n > 0 and n % ct2_engine.PREFIX_BLOCK == 0 for n in prefixes[1:])
    assert len(set(prefixes[1:])) == 1 and len(engine._cached_prefixes) == 1  # one cached start for all
    monkeypatch.setattr(ct2_engine, "MAX_CACHED_PREFIXES", 1)
    other = render_many(tokenizer, [[{"role": "system", "content": "Be kind. " * 60}, {"role": "user", "content": "Hi."}]] * 2)
    first = engine.generator
    assert engine.generate_ids(other[:1], greedy)[0][0] == plain.generate_ids(other[:1], greedy)[0][0]
    assert engine.generate_ids(other[1:], greedy)[0][0] == plain.generate_ids(other[1:], greedy)[0][0]
    assert engine.generator is not first and len(engine._cached_prefixes) == 1  # reloaded: a full cache is emptied
    assert engine._static_prefix([]) == 0
    monkeypatch.setattr(ct2_engine, "MAX_CACHED_TOKENS", ct2_engine.PREFIX_BLOCK - 1)  # a start longer than the cap: uncached
    assert engine.generate_ids(other[1:], greedy)[0][0] == plain.generate_ids(other[1:], greedy)[0][0]
    assert prefixes[-1] == 0
