"""Server side of the closed loop (issue 14) against a real server: completion and conversation ids,
follow-ups, feedback tied to completions, adapter versions hot-swapped under load, rollback, the
admin guard, `--no-log`, the feedback export, and `heedful deploy` as a subprocess.

A real uvicorn server on 127.0.0.1 with the `tiny` model and MiniLM memory; users file with
alice (user) and root (admin). The adapters are real PEFT LoRA folders on the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from serving.local import ServerThread, random_lora_adapter
from serving.service import ServeSettings
from serving.store import MemoryStore

from .serve_fixture import active_version, bearer, heedful, module_server, openai_client, tokens_for

TOKENS = tokens_for("alice", "bob")


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    a, b = random_lora_adapter(root / "a", 1), random_lora_adapter(root / "b", 2)
    broken = root / "broken"
    shutil.copytree(a, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    not_json = root / "not_json"
    not_json.mkdir()
    (not_json / "adapter_config.json").write_text("{oops")
    bad_coh = root / "bad_coh"
    shutil.copytree(a, bad_coh)
    (bad_coh / "coh.json").write_text('{"phrase": 3}')  # a Chain-of-Hindsight file serving cannot read
    return {"a": a, "b": b, "broken": broken, "not_json": not_json, "bad_coh": bad_coh, "empty": root}


live = module_server("deploy", TOKENS, max_tokens_default=6)


def as_(name: str) -> dict:
    return bearer(TOKENS, name)


def ask(live, name: str, content: str, seed: int | None = None, **extra_body) -> openai.types.chat.ChatCompletion:
    """Greedy; with `seed`, sampled (bare `tiny`'s greedy reply is the same empty text for every prompt,
    so a test that must tell two replies apart samples them)."""
    c = openai_client(live, TOKENS, name)
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    return c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6, extra_body=extra_body or None, **sampling
    )


def store(live) -> MemoryStore:
    return MemoryStore(live.memory)


def active(live) -> str:
    return active_version(live, TOKENS, "alice")


def test_completion_and_conversation_ids_version_and_followups(live):
    first = ask(live, "alice", "Name a fruit.", seed=1)
    extra = first.model_extra
    assert first.id.startswith("chatcmpl-") and extra["conversation_id"].startswith("conv-")
    assert extra["adapter_version"] == active(live)
    second = ask(live, "alice", "A red one, please.", seed=2, conversation_id=extra["conversation_id"], user="alice")
    assert first.choices[0].message.content != second.choices[0].message.content  # the follow-up must name the right one
    assert second.model_extra["conversation_id"] == extra["conversation_id"] and second.id != first.id
    s = store(live)
    stored = s.conversation(first.id)
    assert stored.conversation == extra["conversation_id"] and stored.adapter_version == extra["adapter_version"]
    followups = [r for r in s.feedback("followup") if r["id"].startswith(first.id)]
    assert len(followups) == 1
    assert followups[0]["followup"] == "A red one, please."
    assert followups[0]["response"] == stored.response == first.choices[0].message.content
    prov = json.loads(followups[0]["provenance"]["extra"])
    # the client's `user` label is kept only as a salted hash (stable within this memory file)
    label = s.conversation(second.id).client_user
    assert label.startswith("salted-sha256:") and "alice" not in label and label == s.hash_label("alice")
    assert prov["completion_id"] == first.id and prov["next_completion_id"] == second.id
    assert followups[0]["provenance"]["annotator"] == "alice" and prov["author_verified"] is True
    # a stream says the same in its first chunk
    c = openai_client(live, TOKENS, "alice")
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "more"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"conversation_id": extra["conversation_id"]},
        )
    )
    assert chunks[0].model_extra["conversation_id"] == extra["conversation_id"]
    assert chunks[0].model_extra["adapter_version"] == extra["adapter_version"]
    assert store(live).conversation(chunks[0].id).conversation == extra["conversation_id"]
    assert len([r for r in store(live).feedback("followup") if r["id"].startswith(second.id)]) == 1
    # another user cannot continue (or learn of) alice's conversation
    with pytest.raises(openai.NotFoundError, match="no conversation"):
        ask(live, "bob", "hijack", conversation_id=extra["conversation_id"])


def test_feedback_is_tied_to_a_completion_and_bad_feedback_is_not_stored(live):
    reply = ask(live, "alice", "Say hello.", seed=3)
    assert reply.choices[0].message.content  # sampled: not the empty greedy reply every prompt gets
    r = httpx.post(
        live.url + "/v1/feedback",
        headers=as_("alice"),
        json={
            "completion_id": reply.id,
            "reaction": "dislike",
            "critique": "too curt",
            "edit": "Hello! How can I help you today?",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["completion_id"] == reply.id and body["adapter_version"] == reply.model_extra["adapter_version"]
    rows = {row["kind"]: row for row in store(live).feedback() if row["id"].startswith(reply.id)}
    assert set(rows) == {"reaction", "verbal", "preference"}
    assert rows["preference"]["chosen"] == "Hello! How can I help you today?"
    assert rows["preference"]["rejected"] == store(live).conversation(reply.id).response == reply.choices[0].message.content
    assert json.loads(rows["reaction"]["provenance"]["extra"])["adapter_version"] == body["adapter_version"]

    before = len(store(live).feedback())
    unknown = httpx.post(
        live.url + "/v1/feedback", headers=as_("alice"), json={"completion_id": "chatcmpl-nope", "reaction": "love"}
    )
    assert unknown.status_code == 404 and "chatcmpl-nope" in unknown.json()["error"]["message"]
    other = httpx.post(live.url + "/v1/feedback", headers=as_("bob"), json={"completion_id": reply.id, "reaction": "love"})
    assert other.status_code == 404  # bob's view: alice's completion does not exist
    wrong = httpx.post(live.url + "/v1/feedback", headers=as_("alice"), json={"completion_id": reply.id, "reaction": 5})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "reaction"
    huge = httpx.post(
        live.url + "/v1/feedback", headers=as_("alice"), json={"completion_id": reply.id, "critique": "x" * 2_000_000}
    )
    assert huge.status_code == 413
    assert len(store(live).feedback()) == before


def malformed_feedback(completion_id: str) -> list[tuple[bytes | dict | list, int, str]]:
    """(body, status, words the error message must hold): each on an existing completion of the caller's."""
    return [
        ({"completion_id": 12345, "reaction": "love"}, 400, "completion_id: Input should be a valid string"),
        ({"completion_id": "c" * 200, "reaction": "love"}, 400, "completion_id: String should have at most 128"),
        ({"completion_id": completion_id, "reaction": ["love"]}, 400, "reaction: Input should be"),
        ({"completion_id": completion_id, "critique": {"text": "bad"}}, 400, "critique: Input should be a valid string"),
        ({"completion_id": completion_id, "reaction": "love", "judgment": "awful"}, 400, "judgment: Input should be"),
        ({"completion_id": completion_id, "reactoin": "love"}, 400, "unrecognized request argument supplied: reactoin"),
        ({"completion_id": completion_id, "edit": "   "}, 400, "edit is blank"),
        ({"completion_id": completion_id, "conversation_id": "chatcmpl-other", "reaction": "love"}, 400, "differ"),
        ({"completion_id": completion_id}, 400, "at least one of clarification, reaction, critique, edit"),
        ({"reaction": "love"}, 400, "give completion_id"),
        ([{"completion_id": completion_id, "reaction": "love"}], 400, "must be a JSON object"),
        (b'{"completion_id": "' + completion_id.encode() + b'", "reaction": ', 400, "not valid JSON"),
        ({"completion_id": completion_id, "reaction": "love", "edit": "e" * 20_000}, 400, "edit: String should have at most"),
        ({"completion_id": "chatcmpl-" + "0" * 24, "reaction": "love"}, 404, "no conversation 'chatcmpl-000"),
    ]


