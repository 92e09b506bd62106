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
