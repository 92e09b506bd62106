"""The real server (uvicorn on 127.0.0.1, tiny model, MiniLM memory) driven by the `openai` client and httpx."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pipeline.records import load_rows
from pipeline.schema import rows_to_records
from serving.app import TokenFileError, load_token
from serving.export import export_memory
from serving.local import ServerThread
from serving.retrieval import RetrievalSettings
from serving.service import ServeSettings

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def live(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    settings = ServeSettings(
        model="tiny",
        memory=str(root / "memory.db"),
        token_file=str(token_file),
        retrieval=RetrievalSettings(threshold=0.9, key_mask="<[^>]*>"),
        max_tokens_default=8,
    )
    with ServerThread(settings) as server:
        server.memory = root / "memory.db"
        yield server


def auth(extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **(extra or {})}


def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=TOKEN, max_retries=0)


def test_auth_is_required_when_a_token_is_set(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 401
    wrong = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert TOKEN not in wrong.text
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/v1/models", headers=auth()).json()["data"][0]["id"] == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_token_file_must_be_private(tmp_path):
    path = tmp_path / "t"
    path.write_text(TOKEN)
    os.chmod(path, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        load_token(path)
    os.chmod(path, 0o600)
    assert load_token(path) == TOKEN
    path.write_text("short")
    with pytest.raises(TokenFileError, match="shorter than 16"):
        load_token(path)


def test_openai_client_chat_stream_feedback_and_memory(live):
    c = client(live)
    first = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is akin to < roomy > ?"}], max_tokens=6, temperature=0
    )
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    assert isinstance(first.choices[0].message.content, str) and first.choices[0].finish_reason in ("stop", "length")
    assert 0 < first.usage.completion_tokens <= 6 and first.usage.prompt_tokens > 5
    assert first.model_extra["memory"] == []

    fb = httpx.post(
        live.url + "/v1/feedback",
        headers=auth(),
        json={"conversation_id": first.id, "clarification": "when I ask 'akin to', I want a synonym."},
    )
    assert fb.status_code == 200 and fb.json()["memory_id"] is not None

    # same phrasing, another word: the clarification is attached and reported
    second = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is akin to < bin > ?"}], max_tokens=6, temperature=0, user="u2"
    )
    used = second.model_extra["memory"]
    assert [m["id"] for m in used] == [fb.json()["memory_id"]] and used[0]["score"] > 0.99
    # ... and can be switched off per request
    off = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is akin to < bin > ?"}],
        max_tokens=6,
        temperature=0,
        extra_body={"memory": False},
    )
    assert off.model_extra["memory"] == []

    stream = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is akin to < cup > ?"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].model_extra["memory"][0]["id"] == fb.json()["memory_id"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert len({ch.id for ch in chunks}) == 1
    # the same request, not streamed, retrieves the same memory (a hit counted below). That a streamed
    # reply equals the non-streamed one is tests/test_serving_engine.py's, with an adapter: bare `tiny`
    # writes the same empty reply to every chat prompt, so comparing them here would compare nothing
    same = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is akin to < cup > ?"}], max_tokens=6, temperature=0
    )
    assert same.model_extra["memory"][0]["id"] == fb.json()["memory_id"]

    listing = httpx.get(live.url + "/v1/memory", headers=auth()).json()
    entry = [e for e in listing["data"] if e["id"] == fb.json()["memory_id"]][0]
    assert entry["key_query"] == "What is akin to < roomy > ?" and entry["hits"] >= 2


def test_bad_payloads_get_4xx_with_a_clear_message(live):
    c = client(live)

    def post(body, ctype="application/json"):
        return httpx.post(
            live.url + "/v1/chat/completions",
            headers=auth({"content-type": ctype}),
            content=body if isinstance(body, (bytes, str)) else json.dumps(body),
        )

    msg = [{"role": "user", "content": "hi"}]
    r = post(b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(b'{"model": "tiny"}', ctype="text/plain")
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
    r = post({"model": "tiny", "messages": msg, "temperature_typo": 1})
    assert r.status_code == 400 and "unrecognized request argument supplied: temperature_typo" in r.json()["error"]["message"]
    r = post({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = post({"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "messages: field required"
    for seed in (-1, 2**32):  # out of the engines' RNG range: refused, not a 500
        r = post({"model": "tiny", "messages": msg, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        c.chat.completions.create(model="tiny", messages=msg, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="less than or equal to 1"):
        c.chat.completions.create(model="tiny", messages=msg, n=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="gpt-4", messages=msg)
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]})
    assert r.status_code == 400 and "limit of 16000" in r.json()["error"]["message"]
    r = post(b"x" * 2_000_000)
    assert r.status_code == 413
    chunks = (b"x" * 100_000 for _ in range(20))  # no Content-Length: counted while it streams in
    r = httpx.post(live.url + "/v1/chat/completions", headers=auth({"content-type": "application/json"}), content=chunks)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    assert httpx.get(live.url + "/v1/nowhere", headers=auth()).json()["error"]["message"] == "Not Found"

    def fb(body):
        return httpx.post(live.url + "/v1/feedback", headers=auth(), json=body)

    r = fb({"conversation_id": "chatcmpl-unknown", "reaction": "love"})
    assert r.status_code == 404 and "no conversation" in r.json()["error"]["message"]
    r = fb({"conversation_id": "chatcmpl-x"})
    assert r.status_code == 400 and "at least one of clarification, reaction, critique" in r.json()["error"]["message"]
    r = fb({"conversation_id": "chatcmpl-x", "reaction": "meh"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reaction"
    r = fb({"conversation_id": "chatcmpl-x", "clarification": "c" * 501})
    assert r.status_code == 400 and "500" in r.json()["error"]["message"]


def test_concurrent_feedback_then_export_for_training(live, tmp_path):
    c = client(live)
    convs = [
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Tell me about < t{i} > ."}],
            max_tokens=4,
            temperature=1.0,
            seed=i,
            user=f"user{i}",
        )
        for i in range(4)
    ]
    before = httpx.get(live.url + "/v1/memory", headers=auth()).json()["total"]
    jobs = []
    for i, conv in enumerate(convs):
        jobs.append({"conversation_id": conv.id, "clarification": f"by < t{i} > I mean the letter t{i}"})
        jobs.append({"conversation_id": conv.id, "reaction": "love" if i % 2 else "dislike"})
        jobs.append({"conversation_id": conv.id, "critique": f"too short {i}", "judgment": "needs_work"})
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda body: httpx.post(live.url + "/v1/feedback", headers=auth(), json=body, timeout=60), jobs * 2)
        )
    assert [r.status_code for r in results] == [200] * len(results)
    memory_ids = [r.json()["memory_id"] for r in results if r.json()["memory_id"] is not None]
    assert len(set(memory_ids)) == 8
    assert httpx.get(live.url + "/v1/memory", headers=auth()).json()["total"] == before + 8

    counts = export_memory(live.memory, tmp_path / "export")
    reactions = rows_to_records("reactions", load_rows(tmp_path / "export" / "reactions"))
    verbal = rows_to_records("verbal_feedback", load_rows(tmp_path / "export" / "verbal_feedback"))
    assert counts["reactions"] == len(reactions) >= 8
    assert all(r.provenance.source == "serving" for r in reactions + verbal)
    ours = {conv.id for conv in convs}
    assert sum(r.provenance.record_id in ours for r in reactions) == 8
    by_conv = {r.provenance.record_id: r for r in reactions}
    assert by_conv[convs[1].id].reaction == "love" and by_conv[convs[1].id].response == convs[1].choices[0].message.content
    assert by_conv[convs[1].id].prompt == [{"role": "user", "content": "Tell me about < t1 > ."}]
    kinds = {json.loads(v.provenance.extra)["feedback"] for v in verbal}
    assert kinds == {"clarification", "critique"}
    memory_rows = load_rows(tmp_path / "export" / "memory.jsonl")
    assert len(memory_rows) == counts["memory"]


def test_memory_export_stage_feeds_dpo_pairs_from_serving(live, tmp_path):
    """love vs. dislike on the same prompt becomes a DPO pair; the stage reruns when the memory changes."""
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    c = client(live)

    def ask(seed):
        return c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=1.0, seed=seed
        )

    good, bad = ask(1), ask(2)
    assert good.choices[0].message.content != bad.choices[0].message.content
    for conv, reaction in ((good, "love"), (bad, "dislike")):
        assert (
            httpx.post(
                live.url + "/v1/feedback", headers=auth(), json={"conversation_id": conv.id, "reaction": reaction}
            ).status_code
            == 200
        )
    data = {
        "run_name": "mem",
        "model": "tiny",
        "stages": [{"name": "fb", "uses": "memory_export", "inputs": {"memory": str(live.memory)}}],
    }

    def run():
        return Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()

    result = run()
    assert result.ok and result.records[0].status == "done", result.records
    held = (tmp_path / "runs" / "mem" / "fb" / "quarantine" / "quarantine.jsonl").read_text().splitlines()
    assert result.records[0].metrics["quarantined"] == len(held)  # what was held back, counted for the report
    assert run().records[0].status == "skipped"
    prefs = load_rows(tmp_path / "runs" / "mem" / "fb" / "preferences", required=["prompt", "chosen", "rejected"])
    pair = [p for p in prefs if p["id"] == f"pref:{good.id}:{bad.id}"]
    assert len(pair) == 1
    assert pair[0]["chosen"] == [{"role": "assistant", "content": good.choices[0].message.content}]
    assert pair[0]["rejected"] == [{"role": "assistant", "content": bad.choices[0].message.content}]
    assert pair[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    # new feedback from serving changes the memory file: the stage is no longer up to date
    assert (
        httpx.post(live.url + "/v1/feedback", headers=auth(), json={"conversation_id": good.id, "critique": "fine"}).status_code
        == 200
    )
    assert run().records[0].status == "done"


@pytest.mark.slow
def test_ray_serve_deployment_speaks_the_same_api(tiny_model_path, tmp_path):
    """`heedful serve --ray-address`: the same app as a Ray Serve deployment on a local Ray (127.0.0.1)."""
    from ray import serve

    from pipeline.cluster import connect, shutdown
    from serving.local import free_port
    from serving.ray_app import application

    port = free_port()
    settings = ServeSettings(
        model="tiny",
        memory=str(tmp_path / "memory.db"),
        max_tokens_default=4,
        retrieval=RetrievalSettings(threshold=0.9, key_mask="<[^>]*>"),
    )
    connect(None, num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings), name="heedful", route_prefix="/")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        first = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What rings like < a > ?"}], max_tokens=4, temperature=0
        )
        fb = httpx.post(
            f"http://127.0.0.1:{port}/v1/feedback",
            timeout=60,
            json={"conversation_id": first.id, "clarification": "I mean a homophone"},
        )
        assert fb.status_code == 200
        second = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What rings like < b > ?"}], max_tokens=4, temperature=0
        )
        assert [m["id"] for m in second.model_extra["memory"]] == [fb.json()["memory_id"]]
    finally:
        serve.shutdown()
        shutdown()


def test_export_turns_a_used_clarification_into_a_distillation_pair(live, tmp_path):
    """A clarified reply (rejected) vs. a later loved reply that used the clarification (chosen), unedited prompt."""
    c = client(live)
    q = [{"role": "user", "content": "What could one mishear as < knight > ?"}]
    a = c.chat.completions.create(model="tiny", messages=q, max_tokens=5, temperature=1.0, seed=1)
    fb = httpx.post(
        live.url + "/v1/feedback",
        headers=auth(),
        json={"conversation_id": a.id, "clarification": "I want a homophone of the word"},
    ).json()
    b = c.chat.completions.create(model="tiny", messages=q, max_tokens=5, temperature=1.0, seed=2)
    assert [m["id"] for m in b.model_extra["memory"]] == [fb["memory_id"]]
    assert b.choices[0].message.content != a.choices[0].message.content  # identical replies make no pair
    httpx.post(live.url + "/v1/feedback", headers=auth(), json={"conversation_id": b.id, "reaction": "love"})
    export_memory(live.memory, tmp_path / "x")
    prefs = {p["id"]: p for p in load_rows(tmp_path / "x" / "preferences")}
    pair = prefs[f"pref:{b.id}:{a.id}"]
    assert pair["prompt"] == q and "memory distillation" in pair["rationale"]
    assert pair["chosen"][0]["content"] == b.choices[0].message.content
    assert pair["rejected"][0]["content"] == a.choices[0].message.content
