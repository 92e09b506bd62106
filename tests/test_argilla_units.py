"""The Argilla glue without a server: items, templates, span checks, secrets, configs (fast)."""

from __future__ import annotations

import json

import pytest

from .conftest import SHARED_DATA


def test_qa_feedback_items_carry_human_feedback_as_responses():
    from feedback.argilla_items import to_items

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:3]
    spans = to_items(rows, "fine_grained", "auto", {})
    assert [i.id for i in spans] == ["qa0000", "qa0001", "qa0002"]
    first = spans[0].responses[0]
    assert first["user"] == "qa-feedback" and first["status"] == "submitted"
    assert first["values"]["corrected_response"] == rows[0]["feedback"]["corrected-prediction"]
    want = sorted((e["start"], e["end"], e["error type"].lower().replace("-", "_")) for e in rows[0]["feedback"]["errors"])
    assert sorted((s["start"], s["end"], s["label"]) for s in first["values"]["spans"]) == want
    assert spans[0].context.startswith("**Bloom (Troye Sivan album)**")
    prefs = to_items(rows, "preference", "qa_feedback", {})
    assert len(prefs) == 18 and prefs[0].id == "qa0000-1v2"
    assert [p.responses[0]["values"]["preference"] for p in prefs[:6]] == [
        {1: "a", 2: "b", 0: "tie"}[v] for v in rows[0]["preference"]
    ]
    assert prefs[1].response_a == rows[0]["prediction 1"] and prefs[1].response_b == rows[0]["prediction 3"]


def test_bad_input_names_the_row_and_field():
    from feedback.argilla_items import to_items
    from pipeline.errors import DataError

    with pytest.raises(DataError, match=r"data.jsonl row 1: field 'response' is missing"):
        to_items([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "verbal", "responses", {}, where="data.jsonl")
    with pytest.raises(DataError, match="cannot fill the 'verbal' template"):
        to_items([{"prompt": "a", "chosen": "b", "rejected": "c"}], "verbal", "auto", {})
    bad = [{"question": "q", "prediction 1": "x", "feedback": {"errors": [{"error type": "Typo", "start": 0, "end": 1}]}}]
    with pytest.raises(DataError, match=r"row 0: feedback.errors\[0\].error type 'Typo'"):
        to_items(bad, "fine_grained", "qa_feedback", {})


def test_ids_are_stable_and_preference_positions_are_shuffled_deterministically():
    from feedback.argilla_items import to_items

    rows = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(40)]
    once, twice = to_items(rows, "preference", "auto", {}), to_items(rows, "preference", "auto", {})
    assert [i.id for i in once] == [i.id for i in twice] and len({i.id for i in once}) == 40
    a_is_chosen = [i.response_a.startswith("good") for i in once]
    assert 5 < sum(a_is_chosen) < 35  # both positions are used
    for item, chosen_first in zip(once, a_is_chosen):  # the suggestion always points at the chosen reply
        assert item.suggestions["preference"]["value"] == ("a" if chosen_first else "b")


def test_generate_responses_pair_up_per_prompt_for_preferences():
    from feedback.argilla_items import to_items

    rows = [{"prompt_id": "p", "sample_index": k, "prompt": "q", "response": f"r{k}"} for k in (2, 0, 3, 1, 4)]
    items = to_items(rows, "preference", "responses", {"run": "r", "stage": "sample"})
    assert [(i.response_a, i.response_b) for i in items] == [("r0", "r1"), ("r2", "r3")]
    assert items[0].metadata["sample_id"] == "p:0v1" and items[0].metadata["stage"] == "sample"


