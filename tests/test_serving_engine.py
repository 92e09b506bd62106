"""`heedful serve` on the stages' engine selection: a real server on `tiny` answers with HF's
greedy replies whichever engine generates (`engine: ct2`, `engine: hf`, and both: `hf+ct2`, lone
requests on CTranslate2 and micro-batches on HF), with an adapter version loaded and after a hot
swap to another; on ct2, stop strings, streams and seeds behave as on HF; `auto` follows the
engine probe's batch and lone-request answers; and the local LLM client (pipeline/llm.py) picks
the same engine and writes the same greedy replies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ctranslate2")

from pipeline.generation import SamplingSettings  # noqa: E402
from serving.local import random_lora_adapter  # noqa: E402

from .serve_fixture import ADMIN, bearer, openai_client, serve, tokens_for  # noqa: E402

TOKENS = tokens_for("alice")
PROMPTS = ("hello there", "why is the sky blue?")
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    broken = root / "broken"
    broken.mkdir()
    a = random_lora_adapter(root / "a", 1)
    (broken / "adapter_config.json").write_bytes((a / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    return {"a": a, "b": random_lora_adapter(root / "b", 2), "broken": broken}


def hf_greedy(adapter: Path | None, prompts=PROMPTS, max_new_tokens: int = MAX_TOKENS) -> list[str]:
    """What HF greedy `generate` writes on base + adapter, each prompt alone (no padding)."""
    from pipeline.chat import render_many
    from pipeline.ct2_engine import hf_greedy_reference
    from pipeline.generation import eos_ids_from_tokenizer
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=adapter).eval()
    eos = eos_ids_from_tokenizer(tokenizer)
    out = []
    for prompt in render_many(tokenizer, [[{"role": "user", "content": p}] for p in prompts]):
        (ids,) = hf_greedy_reference(model, tokenizer, [prompt], max_new_tokens, eos)
        out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def replies(server, stream: bool = False) -> list[str]:
    client = openai_client(server, TOKENS, "alice")
    out = []
    for prompt in PROMPTS:
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0)
        if stream:
            chunks = client.chat.completions.create(**kwargs, stream=True)
            out.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip())
        else:
            out.append(client.chat.completions.create(**kwargs).choices[0].message.content)
    return out


def models(server) -> dict:
    return httpx.get(server.url + "/v1/models", headers=bearer(TOKENS, "alice"), timeout=60).json()


@pytest.mark.parametrize("engine", ["ct2", "hf", "hf+ct2"])
def test_served_greedy_replies_equal_hf_generate_before_and_after_a_swap(engine, adapters, tmp_path):
    expected_a, expected_b = hf_greedy(adapters["a"]), hf_greedy(adapters["b"])
    assert expected_a != expected_b  # the swap is visible in the replies
    assert len(set(expected_a)) > 1  # and each prompt gets its own reply: a mix-up would show
    settings = dict(adapter=str(adapters["a"]), served_name="tiny", engine=engine, memory_enabled=False)
    with serve(tmp_path, TOKENS, **settings) as server:
        assert models(server)["engine"] == engine
        assert replies(server) == expected_a
        assert replies(server, stream=True) == expected_a  # streaming: the same text, piece by piece
        admin = bearer(TOKENS, ADMIN)
        deployed = httpx.post(server.url + "/v1/admin/adapters", json={"path": str(adapters["b"])}, headers=admin, timeout=600)
        assert deployed.status_code == 200, deployed.text
        assert replies(server) == expected_b
        refused = httpx.post(
            server.url + "/v1/admin/adapters", json={"path": str(adapters["broken"])}, headers=admin, timeout=600
        )
        assert refused.status_code == 422 and "could not be loaded" in refused.text
        assert replies(server) == expected_b  # the refused version changed nothing


def stop_inside(text: str) -> tuple[str, int] | None:
    """A 3-character stop string first found at index >= 1 of `text` (periodic replies, common on the
    random `tiny` model, have one inside their first period: '= :' of ':= := :='), with no U+FFFD (the tiny
    model writes partial UTF-8 bytes, whose decoding is not stable inside a reply) and no space at
    either end (`text` is the stripped reply: ' ra' of 'rat rat' is at 0 in the raw ' rat rat'),
    and where it is; None when the reply has none ('¼¼¼¼')."""
    for start in range(1, len(text) - 3):
        stop = text[start : start + 3]
        if "\ufffd" not in stop and stop == stop.strip() and text.find(stop) == start:
            return stop, start
    return None


STOP_PROMPTS = (*PROMPTS, "tell me a story", "what is 2 + 2?", "list three colours", "good morning")


def test_ct2_stop_strings_seeds_and_streams_match_the_hf_engine(adapters):
    from serving.engine import ChatEngine

    hf = ChatEngine("tiny", adapters["a"], max_batch=1, engine="hf")
    ct2 = ChatEngine("tiny", adapters["a"], max_batch=1, engine="ct2")
    assert (hf.engine, ct2.engine) == ("hf", "ct2") and ct2.model is None
    # the first prompt whose reply has a stop string inside; never skipped
    budget, tried = 2 * MAX_TOKENS, []
    for prompt in STOP_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        full = hf.generate(messages, max_tokens=budget)
        found = stop_inside(full.text)
        if found:
            break
        tried.append(full.text)
    assert found, f"no reply with a usable stop string: {tried}"
    stop, cut = found  # inside the reply: both must stop at the token that completes it
    stopped = hf.generate(messages, max_tokens=budget, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut].strip()
    assert ct2.generate(messages, max_tokens=budget, stop=[stop]) == stopped
    n_prompt, deltas, info = ct2.stream(messages, max_tokens=budget, stop=[stop])
    assert ("".join(deltas).strip(), n_prompt, info) == (
        stopped.text,
        full.prompt_tokens,
        {"completion_tokens": stopped.completion_tokens, "finish_reason": "stop"},
    )
    # per-request sampling is honoured: a seed reproduces its reply, and sampling is not greedy
    sampled = [ct2.generate(messages, max_tokens=budget, temperature=1.5, top_p=1.0, seed=s).text for s in (7, 7, 8, 9)]
    assert sampled[0] == sampled[1] and len({full.text, *sampled}) > 2


def test_batched_ct2_requests_each_keep_their_own_budget(adapters):
    from serving.engine import ChatEngine, _Job

    ct2 = ChatEngine("tiny", adapters["a"], max_batch=1, engine="ct2")
    texts = [ct2._render([{"role": "user", "content": p}], MAX_TOKENS)[0] for p in PROMPTS]
    jobs = [_Job(texts[0], 1, 3, 0.0, 1.0), _Job(texts[1], 1, MAX_TOKENS, 0.0, 1.0)]
    short, long = ct2._generate_batch(jobs)
    assert (short.completion_tokens, short.finish_reason, long.completion_tokens) == (3, "length", MAX_TOKENS)
    assert [short.text, long.text] == [hf_greedy(adapters["a"], PROMPTS[:1], 3)[0], hf_greedy(adapters["a"])[1]]


def test_llm_local_client_picks_the_engine_and_writes_hf_greedy_replies(adapters):
    from pipeline.llm import LLMSettings, build_client

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    greedy = SamplingSettings(max_new_tokens=MAX_TOKENS, temperature=0)
    clients = {
        engine: build_client(LLMSettings(model="tiny", adapter=str(adapters["a"]), engine=engine), device="cpu")
        for engine in ("auto", "ct2", "hf")
    }
    from pipeline.engine_probe import faster_cpu_engine

    assert (clients["ct2"].engine, clients["hf"].engine) == ("ct2", "hf")
    assert clients["auto"].engine == faster_cpu_engine("tiny")  # auto on CPU: the faster engine here
    expected = hf_greedy(adapters["a"])
    for client in clients.values():
        assert [c.text for c in client.generate(conversations, greedy)] == expected
    # scores stay HF forward passes (the model loaded on first use): the same on both
    assert clients["auto"].yes_probability(conversations) == pytest.approx(clients["hf"].yes_probability(conversations))
    with pytest.raises(ValueError, match="engine: vllm is for the batch stages"):
        LLMSettings(engine="vllm")


def test_both_engines_send_lone_requests_to_ct2_and_batches_to_hf_with_hf_greedy_replies(adapters):
    """`hf+ct2` (what `auto` serves where CTranslate2 wins only lone requests): a job alone in its
    window runs on CTranslate2, a micro-batch of two on HF; greedy replies are HF's either way. The HF
    side keeps its weights packed for the engine's life (pipeline/cpu_linear.py) until `close`."""
    from pipeline import cpu_linear
    from serving.engine import ChatEngine, _Job

    both = ChatEngine("tiny", adapters["a"], max_batch=2, engine="hf+ct2")
    both._batcher.stop()  # the jobs below are handed to the engine directly, as the batcher hands them
    assert both.engine == "hf+ct2" and both.model is not None and both.ct2 is not None
    calls = {"ct2": 0, "hf": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    both.ct2.generate_ids = counted("ct2", both.ct2.generate_ids)
    both.model.generate = counted("hf", both.model.generate)
    texts = [both._render([{"role": "user", "content": p}], MAX_TOKENS)[0] for p in PROMPTS]
    jobs = [_Job(text, 1, MAX_TOKENS, 0.0, 1.0) for text in texts]
    expected = hf_greedy(adapters["a"])
    assert [g.text for g in both._generate_batch(jobs[:1])] == expected[:1] and calls == {"ct2": 1, "hf": 0}
    assert [g.text for g in both._generate_batch(jobs)] == expected and calls == {"ct2": 1, "hf": 1}
    if cpu_linear.available():  # a PyTorch with oneDNN's packed linear, not turned off
        routed = [m for m in both.model.modules() if m in cpu_linear._ROUTED]
        assert routed and any(m in cpu_linear._PACKED for m in routed)  # the batch of two used packed weights
    both.close()
    assert not any(m in cpu_linear._ROUTED or m in cpu_linear._PACKED for m in both.model.modules())
    # without micro-batches every request runs alone: CTranslate2 only, no HF copy loaded
    alone = ChatEngine("tiny", adapters["a"], max_batch=1, engine="hf+ct2")
    assert (alone.engine, alone.model) == ("ct2", None)
    alone.close()


def test_serving_auto_follows_the_probes_lone_request_answer(tmp_path, monkeypatch):
    from pipeline import engine_probe
    from pipeline.generation import pick_serving_engine
    from pipeline.precision import cpu_precision
    from serving.service import ServeSettings

    cache = tmp_path / "engine_probe.json"
    monkeypatch.setattr(engine_probe, "default_cache_path", lambda: cache)
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    timings = {  # seconds: (batch hf, batch ct2, alone hf, alone ct2)
        "hf-wins": (1.0, 2.0, 1.0, 1.05),
        "ct2-alone": (1.0, 1.6, 2.0, 1.0),  # HF faster on batches, CTranslate2 twice as fast alone
        "ct2-wins": (2.0, 1.0, 2.0, 1.0),
        "old-entry": (1.0, 1.6, 2.0, 1.0),
    }
    measured: list[str] = []
    asked: dict[str, tuple[bool, bool]] = {}  # what each probe timed: (batches, lone requests)

    def measure(model, batch=True, lone=True):
        measured.append(model)
        asked[model] = (batch, lone)
        seconds = dict(zip(("hf", "ct2", "hf_single", "ct2_single"), timings[model]))
        return {k: v for k, v in seconds.items() if (lone if k.endswith("_single") else batch)}

    monkeypatch.setattr(engine_probe, "_measure", measure)
    # an answer cached before lone requests were timed: the stages keep it, a server measures again
    old_key = engine_probe._key("old-entry", cpu_precision())
    cache.write_text(json.dumps({old_key: {"engine": "hf", "ct2_vs_hf": 0.6, "seconds": {"hf": 1.0, "ct2": 1.6}}}))
    assert engine_probe.faster_cpu_engine("old-entry") == "hf" and measured == []
    answers = {model: pick_serving_engine("auto", "cpu", model) for model in timings}
    assert answers == {"hf-wins": "hf", "ct2-alone": "hf+ct2", "ct2-wins": "ct2", "old-entry": "hf+ct2"}
    assert sorted(measured) == sorted(timings)  # each once
    # a server times both where nothing was known, and only lone requests where the stages' answer stands
    assert asked == {"hf-wins": (True, True), "ct2-alone": (True, True), "ct2-wins": (True, True), "old-entry": (False, True)}
    # cached: no second measurement; the stages' batch answer is unchanged by the lone one
    assert pick_serving_engine("auto", "cpu", "ct2-alone") == "hf+ct2" and len(measured) == len(timings)
    assert engine_probe.faster_cpu_engine("ct2-alone") == "hf"
    monkeypatch.setenv(engine_probe.ENV, "hf")
    assert pick_serving_engine("auto", "cpu", "ct2-alone") == "hf"  # the variable answers first
    assert pick_serving_engine("hf+ct2", "cpu", "any") == "hf+ct2"  # insisted
    with pytest.raises(RuntimeError, match="hf\\+ct2 runs on a CPU"):
        pick_serving_engine("hf+ct2", "cuda", "any")
    assert ServeSettings(model="tiny", engine="hf+ct2").engine == "hf+ct2"
    with pytest.raises(ValueError, match="engine: vllm is for the batch stages"):
        ServeSettings(model="tiny", engine="vllm")


def test_a_stream_left_unread_stops_its_generation(adapters):
    """A client that goes away mid-stream frees the model at the next step on HF (as the ct2 path
    stops its token stream), instead of holding it, and every request queued behind it, to the
    end of the budget."""
    import gc

    from serving.engine import ChatEngine

    served = ChatEngine("tiny", adapters["a"], max_batch=1, engine="hf")
    budget, written = 1000, []
    messages = next(  # a prompt whose reply runs to the whole budget, so stopping early is visible
        m
        for m in ([{"role": "user", "content": p}] for p in STOP_PROMPTS)
        if served.generate(m, max_tokens=budget).finish_reason == "length"
    )
    generate = served.model.generate

    def counted(**kwargs):
        out = generate(**kwargs)
        written.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    served.model.generate = counted
    try:
        _, deltas, _ = served.stream(messages, max_tokens=budget)
        assert next(deltas)  # the stream has begun
        deltas.close()
        del deltas
        gc.collect()
        with served._lock:  # the generation has let go of the model
            pass
        for _ in range(100):  # the worker thread records its count just after
            if written:
                break
            time.sleep(0.05)
        assert written and written[0] < budget // 2, written
    finally:
        served.close()


def test_extra_weight_copies_are_taken_only_where_memory_has_room(adapters, tmp_path, monkeypatch):
    """The packed copy (HF) and CTranslate2's copy beside HF (`hf+ct2`) are each kept only while they
    fit in half of the memory available (pipeline/host_memory.py); with too little, the server runs
    as it did without them, with HF's greedy replies."""
    from pipeline import cpu_linear, engine_probe, host_memory
    from pipeline.generation import pick_serving_engine
    from pipeline.models import resolve_model
    from serving.engine import ChatEngine

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert host_memory.available_bytes(meminfo, cgroups=()) == 1000 * 1024
    assert host_memory.available_bytes(tmp_path / "absent", cgroups=()) is None
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1048576\n")
    usage.write_text("1000\n")  # a container allowed 1 MiB, 1000 bytes of it used: its limit counts
    assert host_memory.available_bytes(tmp_path / "absent", cgroups=((limit, usage),)) == 1048576 - 1000
    limit.write_text("max\n")  # no limit: MemAvailable alone
    assert host_memory.available_bytes(meminfo, cgroups=((limit, usage),)) == 1000 * 1024
    from math import prod

    from safetensors import safe_open

    folder, elements = Path(resolve_model("tiny")), 0
    for shard in folder.glob("*.safetensors"):  # the safetensors library's own reading of the shapes
        with safe_open(str(shard), "pt") as f:
            elements += sum(prod(f.get_slice(key).get_shape()) for key in f.keys())
    tiny_fp32 = host_memory.fp32_bytes(folder)
    assert tiny_fp32 == 4 * elements and tiny_fp32 > 1000 * 1024  # tiny's weights do not fit in 1 MB
    assert host_memory.fp32_bytes(tmp_path / "no-such-model") is None

    monkeypatch.setattr(engine_probe, "default_cache_path", lambda: tmp_path / "engine_probe.json")
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    timings = {"hf": 1.0, "ct2": 1.6, "hf_single": 2.0, "ct2_single": 1.0}  # CTranslate2 wins alone only
    monkeypatch.setattr(engine_probe, "_measure", lambda model, **_: timings)
    assert pick_serving_engine("auto", "cpu", "tiny") == "hf+ct2"  # room enough on this machine
    short = host_memory.available_bytes(meminfo)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: short)
    assert pick_serving_engine("auto", "cpu", "tiny") == "hf"  # CTranslate2's copy would not fit
    served = ChatEngine("tiny", adapters["a"], max_batch=1, engine="hf")
    assert not cpu_linear.available() or cpu_linear.routable_bytes(served.model) > 0  # a copy there would be
    assert not any(m in cpu_linear._ROUTED for m in served.model.modules())  # no packed copy either
    assert [served.generate([{"role": "user", "content": p}], max_tokens=MAX_TOKENS).text for p in PROMPTS] == hf_greedy(
        adapters["a"]
    )
    served.close()


