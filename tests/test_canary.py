"""Canary deployment against a real server: a stable share of users gets the candidate version,
promote and rollback of a canary, the live per-version reaction counts that decide promotion,
the admin completion lookup, and `heedful deploy --canary / promote / stats` as a subprocess.

A real uvicorn server on 127.0.0.1 with the `tiny` model and MiniLM memory; a users file with
24 users asking (plus 120 spare accounts, see SPARE) and one admin (root); the adapters are real PEFT LoRA folders on the tiny model.
Tests run in file order and each starts from "no canary" (`no_canary`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from serving import deploy_cli
from serving.identity import Principal
from serving.local import random_lora_adapter
from serving.schemas import ChatRequest
from serving.service import MemPromptService
from serving.store import MemoryStore
from serving.versions import canary_bucket

from .serve_fixture import bearer, heedful, module_server, openai_client, tokens_for

USERS = [f"u{i:02d}" for i in range(24)]
#: more users with accounts, to find some in a given band of canary buckets whatever the (random) salt
SPARE = [f"spare{i:03d}" for i in range(120)]
TOKENS = tokens_for(*USERS, *SPARE)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("canary_adapters")
    return {name: random_lora_adapter(root / name, seed) for name, seed in (("a", 11), ("b", 12), ("c", 13))}


live = module_server("canary", TOKENS, max_tokens_default=2)


def as_(name: str) -> dict:
    return bearer(TOKENS, name)


def ask(live, name: str, content: str = "Hi.", stream: bool = False) -> tuple[str, str]:
    """(completion id, version that wrote it) of one chat request by `name`."""
    c = openai_client(live, TOKENS, name)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": content}]
    if stream:
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, stream=True))
        return chunks[0].id, (chunks[0].model_extra or {})["adapter_version"]
    reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    return reply.id, (reply.model_extra or {})["adapter_version"]


def models(live) -> dict:
    return httpx.get(live.url + "/v1/models", headers=as_("u00")).json()


def salt(live) -> str:
    return MemoryStore(live.memory).meta()["canary_salt"]


@pytest.fixture
def no_canary(live):
    if models(live)["canary_version"] is not None:
        deploy_cli.rollback(live.url, TOKENS["root"])
    assert models(live)["canary_version"] is None
    return live


def test_canary_bucket_splits_ids_by_share_stably():
    ids = [f"user-{i}" for i in range(20_000)]
    buckets = [canary_bucket("salt-1", u) for u in ids]
    assert buckets == [canary_bucket("salt-1", u) for u in ids]  # stable
    for share in (0.1, 0.2, 0.5):
        assert abs(sum(b < share for b in buckets) / len(ids) - share) < 0.015, share
    other = [canary_bucket("salt-2", u) for u in ids]  # another server (salt): another split
    assert sum((a < 0.2) != (b < 0.2) for a, b in zip(buckets, other)) > 0.2 * len(ids)


def test_canary_serves_the_share_of_users_stably(no_canary, adapters):
    live = no_canary
    active = models(live)["active_version"]
    result = deploy_cli.deploy(live.url, adapters["a"], TOKENS["root"], canary=0.5)
    canary = result["canary"]["id"]
    assert result["active"]["id"] == active and result["changed"] is False and canary.startswith("adp-")
    assert result["canary"]["canary"] == 0.5 and result["canary"]["adapter"] == str(adapters["a"].resolve())
    listed = models(live)
    assert listed["canary_version"] == canary and listed["canary"] == 0.5 and listed["active_version"] == active
    rows = {v["id"]: v for v in listed["data"][0]["versions"]}
    assert rows[canary]["canary"] == 0.5 and not rows[canary]["active"] and rows[canary]["loaded"]
    assert rows[active]["canary"] == 0.0 and rows[active]["active"]

    key = salt(live)
    expected = {u: canary if canary_bucket(key, u) < 0.5 else active for u in USERS}
    assert set(expected.values()) == {canary, active}  # both sides have users (all 24 on one: p = 2**-23)
    served = {u: ask(live, u, stream=(i % 4 == 0)) for i, u in enumerate(USERS)}
    assert {u: v for u, (_, v) in served.items()} == expected
    again = {u: ask(live, u, "Again.")[1] for u in USERS[:8]}
    assert again == {u: expected[u] for u in USERS[:8]}  # the same user, the same version, every time
    store = MemoryStore(live.memory)
    for cid, version in served.values():  # every stored completion names the version that wrote it
        stored = store.conversation(cid)
        assert stored.adapter_version == version
        assert stored.adapter == (str(adapters["a"].resolve()) if version == canary else rows[active]["adapter"])

    # a smaller share keeps only the users below it: the ones between 0.2 and 0.5 go back to the active version
    smaller = deploy_cli.deploy(live.url, adapters["a"], TOKENS["root"], canary=0.2)
    assert smaller["canary"]["id"] == canary and smaller["canary"]["canary"] == 0.2
    # (SPARE users too: the salt is random, and 24 users alone leave a band empty about once in 200 runs)
    candidates = USERS + SPARE
    movers = [u for u in candidates if 0.2 <= canary_bucket(key, u) < 0.5][:4]
    stayers = [u for u in candidates if canary_bucket(key, u) < 0.2][:4]
    assert len(movers) == len(stayers) == 4
    assert {ask(live, u)[1] for u in movers} == {active}
    assert {ask(live, u)[1] for u in stayers} == {canary}


def test_other_deploys_wait_until_the_canary_is_decided(no_canary, adapters):
    live = no_canary
    active = models(live)["active_version"]
    deploy_cli.deploy(live.url, adapters["a"], TOKENS["root"], canary=0.3)
    for body in ({"adapter": str(adapters["b"])}, {"adapter": str(adapters["b"]), "canary": 0.1}):
        r = httpx.post(live.url + "/v1/admin/adapters", headers=as_("root"), json=body, timeout=300)
        assert r.status_code == 409 and "promote it" in r.json()["error"]["message"], r.text
    for share in (0, 1, 1.5, "half"):
        r = httpx.post(
            live.url + "/v1/admin/adapters", headers=as_("root"), json={"adapter": str(adapters["a"]), "canary": share}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "canary", r.text
    deploy_cli.rollback(live.url, TOKENS["root"])
    broken = adapters["a"].parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = httpx.post(
        live.url + "/v1/admin/adapters", headers=as_("root"), json={"adapter": str(broken), "canary": 0.5}, timeout=300
    )
    assert r.status_code == 422 and "could not be loaded" in r.json()["error"]["message"]
    r = httpx.post(
        live.url + "/v1/admin/adapters",
        headers=as_("root"),
        json={"adapter": str(adapters["a"].parent / "nowhere"), "canary": 0.5},
    )
    assert r.status_code == 422 and "does not exist" in r.json()["error"]["message"]
    assert models(live)["canary_version"] is None and models(live)["active_version"] == active
    with pytest.raises(deploy_cli.HeedfulError, match=r"refused \(409\): no canary is running"):
        deploy_cli.promote(live.url, TOKENS["root"])


def test_rollback_drops_the_canary_and_keeps_the_active_version(no_canary, adapters):
    live = no_canary
    active = models(live)["active_version"]
    canary = deploy_cli.deploy(live.url, adapters["c"], TOKENS["root"], canary=0.5)["canary"]["id"]
    inside = next(u for u in USERS if canary_bucket(salt(live), u) < 0.5)
    assert ask(live, inside)[1] == canary
    back = deploy_cli.rollback(live.url, TOKENS["root"])
    assert back["active"]["id"] == active and back["canary"] is None and back["changed"] is False
    listed = models(live)
    assert listed["canary_version"] is None and listed["active_version"] == active
    assert canary not in {v["id"] for v in listed["data"][0]["versions"]}  # never active: not a version any more
    assert ask(live, inside)[1] == active


def test_promote_makes_the_canary_active_for_everyone(no_canary, adapters):
    live = no_canary
    before = models(live)["active_version"]
    canary = deploy_cli.deploy(live.url, adapters["b"], TOKENS["root"], canary=0.25)["canary"]["id"]
    outside = [u for u in USERS if canary_bucket(salt(live), u) >= 0.25][:3]
    assert {ask(live, u)[1] for u in outside} == {before}
    promoted = deploy_cli.promote(live.url, TOKENS["root"])
    assert promoted["active"]["id"] == canary and promoted["previous"] == before and promoted["changed"] is True
    assert promoted["canary"] is None
    listed = models(live)
    assert listed["active_version"] == canary and listed["canary_version"] is None and listed["canary"] == 0.0
    assert all(v["canary"] == 0.0 for v in listed["data"][0]["versions"])
    assert {ask(live, u)[1] for u in outside + USERS[:3]} == {canary}
    # after a promote, rollback is the ordinary one: back to the version active before
    assert deploy_cli.rollback(live.url, TOKENS["root"])["active"]["id"] == before
    assert {ask(live, u)[1] for u in outside} == {before}


def test_version_stats_count_reactions_by_version(no_canary, adapters):
    live = no_canary
    since = time.time()
    active = models(live)["active_version"]
    canary = deploy_cli.deploy(live.url, adapters["a"], TOKENS["root"], canary=0.5)["canary"]["id"]
    script = ["love", "dislike", "neutral", "love", None, "love"]  # per user, in turn; None: no reaction
    expected: dict[str, Counter] = {active: Counter(), canary: Counter()}
    key = salt(live)
    inside, outside = [u for u in USERS if canary_bucket(key, u) < 0.5], [u for u in USERS if canary_bucket(key, u) >= 0.5]
    for i, user in enumerate(inside[:6] + outside[:6]):  # users on both sides
        cid, version = ask(live, user, f"Question {i}.")
        expected[version]["completions"] += 1
        reaction = script[i % len(script)]
        if i == 3:  # reacts twice to the same completion: the latest reaction is the one that counts
            r = httpx.post(live.url + "/v1/feedback", headers=as_(user), json={"completion_id": cid, "reaction": "dislike"})
            assert r.status_code == 200
        if reaction is not None:
            r = httpx.post(live.url + "/v1/feedback", headers=as_(user), json={"completion_id": cid, "reaction": reaction})
            assert r.status_code == 200
            expected[version]["reactions"] += 1
            expected[version][reaction] += 1
        if i == 5:  # feedback that is not a reaction counts for nothing here
            httpx.post(live.url + "/v1/feedback", headers=as_(user), json={"completion_id": cid, "critique": "meh"})
    assert all(expected[v]["completions"] for v in expected)  # both versions served some

    rows = {row["version"]: row for row in deploy_cli.version_stats(live.url, TOKENS["root"], since=since)}
    assert set(rows) == {active, canary}
    for version, counts in expected.items():
        row = rows[version]
        for field in ("completions", "reactions", "love", "dislike", "neutral"):
            assert row[field] == counts[field], (version, field, row)
        rate = counts["love"] / counts["reactions"] if counts["reactions"] else None
        assert row["love_rate"] == (None if rate is None else round(rate, 4))
    assert (rows[active]["serving"], rows[active]["share"]) == ("active", 0.5)
    assert (rows[canary]["serving"], rows[canary]["share"]) == ("canary", 0.5)
    everything = httpx.get(live.url + "/v1/admin/versions/stats", headers=as_("root")).json()["data"]
    assert sum(r["completions"] for r in everything) > sum(r["completions"] for r in rows.values())  # earlier tests too
    deploy_cli.rollback(live.url, TOKENS["root"])


def test_completion_lookup_and_unknown_ids(no_canary, adapters):
    live = no_canary
    c = openai_client(live, TOKENS, "u03")
    reply = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Trace me."}], max_tokens=2)
    found = deploy_cli.completion(live.url, TOKENS["root"], reply.id)
    assert set(found) == {"id", "conversation_id", "version", "adapter", "created", "user_hash"}
    assert found["id"] == reply.id and found["conversation_id"] == reply.model_extra["conversation_id"]
    assert found["version"] == reply.model_extra["adapter_version"] and abs(found["created"] - time.time()) < 300
    assert found["user_hash"] == MemoryStore(live.memory).hash_label("u03") and "u03" not in found["user_hash"]
    missing = httpx.get(live.url + "/v1/admin/completions/chatcmpl-nobody", headers=as_("root"))
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert "chatcmpl-nobody" in error["message"] and error["type"] == "invalid_request_error" and error["code"] == "not_found"
    for path in ("/v1/admin/completions/" + reply.id, "/v1/admin/versions/stats"):
        denied = httpx.get(live.url + path, headers=as_("u03"))
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    for path in ("/v1/admin/adapters/promote", "/v1/admin/adapters/rollback"):
        assert httpx.post(live.url + path, headers=as_("u03")).status_code == 403


def test_single_user_requests_are_bucketed_by_their_user_label():
    """With one user every caller is the same principal: the `user` label (an app's end user) decides."""
    single = Principal("default", "admin", verified=False, auth="none")

    def request(user):
        return ChatRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], user=user)

    assert MemPromptService.user_key(request("end-user-7"), single) == "end-user-7"
    assert MemPromptService.user_key(request(None), single) == "default"
    assert MemPromptService.user_key(request(None), Principal("u05")) == "u05"