def test_span_check_reports_the_record():
    from feedback.argilla_templates import InvalidSpan, check_spans

    text = "Paris is big."
    assert check_spans(
        [{"label": "redundant", "start": 9, "end": 12}, {"label": "irrelevant", "start": 0, "end": 5}],
        text,
        ["redundant", "irrelevant"],
        "r1",
    ) == [
        {"start": 0, "end": 5, "label": "irrelevant", "text": "Paris"},
        {"start": 9, "end": 12, "label": "redundant", "text": "big"},
    ]
    with pytest.raises(InvalidSpan, match=r"record r7: spans\[0\] \[10, 20\)"):
        check_spans([{"label": "redundant", "start": 10, "end": 20}], text, None, "r7")
    with pytest.raises(InvalidSpan, match="label 'typo' is not one of"):
        check_spans([{"label": "typo", "start": 0, "end": 1}], text, ["redundant"], "r8")


def test_preference_answers():
    from feedback.argilla_templates import as_ranking, preferred

    assert [preferred(v) for v in ("a", "b", "tie", None)] == ["a", "b", None, None]
    assert preferred([{"value": "a", "rank": 2}, {"value": "b", "rank": 1}]) == "b"
    assert preferred(as_ranking("tie")) is None and preferred(as_ranking("a")) == "a"


def test_private_files_are_0600(tmp_path):
    from feedback.argilla_stack import write_private

    path = tmp_path / "secret"
    write_private(path, "k")
    write_private(path, "k2")
    assert path.read_text() == "k2" and path.stat().st_mode & 0o777 == 0o600


def test_connection_resolution_prefers_config_then_env(tmp_path, monkeypatch):
    from feedback.argilla_client import ArgillaConnection, ArgillaError, resolve

    monkeypatch.setenv("HEEDFUL_ARGILLA_HOME", str(tmp_path / "none"))
    for var in ("ARGILLA_API_URL", "ARGILLA_API_KEY", "HEEDFUL_ARGILLA_API_URL", "HEEDFUL_ARGILLA_API_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ArgillaError, match="heedful argilla up"):
        resolve(ArgillaConnection())
    key = tmp_path / "key"
    key.write_text("secret-key\n")
    url, got, where = resolve(ArgillaConnection(api_url="https://argilla.example.org/", api_key_file=str(key)))
    assert (url, got, where) == ("https://argilla.example.org", "secret-key", str(key))
    monkeypatch.setenv("MY_KEY", "from-env")
    assert resolve(ArgillaConnection(api_url="https://x", api_key_env="MY_KEY", api_key_file=str(key)))[1] == "from-env"


def test_stage_configs_validate_and_reject_unknown_keys():
    from pydantic import ValidationError

    from stages.argilla_pull import ArgillaPullConfig
    from stages.argilla_push import ArgillaPushConfig

    cfg = ArgillaPushConfig.model_validate({"dataset": "d", "template": {"kind": "preference", "preference_question": "ranking"}})
    assert cfg.template.kind == "preference" and cfg.argilla.workspace == "heedful"
    with pytest.raises(ValidationError):
        ArgillaPushConfig.model_validate({"dataset": "d", "template": {"kind": "stars"}})
    with pytest.raises(ValidationError):
        ArgillaPullConfig.model_validate({"dataset": "d", "argilla": {"api_key": "inline keys are not allowed"}})


@pytest.fixture
def fake_argilla(monkeypatch):
    """argilla_push's calls to the server replaced: what `push_items` got, per call. The stand-in
    refuses items that share an id, as the real push does (before it contacts the server)."""
    from types import SimpleNamespace

    import feedback.argilla_client
    import feedback.argilla_stack
    import feedback.argilla_sync
    import stages.argilla_push
    from feedback.argilla_sync import PushResult
    from pipeline.errors import DataError

    pushes: list[list] = []

    def push_items(client, name, workspace, opts, items, batch_size=250, desc=""):
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"{len(ids) - len(set(ids))} items share an id")
        pushes.append(items)
        return PushResult(name, workspace, "ds", "http://argilla/ds", created=len(items), ids=ids)

    monkeypatch.setattr(feedback.argilla_client, "connect", lambda cfg: SimpleNamespace(api_url="http://argilla"))
    monkeypatch.setattr(feedback.argilla_sync, "push_items", push_items)
    monkeypatch.setattr(feedback.argilla_sync, "ensure_dataset", lambda *a: SimpleNamespace(id="ds"))
    monkeypatch.setattr(feedback.argilla_stack, "remember_users", lambda *a: None)
    monkeypatch.setattr(stages.argilla_push, "declare_review_metadata", lambda *a: None)
    monkeypatch.setattr(stages.argilla_push, "record_ids", lambda *a: set())
    return pushes