@pytest.fixture(scope="module")
def ct2_service(tiny_model_path, tmp_path_factory):
    """A real service on the ct2 engine (memory off), as `heedful serve --engine ct2` runs it."""
    from serving.service import MemPromptService, ServeSettings

    memory = tmp_path_factory.mktemp("ct2-service") / "memory.db"
    service = MemPromptService(ServeSettings(model="tiny", memory=str(memory), engine="ct2", memory_enabled=False))
    yield service
    service.close()


@pytest.fixture
def canary_service(ct2_service, adapters):
    """The service with adapter `a` as a canary for half of the users, and a user in it."""
    canary = ct2_service.versions.deploy(adapters["a"], canary=0.5)
    user = next(u for u in (f"user{i}" for i in range(1000)) if ct2_service.versions.in_canary(u))
    yield ct2_service, canary, user
    if ct2_service.versions.canary is not None:
        ct2_service.versions.rollback()


def stream_request(messages, user: str, max_tokens: int):
    from serving.schemas import ChatRequest

    return ChatRequest(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, stream=True, user=user)


def test_a_stream_dropped_on_a_rolled_back_canary_stops_before_its_engine_closes(canary_service):
    """Rollback retires the canary while a stream still reads from it; the stream's end releases its last
    user, which closes the engine. Closing the events must stop the generation first: the engine's close
    waits for the model's lock, which a generation nobody reads held until it had written all of its
    max_tokens -- in the server, on the event loop's thread."""
    service, canary, user = canary_service
    budget = service.settings.max_tokens_limit
    for prompt in STOP_PROMPTS:  # a prompt whose reply runs to the whole budget: the wait is visible
        messages = [{"role": "user", "content": prompt}]
        started = time.monotonic()
        if canary.engine.generate(messages, max_tokens=budget).finish_reason == "length":
            whole = time.monotonic() - started  # what writing the budget takes here, now
            break
    else:
        pytest.fail("no prompt's reply ran to the whole budget")
    events = service.chat_stream(stream_request(messages, user, budget))
    assert canary.id in next(events)  # the canary writes it
    assert '"content"' in next(events)  # the first text: the generation is under way
    service.versions.rollback()
    assert canary.retired and canary.engine is not None and canary.in_use == 1  # the stream still holds it
    started = time.monotonic()
    events.close()
    closed = time.monotonic() - started
    assert canary.in_use == 0 and canary.engine is None  # released, and the retired engine closed
    assert closed < whole / 4, (closed, whole)