def test_deploy_cli_canary_stats_promote(no_canary, adapters):
    live = no_canary
    done = heedful("deploy", str(adapters["c"]), "--to", live.url, "--canary", "0.2", token=TOKENS["root"])
    assert done.returncode == 0, done.stdout + done.stderr
    canary = models(live)["canary_version"]
    assert canary in done.stdout and "20% of users" in done.stdout
    stats = heedful("deploy", "stats", "--to", live.url, token=TOKENS["root"])
    assert stats.returncode == 0 and canary in stats.stdout and "canary" in stats.stdout, stats.stdout + stats.stderr
    wrong = heedful("deploy", "promote", "--to", live.url, "--canary", "0.5", token=TOKENS["root"])
    assert wrong.returncode != 0 and "--canary goes with an adapter" in wrong.stdout
    promoted = heedful("deploy", "promote", "--to", live.url, token=TOKENS["root"])
    assert promoted.returncode == 0 and models(live)["active_version"] == canary, promoted.stdout + promoted.stderr
    assert TOKENS["root"] not in done.stdout + stats.stdout + promoted.stdout
    assert heedful("deploy", "rollback", "--to", live.url, token=TOKENS["root"]).returncode == 0


def test_the_deploy_stage_resumed_after_its_promote_records_the_deployment(no_canary, adapters, tmp_path):
    """The loop's deploy stage promoted its canary and was killed before it wrote deployment.json:
    on the rerun the candidate is the active version. The server refuses a canary of the active
    version, so the stage records it as deployed instead of failing on every rerun."""
    import json
    import logging
    import os

    from pipeline.stage import StageContext
    from stages.deploy import CanarySettings, DeployConfig, DeployStage

    live = no_canary
    before = models(live)["active_version"]
    canary = deploy_cli.deploy(live.url, adapters["a"], TOKENS["root"], canary=0.5)["canary"]["id"]
    assert deploy_cli.promote(live.url, TOKENS["root"])["active"]["id"] == canary  # ... then the kill
    token_file = tmp_path / "root.token"
    token_file.write_text(TOKENS["root"])
    os.chmod(token_file, 0o600)
    work = tmp_path / "run" / ".staging" / "deploy"
    work.mkdir(parents=True)
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "decision.json").write_text('{"passed": true, "reasons": []}')
    ctx = StageContext(
        name="deploy",
        uses="deploy",
        run_name="r",
        run_dir=tmp_path / "run",
        work_dir=work,
        model="tiny",
        seed=0,
        inputs={"package": adapters["a"], "decision": tmp_path / "gate" / "decision.json"},
        log=logging.getLogger("test"),
    )
    config = DeployConfig(url=live.url, token_file=str(token_file), canary=CanarySettings(share=0.5, timeout_s=1, poll_s=0.1))
    metrics = DeployStage(config, ctx).run()
    assert metrics == {"deployed": True, "version": canary}
    result = json.loads((work / "deployment" / "deployment.json").read_text())
    assert result["before"] == canary and "active version already" in result["why"]
    assert models(live)["active_version"] == canary and models(live)["canary_version"] is None
    assert deploy_cli.rollback(live.url, TOKENS["root"])["active"]["id"] == before