@pytest.mark.parametrize("select", [None, {"by": "all"}], ids=["push", "review_push"])
def test_identical_sampled_replies_are_pushed_once(tmp_path, fake_argilla, select):
    """Two samples of one prompt with the same text are one record (its id is the prompt and
    reply): the push keeps one and counts the other, instead of failing on the shared id."""
    from pipeline.config import pipeline_from_dict
    from pipeline.records import write_jsonl
    from pipeline.runner import Runner

    replies = ["Paris.", "Paris.", "Lyon.", "Paris."]  # samples 0, 1 and 3 are the same reply
    rows = [
        {"prompt_id": "p", "sample_index": k, "prompt": "Capital of France?", "response": r, "reward": 0.5 + k / 10}
        for k, r in enumerate(replies)
    ]
    write_jsonl(rows, tmp_path / "samples.jsonl")
    settings = {"dataset": "d", "template": {"kind": "reaction"}, **({"select": select} if select else {})}
    stage = {"name": "push", "uses": "argilla_push", "inputs": {"records": str(tmp_path / "samples.jsonl")}, "with": settings}
    data = {"run_name": "dupes", "model": "tiny", "stages": [stage]}
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    (pushed,) = fake_argilla
    assert [item.response for item in pushed] == ["Paris.", "Lyon."]
    assert pushed[0].metadata["sample_id"] == "p:0"  # the first sample of the repeated reply
    assert result.record("push").metrics["repeats_dropped"] == 2