def test_a_stream_dropped_before_its_first_event_releases_its_version(canary_service):
    """A client gone while its stream waited to start: the events are dropped unread, so their own
    `finally` never runs. The version is still released (else a retired one's engine, its weights,
    would never be freed): dropping them drops the `acquire` they hold, whose `finally` releases it."""
    import gc

    service, canary, user = canary_service
    events = service.chat_stream(stream_request([{"role": "user", "content": "hello there"}], user, MAX_TOKENS))
    assert canary.in_use == 1
    service.versions.rollback()
    del events
    gc.collect()
    assert canary.in_use == 0 and canary.engine is None


@pytest.mark.parametrize(("engine", "max_batch"), [("ct2", 1), ("ct2", 2), ("hf", 1), ("hf", 2)])
def test_unseeded_requests_do_not_continue_a_seeded_stream(engine, max_batch):
    """A seed sets the sampling RNG to a state its sender knows: the unseeded requests after it must not
    sample on from there (one user could predict another's reply), nor the first one on a fresh engine
    from a fixed seed (a restarted server would replay them). With the bug, the unseeded reply after
    each seed-7 request is the same continuation of seed 7's stream, and a fresh engine's first unseeded
    reply is seed 0's. Sampled at temperature 2 on bare `tiny` (near-uniform over its vocabulary), two
    16-token replies from independent random states do not coincide."""
    from serving.engine import ChatEngine

    served = ChatEngine("tiny", None, max_batch=max_batch, engine=engine)
    messages = [{"role": "user", "content": "hello there"}]

    def ask(seed):
        return served.generate(messages, max_tokens=16, temperature=2.0, seed=seed).text

    try:
        first, zero = ask(None), ask(0)
        seeded, after, again, after_again = ask(7), ask(None), ask(7), ask(None)
    finally:
        served.close()
    assert seeded == again  # a seed still reproduces its reply
    assert after != after_again  # neither is the continuation of seed 7's stream
    assert first != zero  # a fresh engine's first unseeded reply is not seed 0's