def test_malformed_feedback_is_refused_with_a_clear_message_and_never_stored(live):
    """Every way feedback can be wrong: a 4xx in OpenAI's shape naming the field, and nothing stored
    (no feedback row, no memory entry), even when a valid part (a reaction) came in the same body."""
    reply = ask(live, "alice", "Malformed feedback target.")
    s = store(live)
    before = (len(s.feedback()), s.count())
    for body, status, words in malformed_feedback(reply.id):
        if isinstance(body, bytes):
            r = httpx.post(live.url + "/v1/feedback", headers={**as_("alice"), "content-type": "application/json"}, content=body)
        else:
            r = httpx.post(live.url + "/v1/feedback", headers=as_("alice"), json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    streamed = (b"x" * 100_000 for _ in range(20))  # no Content-Length: counted while it streams in
    r = httpx.post(live.url + "/v1/feedback", headers={**as_("alice"), "content-type": "application/json"}, content=streamed)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    assert (len(s.feedback()), s.count()) == before
    # the same completion still takes well-formed feedback: the refusals were about the bodies
    ok = httpx.post(live.url + "/v1/feedback", headers=as_("alice"), json={"completion_id": reply.id, "reaction": "love"})
    assert ok.status_code == 200 and len(s.feedback()) == before[0] + 1


def test_admin_endpoints_refuse_non_admins(live, adapters):
    posts = [
        ("/v1/admin/adapters", {"path": str(adapters["a"])}),
        ("/v1/admin/adapters", {"adapter": str(adapters["a"]), "canary": 0.5}),
        ("/v1/admin/adapters/promote", {}),
        ("/v1/admin/adapters/rollback", {}),
    ]
    for path, body in posts:
        r = httpx.post(live.url + path, headers=as_("alice"), json=body)
        assert r.status_code == 403 and "only an admin" in r.json()["error"]["message"]
    for path in ("/v1/feedback/export", "/v1/admin/versions/stats", "/v1/admin/completions/chatcmpl-x"):
        r = httpx.get(live.url + path, headers=as_("alice"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", path
    assert httpx.post(live.url + "/v1/admin/adapters", json={"path": str(adapters["a"])}).status_code == 401


def test_broken_adapter_folders_are_refused_and_the_old_version_stays(live, adapters):
    before = active(live)
    cases = [
        (adapters["broken"], "could not be loaded"),
        (adapters["not_json"], "not valid JSON"),
        (adapters["bad_coh"], "coh.json: field 'phrase' must be a string"),
        (adapters["empty"], "no adapter_config.json"),
        (adapters["empty"] / "missing", "does not exist"),
        (Path("relative/adapter"), "must be absolute"),
    ]
    for folder, message in cases:
        r = httpx.post(live.url + "/v1/admin/adapters", headers=as_("root"), json={"path": str(folder)}, timeout=300)
        assert r.status_code == 422 and message in r.json()["error"]["message"], (folder, r.text)
        assert active(live) == before
    assert ask(live, "alice", "still there?").model_extra["adapter_version"] == before


def test_hot_swap_under_concurrent_requests_then_rollback(live, adapters):
    old = active(live)
    base_reply = ask(live, "alice", "Tell me a story.").choices[0].message.content
    results, errors = [], []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        while not stop.is_set():
            try:
                r = ask(live, "alice", f"Question {i}: tell me a story.")
                results.append((r.id, (r.model_extra or {})["adapter_version"]))
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, i) for i in range(4)]
        r = httpx.post(live.url + "/v1/admin/adapters", headers=as_("root"), json={"path": str(adapters["a"])}, timeout=300)
        # keep asking until some replies come from the new version
        deadline = 200
        while deadline and not any(v == r.json()["active"]["id"] for _, v in results):
            threading.Event().wait(0.1)
            deadline -= 1
        stop.set()
        for f in futures:
            f.result()
    assert r.status_code == 200, r.text
    new = r.json()["active"]["id"]
    assert r.json()["previous"] == old and new.startswith("adp-") and new != old
    assert not errors, errors
    versions = {v for _, v in results}
    assert versions == {old, new}  # replies from both sides of the swap, none failed
    s = store(live)
    assert all(s.conversation(cid).adapter_version == v for cid, v in results)
    assert {s.conversation(cid).adapter for cid, v in results if v == new} == {str(adapters["a"].resolve())}

    listed = httpx.get(live.url + "/v1/models", headers=as_("alice")).json()["data"][0]["versions"]
    assert [(v["id"], v["active"]) for v in listed][:2] == [(new, True), (old, False)]
    assert listed[0]["adapter"] == str(adapters["a"].resolve()) and listed[0]["loaded_at"] > 0
    assert ask(live, "alice", "Tell me a story.").choices[0].message.content != base_reply  # the LoRA is in use

    back = httpx.post(live.url + "/v1/admin/adapters/rollback", headers=as_("root"), json={}, timeout=300)
    assert back.status_code == 200 and back.json()["active"]["id"] == old and active(live) == old
    assert ask(live, "alice", "Tell me a story.").choices[0].message.content == base_reply
    # deployed again after the rollback: still loaded, so switched to at once (the same load time), not loaded anew
    again = httpx.post(live.url + "/v1/admin/adapters", headers=as_("root"), json={"adapter": str(adapters["a"])}, timeout=300)
    assert again.status_code == 200 and again.json()["active"]["id"] == new and again.json()["previous"] == old
    assert again.json()["active"]["loaded_at"] == listed[0]["loaded_at"]


def test_feedback_export_by_watermark(live):
    reply = ask(live, "alice", "Export me.")
    httpx.post(live.url + "/v1/feedback", headers=as_("alice"), json={"completion_id": reply.id, "reaction": "love"})
    everything = httpx.get(live.url + "/v1/feedback/export", headers=as_("root")).json()
    ids = [row["id"] for row in everything["data"]]
    assert ids == sorted(ids) and everything["watermark"] == ids[-1]
    assert everything["data"][-1]["completion_id"] == reply.id and everything["data"][-1]["kind"] == "reaction"
    again = httpx.get(live.url + "/v1/feedback/export", headers=as_("root"), params={"after": everything["watermark"]}).json()
    assert again["data"] == [] and again["watermark"] == everything["watermark"]
    page = httpx.get(live.url + "/v1/feedback/export", headers=as_("root"), params={"after": ids[0], "limit": 1}).json()
    assert [row["id"] for row in page["data"]] == ids[1:2]


def test_deploy_cli_against_a_live_server(live, adapters, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKENS["root"])
    os.chmod(token_file, 0o600)
    # a run folder whose export stage holds the adapter (the layout `heedful run` writes)
    run = tmp_path / "runs" / "demo"
    shutil.copytree(adapters["b"], run / "export" / "export")
    (run / "export" / "manifest.json").write_text(
        json.dumps({"stage": "export", "uses": "export", "outputs": {"package": {"kind": "export", "path": "export"}}})
    )
    first = httpx.post(live.url + "/v1/admin/adapters", headers=as_("root"), json={"path": str(adapters["a"])}, timeout=300)
    assert first.status_code == 200, first.text
    before = active(live)
    done = heedful("deploy", str(run), "--to", live.url, "--token-file", str(token_file))
    assert done.returncode == 0, done.stdout + done.stderr
    new = active(live)
    assert new != before and new in done.stdout and TOKENS["root"] not in done.stdout + done.stderr
    listed = httpx.get(live.url + "/v1/models", headers=as_("alice")).json()["data"][0]["versions"]
    assert len(listed) >= 3  # base, a, b: only the active and the previous one stay loaded
    assert [v["loaded"] for v in listed] == [True, True] + [False] * (len(listed) - 2)

    refused = heedful("deploy", str(adapters["broken"]), "--to", live.url, "--token-file", str(token_file))
    assert refused.returncode != 0 and "refused (422)" in refused.stdout and "could not be loaded" in refused.stdout
    assert active(live) == new
    not_admin = heedful("deploy", "rollback", "--to", live.url, token=TOKENS["alice"])
    assert not_admin.returncode != 0 and "refused (403)" in not_admin.stdout
    nothing = heedful("deploy", str(tmp_path), "--to", live.url, token=TOKENS["root"])
    assert nothing.returncode != 0 and "export stage" in nothing.stdout

    back = heedful("deploy", "rollback", "--to", live.url, token=TOKENS["root"])
    assert back.returncode == 0, back.stdout + back.stderr
    assert active(live) == before and before in back.stdout


def test_no_log_answers_but_stores_nothing(tiny_model_path, adapters, tmp_path):
    memory = tmp_path / "memory.db"
    settings = ServeSettings(
        model="tiny", memory=str(memory), max_tokens_default=4, log=False, memory_enabled=False, hot_swap=False
    )  # as `heedful serve --ray-address --replicas 2` sets it
    with ServerThread(settings) as server:
        swap = httpx.post(server.url + "/v1/admin/adapters", json={"path": str(adapters["a"])})
        assert swap.status_code == 400 and "several Ray Serve replicas" in swap.json()["error"]["message"]
        reply = ask(server, "alice", "Private question.")  # one user, no token: any bearer is accepted
        assert reply.model_extra["logged"] is False and reply.choices[0].message.content is not None
        follow = ask(server, "alice", "And another.", conversation_id=reply.model_extra["conversation_id"])
        assert follow.model_extra["conversation_id"] == reply.model_extra["conversation_id"]
        r = httpx.post(server.url + "/v1/feedback", json={"completion_id": reply.id, "reaction": "love"})
        assert r.status_code == 400 and "--no-log" in r.json()["error"]["message"]
    s = MemoryStore(memory)
    assert s.conversations() == [] and s.feedback() == []
    assert "Private question" not in memory.read_bytes().decode("latin-1")


def test_version_id_ignores_the_order_peft_writes_target_modules_in(tmp_path):
    """PEFT writes `target_modules` (a set) in a different order from run to run: the same weights
    must get the same version id, and other weights another one."""
    from serving.versions import adapter_version_id

    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj", "k_proj"]}
    folders = []
    for i, (modules, weights) in enumerate(
        [
            (["q_proj", "v_proj", "k_proj"], b"w1"),
            (["v_proj", "k_proj", "q_proj"], b"w1"),
            (["q_proj"], b"w1"),
            (["q_proj", "v_proj", "k_proj"], b"w2"),
        ]
    ):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": modules}, indent=i))
        (folder / "adapter_model.safetensors").write_bytes(weights)
        folders.append(adapter_version_id(folder))
    assert folders[0] == folders[1] and len({folders[0], folders[2], folders[3]}) == 3