def test_items_that_share_an_id_but_differ_are_not_dropped():
    """Rows that carry the same explicit id but different replies are a data error the push
    reports; only a repeat of the same text is dropped."""
    from feedback.argilla_items import drop_repeats, to_items

    rows = [
        {"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
        {"id": "x", "prompt": "q", "chosen": "c", "rejected": "d"},
    ]
    items = to_items(rows + rows[:1], "preference", "auto", {})
    kept, dropped = drop_repeats(items, lambda item: item)
    assert [i.id for i in kept] == ["x", "x"] and dropped == 1


def test_since_with_an_offset_is_converted_to_the_servers_utc():
    """The server's `updated_at` is naive UTC and `since:` is compared to it as text: a time
    with an offset is converted (the offset was dropped, or with '-05:00' kept in the text)."""
    from feedback.argilla_sync import _naive_utc
    from pipeline.errors import UserError

    server = "2026-01-02T03:30:00.123456"  # 03:30 UTC, as the server writes `updated_at`
    for since in ("2026-01-02T03:00:00Z", "2026-01-02T05:00:00+02:00", "2026-01-01T22:00:00-05:00", "2026-01-02T03:00:00"):
        assert _naive_utc(since) == "2026-01-02T03:00:00" and not server < _naive_utc(since)  # 03:00 UTC: kept
    assert server < _naive_utc("2026-01-02T00:00:00-05:00")  # 05:00 UTC: older, skipped
    assert _naive_utc("2026-01-02") == "2026-01-02T00:00:00"
    with pytest.raises(UserError, match="not an ISO 8601 time"):
        _naive_utc("yesterday")


#: per template: its questions, an answer that yields a record, and one that yields none
WITHDRAW_KINDS = {
    "fine_grained": (
        {"spans": ["irrelevant"], "corrected_response": None, "missing_info": None},
        {"spans": [{"start": 0, "end": 5, "label": "irrelevant"}], "corrected_response": "Paris."},
        {"spans": [{"start": 0, "end": 999, "label": "irrelevant"}]},  # a span that no longer fits: reported
    ),
    "verbal": (
        {"critique": None, "judgment": None, "scope": None},
        {"critique": "shorter", "judgment": "needs_work"},
        {"judgment": "good"},  # the critique emptied
    ),
    "reaction": ({"reaction": None}, {"reaction": "love"}, {}),
    "preference": ({"preference": None, "rationale": None}, {"preference": "a", "rationale": "clearer"}, {"preference": "tie"}),
}


@pytest.mark.parametrize("kind", sorted(WITHDRAW_KINDS))
def test_accumulated_rows_of_withdrawn_answers_are_dropped(monkeypatch, kind):
    """An accumulating pull keeps an earlier row only while its answer stands: an answer read
    again that yields nothing (tie, emptied critique or reaction, a span that no longer fits),
    a discarded response and a deleted record withdraw it; other rows stay, each once.
    (tests/test_argilla.py does the same for preferences on a real server.)"""
    from types import SimpleNamespace

    import feedback.argilla_sync
    from feedback.argilla_sync import pull, withdraw
    from pipeline.schema import records_to_rows

    questions, answer, nothing = WITHDRAW_KINDS[kind]
    ds = SimpleNamespace(
        id="ds", settings=SimpleNamespace(questions=[SimpleNamespace(name=q, labels=lb) for q, lb in questions.items()])
    )
    client = SimpleNamespace(
        api_url="http://argilla", users=[SimpleNamespace(id="u1", username="alice"), SimpleNamespace(id="u2", username="bob")]
    )
    fields = {"prompt": "Capital of France?", "response": "Paris is the capital.", "response_a": "Paris.", "response_b": "Lyon."}

    def response(rid, user, values, status="submitted", at="2026-01-01T00:00:00"):
        body = {q: {"value": v} for q, v in values.items()}
        return {"id": rid, "user_id": user, "status": status, "updated_at": at, "values": body}

    records = {
        f"r{i}": {"id": f"arg{i}", "external_id": f"r{i}", "fields": fields, "responses": [response(f"a{i}", "u1", answer)]}
        for i in range(4)
    }
    records["r0"]["responses"].append(response("b0", "u2", answer))

    def iter_records(client, dataset_id, statuses, page=1000):  # as the server: records with an answer in `statuses`
        for rec in records.values():
            if any(r["status"] in statuses for r in rec["responses"]):
                yield json.loads(json.dumps(rec))

    monkeypatch.setattr(feedback.argilla_sync, "find_dataset", lambda *a: ds)
    monkeypatch.setattr(feedback.argilla_sync, "iter_records", iter_records)
    first = pull(client, "d", "heedful", on_invalid="report")
    rows = records_to_rows(first.records)
    assert sorted(r["id"] for r in rows) == ["r0:alice", "r0:bob", "r1:alice", "r2:alice", "r3:alice"]
    other = {**rows[0], "provenance": {**rows[0]["provenance"], "dataset": "heedful/another"}, "id": "x:alice"}

    records["r0"]["responses"][0] = response("a0", "u1", nothing, at="2026-01-02T00:00:00")  # changed
    records["r1"]["responses"][0] = response("a1", "u1", {}, "discarded", at="2026-01-02T00:00:00")
    del records["r2"]  # deleted
    second = pull(client, "d", "heedful", cursor=first.cursor, on_invalid="report")
    assert (len(second.records), second.already_pulled) == (0, 2)
    kept, withdrawn = withdraw([*rows, other], second)
    assert withdrawn == {"changed": 1, "gone": 2}
    assert kept == [r for r in rows if r["id"] in ("r0:bob", "r3:alice")] + [other]  # untouched, in order

    records["r0"]["responses"][0] = response("a0", "u1", answer, at="2026-01-03T00:00:00")  # answered again
    third = pull(client, "d", "heedful", cursor=second.cursor, on_invalid="report")
    kept, withdrawn = withdraw(kept, third)
    rows = kept + records_to_rows(third.records)
    assert withdrawn == {"changed": 0, "gone": 0}
    assert sorted(r["id"] for r in rows) == ["r0:alice", "r0:bob", "r3:alice", "x:alice"]
