"""Feedback collection against a REAL local Argilla 2.8 stack (Redis + osmem + argilla-server).

One stack per test session (started by the fixture, stopped at the end; the last test
checks that `down` leaves no process behind). Annotations come from real annotator
accounts through the same endpoints as the web UI, and one from headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.slow
BROWSER_DIR = ROOT / "tests" / "browser"

if not shutil.which("redis-server"):
    pytest.skip(
        "redis-server is not installed (`make setup` installs it: apt-get install -y redis-server)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from feedback import argilla_stack

    home = tmp_path_factory.mktemp("argilla-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HEEDFUL_ARGILLA_HOME", str(home))
    for var in ("ARGILLA_API_URL", "ARGILLA_API_KEY", "HEEDFUL_ARGILLA_API_URL", "HEEDFUL_ARGILLA_API_KEY_FILE"):
        mp.delenv(var, raising=False)
    info = argilla_stack.up(port=argilla_stack._free_port())
    try:
        yield info
    finally:
        argilla_stack.down()
        mp.undo()


@pytest.fixture(scope="module")
def owner(stack):
    from feedback.argilla_client import connect

    return connect()


@pytest.fixture(scope="module")
def annotators(stack, owner):
    """Two annotator accounts with their own API keys (as a simulator would use)."""
    import argilla as rg

    from feedback.argilla_client import api
    from feedback.argilla_sync import ensure_user

    out = {}
    for name in ("ann-a", "ann-b"):
        user_id, password = ensure_user(owner, name, "heedful")
        key = api(owner, "GET", f"/api/v1/users/{user_id}", "key")["api_key"]
        out[name] = {"client": rg.Argilla(api_url=stack.url, api_key=key), "key": key, "password": password}
    return out


def _push(owner, name, kind, rows, fmt="auto", **opts):
    from feedback.argilla_items import to_items
    from feedback.argilla_sync import push_items
    from feedback.argilla_templates import TemplateOptions

    items = to_items(rows, kind, fmt, {"model": "tiny", "run": "t", "stage": "sample"})
    return push_items(owner, name, "heedful", TemplateOptions(kind=kind, **opts), items), items


RESPONSES = [
    {
        "prompt_id": "p1",
        "sample_index": 0,
        "prompt": "What is the capital of France?",
        "response": "Paris is the capital of France. Bananas are yellow.",
        "model": "tiny",
        "adapter": "",
    },
    {
        "prompt_id": "p1",
        "sample_index": 1,
        "prompt": "What is the capital of France?",
        "response": "It is Lyon.",
        "model": "tiny",
        "adapter": "",
    },
    {
        "prompt_id": "p2",
        "sample_index": 0,
        "prompt": "Name a primary colour.",
        "response": "  Red, with spaces kept.  ",
        "model": "tiny",
        "adapter": "",
    },
]


# -- the stack ---------------------------------------------------------------------------------


def test_up_twice_is_harmless_and_secrets_are_private(stack):
    from feedback import argilla_stack

    again = argilla_stack.up()
    assert again.already_running and again.url == stack.url
    assert {n: p["pid"] for n, p in again.processes.items()} == {n: p["pid"] for n, p in stack.processes.items()}
    assert stack.url.startswith("http://127.0.0.1:")
    for name in ("api_key", "credentials.json"):
        assert (stack.home / name).stat().st_mode & 0o777 == 0o600
    key = (stack.home / "api_key").read_text().strip()
    for log in (stack.home / "logs").iterdir():
        assert key not in log.read_text(errors="replace"), f"API key leaked into {log}"


def test_templates_build_valid_settings(owner):
    from feedback.argilla_templates import TemplateOptions, detect_kind, settings

    for kind, marker in (
        ("fine_grained", "spans"),
        ("verbal", "critique"),
        ("preference", "preference"),
        ("reaction", "reaction"),
    ):
        s = settings(TemplateOptions(kind=kind), owner)
        names = {q.name for q in s.questions}
        assert marker in names and detect_kind(names) == kind
        assert s.guidelines and any(q.required for q in s.questions)
    spans = settings(TemplateOptions(kind="fine_grained", span_labels=["a", "b"]), owner).questions["spans"]
    assert spans.labels == ["a", "b"] and spans.field == "response"


# -- templates: push, annotate as an annotator, pull back ----------------------------------------


ANSWERS = {
    "fine_grained": {
        "spans": [{"label": "irrelevant", "start": 32, "end": 51}],
        "corrected_response": "Paris is the capital of France. ",
        "missing_info": "the population",
    },
    "verbal": {"critique": "Answer only the question.", "judgment": "needs_work", "scope": "geography questions"},
    "reaction": {"reaction": "love"},
}


@pytest.mark.parametrize("kind", ["fine_grained", "verbal", "reaction"])
def test_roundtrip_single_reply_templates(owner, annotators, kind):
    from feedback.argilla_annotate import annotate
    from feedback.argilla_sync import pull

    name = f"rt-{kind}"
    res, items = _push(owner, name, kind, RESPONSES[:1])
    assert res.created == 1
    seen = []

    def answer(task):
        seen.append(task)
        return ANSWERS[kind]

    assert annotate(name, answer, client=annotators["ann-a"]["client"], workspace="heedful") == 1
    assert seen[0].fields["response"] == RESPONSES[0]["response"]
    if kind == "fine_grained":  # the corrected response is pre-filled with the reply itself
        assert seen[0].suggestions["corrected_response"] == RESPONSES[0]["response"]
    out = pull(owner, name, "heedful")
    assert len(out.records) == 1
    rec = out.records[0].model_dump()
    assert rec["prompt"] == RESPONSES[0]["prompt"] and rec["response"] == RESPONSES[0]["response"]
    prov = rec["provenance"]
    assert (prov["source"], prov["annotator"], prov["dataset"], prov["record_id"], prov["model"], prov["stage"]) == (
        "argilla",
        "ann-a",
        f"heedful/{name}",
        items[0].id,
        "tiny",
        "sample",
    )
    assert prov["timestamp"].endswith("Z")
    if kind == "fine_grained":
        assert rec["spans"] == [{"start": 32, "end": 51, "label": "irrelevant", "text": "Bananas are yellow."}]
        assert rec["corrected_response"] == ANSWERS[kind]["corrected_response"]  # trailing space kept
        assert rec["missing_info"] == "the population"
    elif kind == "verbal":
        assert (rec["critique"], rec["judgment"], rec["scope"]) == tuple(ANSWERS[kind].values())
    else:
        assert rec["reaction"] == "love" and rec["user_id"] == "ann-a"


@pytest.mark.parametrize("question", ["label", "ranking"])
def test_roundtrip_preference_template(owner, annotators, question):
    """Existing choices arrive as suggestions; the annotator's choice comes back as a TRL pair."""
    from feedback.argilla_annotate import annotate
    from feedback.argilla_sync import pull

    pairs = [
        {
            "prompt": [{"role": "user", "content": f"Q{i}?"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
            "source": "heuristic:keywords",
        }
        for i in range(6)
    ]
    name = f"rt-pref-{question}"
    _push(owner, name, "preference", pairs, preference_question=question)

    def agree_except_last(task):  # pick the suggested side, except for Q5 where we say tie
        pick = task.suggestions["preference"]
        if question == "ranking":
            pick = "a" if task.fields["response_a"].startswith("good") else "b"
            if task.fields["prompt"] == "Q5?":
                return {"preference": [{"value": "a", "rank": 1}, {"value": "b", "rank": 1}]}
            return {
                "preference": [{"value": pick, "rank": 1}, {"value": "b" if pick == "a" else "a", "rank": 2}],
                "rationale": "more correct",
            }
        if task.fields["prompt"] == "Q5?":
            return {"preference": "tie"}
        return {"preference": pick, "rationale": "more correct"}

    assert annotate(name, agree_except_last, client=annotators["ann-b"]["client"]) == 6
    out = pull(owner, name, "heedful")
    assert out.ties == 1 and len(out.records) == 5
    for rec in out.records:  # conversational format comes back exactly, whatever the A/B shuffle was
        i = rec.prompt[0]["content"][1]
        assert rec.chosen == [{"role": "assistant", "content": f"good {i}"}]
        assert rec.rejected == [{"role": "assistant", "content": f"bad {i}"}]
        assert rec.rationale == "more correct" and rec.provenance.annotator == "ann-b"


def test_repush_creates_no_duplicates_and_keeps_responses(owner, annotators):
    from feedback.argilla_annotate import annotate
    from feedback.argilla_client import api

    first, _ = _push(owner, "repush", "reaction", RESPONSES)
    annotate("repush", lambda t: {"reaction": "dislike"}, client=annotators["ann-a"]["client"], limit=1)
    second, _ = _push(owner, "repush", "reaction", RESPONSES)
    assert (first.created, first.updated) == (3, 0)
    assert (second.created, second.updated) == (0, 3)
    found = api(
        owner, "POST", f"/api/v1/datasets/{first.dataset_id}/records/search", "count", params={"include": ["responses"]}, json={}
    )
    assert found["total"] == 3
    assert sum(len(i["record"].get("responses") or []) for i in found["items"]) == 1


def test_pull_stage_is_incremental_across_forced_reruns(owner, annotators, tmp_path):
    """push -> pull as a real pipeline; a forced rerun of pull writes only what is new."""
    from feedback.argilla_annotate import annotate
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RESPONSES))
    spec = {
        "run_name": "argilla",
        "model": "tiny",
        "stages": [
            {
                "name": "push",
                "uses": "argilla_push",
                "inputs": {"records": str(data)},
                "with": {"dataset": "incremental", "template": {"kind": "verbal"}},
            },
            {"name": "pull", "uses": "argilla_pull", "inputs": {"pushed": "push.pushed"}, "with": {"accumulate": True}},
        ],
    }

    def run(force=()):
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False, force=set(force)).execute()
        assert result.ok, [r.error for r in result.records]
        return {r.name: r for r in result.records}, result.run_dir

    critique = lambda t: {"critique": f"shorter please ({t.id[:4]})", "judgment": "needs_work"}  # noqa: E731
    recs, run_dir = run()
    assert recs["push"].metrics["created"] == 3 and recs["pull"].metrics["new"] == 0
    assert run()[0]["pull"].status == "skipped"  # same config: a pull is skipped unless forced
    annotate("incremental", critique, client=annotators["ann-a"]["client"], limit=2)
    recs, run_dir = run(force=["pull"])
    assert recs["push"].status == "skipped" and recs["pull"].metrics["new"] == 2
    annotate("incremental", critique, client=annotators["ann-a"]["client"])
    annotate("incremental", critique, client=annotators["ann-b"]["client"], limit=1)
    recs, run_dir = run(force=["pull"])
    assert (recs["pull"].metrics["new"], recs["pull"].metrics["already_pulled"]) == (2, 2)
    from pipeline.records import load_rows

    rows = load_rows(run_dir / "pull" / "verbal_feedback")
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4  # accumulate: 2 earlier + 2 new
    recs, _ = run(force=["pull"])
    assert recs["pull"].metrics["new"] == 0 and recs["pull"].metrics["records"] == 4


def _answered(owner, dataset, prompt):
    """The raw record (with its responses) of `prompt` in `dataset`, as the owner sees it."""
    from feedback.argilla_sync import find_dataset, iter_records

    ds = find_dataset(owner, dataset, "heedful")
    (record,) = [r for r in iter_records(owner, str(ds.id), ["submitted"]) if r["fields"]["prompt"] == prompt]
    return record


def _revise(owner, annotator, dataset, prompt, body):
    """`annotator` changes its submitted answer to `prompt`'s record, as the UI does (PUT /api/v1/responses/{id})."""
    from feedback.argilla_client import api

    me = api(annotator["client"], "GET", "/api/v1/me", "who am I")["id"]
    (mine,) = [r for r in _answered(owner, dataset, prompt)["responses"] if r["user_id"] == me]
    api(annotator["client"], "PUT", f"/api/v1/responses/{mine['id']}", f"revise the answer to {prompt}", json=body)


def test_accumulated_pull_withdraws_answers_changed_to_a_tie_discarded_or_deleted(owner, annotators, tmp_path):
    """An annotator's withdrawal withdraws the record: after a preference is changed to a tie,
    another discarded and a record deleted, the accumulated pull no longer holds their rows
    (they were the next rounds' DPO and reward data); the other answers stay, each once."""
    from feedback.argilla_annotate import annotate
    from feedback.argilla_client import api
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows
    from pipeline.runner import Runner

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(4))
    )
    push = {"dataset": "withdrawn", "template": {"kind": "preference"}}
    spec = {
        "run_name": "argilla-withdrawn",
        "model": "tiny",
        "stages": [
            {"name": "push", "uses": "argilla_push", "inputs": {"records": str(pairs)}, "with": push},
            {"name": "pull", "uses": "argilla_pull", "inputs": {"pushed": "push.pushed"}, "with": {"accumulate": True}},
        ],
    }

    def run():
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False, force={"pull"}).execute()
        assert result.ok, [r.error for r in result.records]
        metrics = result.record("pull").metrics
        return metrics, {r["id"]: r for r in load_rows(result.run_dir / "pull" / "preferences")}

    def good(task):
        return {"preference": "a" if task.fields["response_a"].startswith("good") else "b", "rationale": "correct"}

    assert run()[0]["new"] == 0  # pushed, nothing answered yet
    annotate("withdrawn", good, client=annotators["ann-a"]["client"])
    annotate("withdrawn", lambda t: good(t) if t.fields["prompt"] == "Q0?" else None, client=annotators["ann-b"]["client"])
    metrics, first = run()
    assert metrics["new"] == 5 and len(first) == 5
    by_prompt = {(r["prompt"], r["provenance"]["annotator"]): rid for rid, r in first.items()}

    _revise(owner, annotators["ann-a"], "withdrawn", "Q0?", {"values": {"preference": {"value": "tie"}}, "status": "submitted"})
    _revise(owner, annotators["ann-a"], "withdrawn", "Q1?", {"values": {}, "status": "discarded"})
    deleted = _answered(owner, "withdrawn", "Q2?")
    api(owner, "DELETE", f"/api/v1/records/{deleted['id']}", "delete a record")
    metrics, second = run()
    standing = {by_prompt["Q0?", "ann-b"], by_prompt["Q3?", "ann-a"]}
    assert second == {rid: first[rid] for rid in standing}  # the withdrawn are gone, the rest unchanged
    assert (metrics["new"], metrics["ties"], metrics["already_pulled"]) == (0, 1, 2)
    assert (metrics["withdrawn"], metrics["records"]) == (3, 2)

    _revise(owner, annotators["ann-a"], "withdrawn", "Q0?", {"values": {"preference": {"value": "a"}}, "status": "submitted"})
    metrics, third = run()  # a tie changed back to a preference comes back, once
    assert (metrics["new"], metrics["withdrawn"], metrics["records"]) == (1, 0, 3)
    assert set(third) == standing | {by_prompt["Q0?", "ann-a"]}
    assert {rid: third[rid] for rid in standing} == second


def test_an_answer_discarded_mid_pull_does_not_hide_the_next_records_answer(owner, annotators, monkeypatch):
    """The search pages by offset: an answer discarded while a pull reads the pages shifts the
    later records back one place. The pull still reads every answer that stands, once (before,
    the next page started a record late: that answer read as withdrawn and, its response in the
    cursor, was never read again)."""
    import feedback.argilla_sync as sync
    from feedback.argilla_annotate import annotate

    pairs = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    _push(owner, "mid-pull", "preference", pairs)
    annotate("mid-pull", lambda task: {"preference": "a", "rationale": "ok"}, client=annotators["ann-a"]["client"])
    monkeypatch.setattr(sync, "PAGE", 2)
    real_api, pages = sync.api, []

    def api(client, method, path, what, **kwargs):
        if what == "search records" and client is owner:
            pages.append(kwargs["params"]["offset"])
            if len(pages) == 2:  # between the first page and the second, ann-a discards Q0
                monkeypatch.setattr(sync, "api", real_api)
                _revise(owner, annotators["ann-a"], "mid-pull", "Q0?", {"values": {}, "status": "discarded"})
                monkeypatch.setattr(sync, "api", api)
        return real_api(client, method, path, what, **kwargs)

    monkeypatch.setattr(sync, "api", api)
    result = sync.pull(owner, "mid-pull", "heedful")
    assert sorted(str(r.prompt) for r in result.records) == [f"Q{i}?" for i in range(1, 6)]
    assert len(result.live) == 5 and len(pages) > 3  # the listing started over once


def test_a_dataset_deleted_as_a_whole_withdraws_the_accumulated_rows(owner, annotators, tmp_path):
    """`if_missing: empty` reads a deleted dataset as one without answers: the accumulated rows
    of it are withdrawn and counted (not silently dropped with the output), rows of another
    dataset stay, and `cursor/answers.json` says which answers stood at each pull (all, then none)."""
    from feedback.argilla_annotate import annotate
    from feedback.argilla_client import api
    from feedback.argilla_sync import find_dataset
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows, save_rows
    from pipeline.runner import Runner

    pairs = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    _push(owner, "deleted-whole", "preference", pairs)
    pull = {"dataset": "deleted-whole", "accumulate": True, "if_missing": "empty"}
    spec = {"run_name": "argilla-deleted", "model": "tiny", "stages": [{"name": "pull", "uses": "argilla_pull", "with": pull}]}
    answers = []

    def run():
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False, force={"pull"}).execute()
        assert result.ok, [r.error for r in result.records]
        saw = result.run_dir / "pull" / "cursor" / "answers.json"
        answers.append(json.loads(saw.read_text()) if saw.is_file() else None)
        return result.record("pull").metrics, result.run_dir / "pull"

    annotate("deleted-whole", lambda t: {"preference": "a", "rationale": "r"}, client=annotators["ann-a"]["client"])
    metrics, out = run()
    assert (metrics["new"], metrics["records"], metrics["withdrawn"]) == (3, 3, 0)
    pulled = sorted(r["id"] for r in load_rows(out / "preferences"))
    # a row another dataset gave the accumulated output (its config named another dataset once)
    other = {**load_rows(out / "preferences")[0], "id": "x:ann-a"}
    other["provenance"] = {**other["provenance"], "dataset": "heedful/elsewhere"}
    save_rows([*load_rows(out / "preferences"), other], out / "preferences")

    api(owner, "DELETE", f"/api/v1/datasets/{find_dataset(owner, 'deleted-whole', 'heedful').id}", "delete a dataset")
    metrics, out = run()
    assert (metrics["new"], metrics["withdrawn"], metrics["records"], metrics["output"]) == (0, 3, 1, "preferences")
    assert [r["id"] for r in load_rows(out / "preferences")] == ["x:ann-a"]
    metrics, out = run()  # nothing more to withdraw; the other dataset's row stays
    assert (metrics["withdrawn"], metrics["records"]) == (0, 1)
    assert answers == [
        {"dataset": "heedful/deleted-whole", "live": pulled, "reread": pulled},
        {"dataset": "heedful/deleted-whole", "live": [], "reread": []},
        {"dataset": "heedful/deleted-whole", "live": [], "reread": []},
    ]


def test_invalid_span_is_reported_with_the_record_id(owner, annotators):
    """The reply text changed after annotation: the old span no longer fits."""
    from feedback.argilla_annotate import annotate
    from feedback.argilla_sync import pull, push_items
    from feedback.argilla_templates import PushItem, TemplateOptions
    from pipeline.errors import DataError

    opts = TemplateOptions(kind="fine_grained")
    long = PushItem(id="changed-reply", prompt="Q?", response="A long answer that will be cut short later.")
    push_items(owner, "badspan", "heedful", opts, [long, PushItem(id="fine", prompt="Q2?", response="Fine.")])
    annotate(
        "badspan",
        lambda t: {
            "spans": [{"label": "redundant", "start": len(t.fields["response"]) - 5, "end": len(t.fields["response"])}],
            "corrected_response": "x",
        },
        client=annotators["ann-a"]["client"],
    )
    push_items(owner, "badspan", "heedful", opts, [long.model_copy(update={"response": "Cut short."})])
    with pytest.raises(DataError, match=r"record changed-reply: spans\[0\] \[38, 43\)") as err:
        pull(owner, "badspan", "heedful")
    assert "fine" not in str(err.value).split("\n")[1]
    reported = pull(owner, "badspan", "heedful", on_invalid="report")
    assert [p["record_id"] for p in reported.invalid] == ["changed-reply"]
    assert [r.provenance.record_id for r in reported.records] == ["fine"]
    assert len(reported.cursor) == 1  # only the good response: the bad one is reported again next time
    again = pull(owner, "badspan", "heedful", cursor=reported.cursor, on_invalid="report")
    assert [p["record_id"] for p in again.invalid] == ["changed-reply"] and again.records == []


def test_annotator_on_owner_action_gets_a_clear_error(stack, annotators, tmp_path):
    env = dict(os.environ, ARGILLA_API_KEY=annotators["ann-a"]["key"], HEEDFUL_ARGILLA_HOME=str(stack.home))
    sample = tmp_path / "one.json"
    sample.write_text(json.dumps(json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:1]))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "argilla", "import-qa", str(sample)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "forbidden (403)" in out and "owner or admin" in out
    assert "Traceback" not in out


def test_find_similar_works_on_osmem(owner):
    """osmem has no knn: the `osmem` engine computes cosine similarity itself."""
    import argilla as rg

    ds = rg.Dataset(
        name="similar",
        workspace="heedful",
        client=owner,
        settings=rg.Settings(
            fields=[rg.TextField(name="text", client=owner)],
            questions=[rg.LabelQuestion(name="l", labels=["x", "y"], client=owner)],
            vectors=[rg.VectorField(name="emb", dimensions=3, _client=owner)],
        ),
    ).create()
    vecs = {"east": [1.0, 0.0, 0.0], "north-east": [0.7, 0.7, 0.0], "north": [0.0, 1.0, 0.0], "west": [-1.0, 0.0, 0.0]}
    ds.records.log([rg.Record(id=k, fields={"text": k}, vectors={"emb": v}) for k, v in vecs.items()])
    hits = list(ds.records(query=rg.Query(similar=rg.Similar(name="emb", value=[1.0, 0.1, 0.0])), limit=4))
    order = [rec.id for rec, _score in hits]
    assert order == ["east", "north-east", "north", "west"]
    scores = [score for _rec, score in hits]
    assert scores[0] == pytest.approx((1 + 1 / (1.01**0.5)) / 2, abs=1e-4) and scores[-1] < 0.05


def test_qa_feedback_import_roundtrips_exactly(owner):
    """400 human fine-grained annotations and 2,400 pairwise preferences in, the same out."""
    from feedback.argilla_items import qa_expected
    from feedback.argilla_sync import pull

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())
    expected = qa_expected(rows)
    _push(owner, "qa-spans", "fine_grained", rows, fmt="qa_feedback")
    spans = pull(owner, "qa-spans", "heedful")
    assert len(spans.records) == 400 and spans.annotators == {"qa-feedback"}
    for rec in spans.records:
        want = expected["span_feedback"][rec.provenance.record_id]
        assert sorted((s.start, s.end, s.label) for s in rec.spans) == want["spans"]
        assert rec.corrected_response == want["corrected_response"]
        assert (json.loads(rec.missing_info) if rec.missing_info else []) == want["missing_info"]
        n = int(rec.provenance.record_id[2:])
        assert rec.response == rows[n]["prediction 1"] and rec.prompt == rows[n]["question"]
    _push(owner, "qa-prefs", "preference", rows, fmt="qa_feedback")
    prefs = pull(owner, "qa-prefs", "heedful")
    got = {}
    for rec in prefs.records:
        rid = rec.provenance.record_id
        n, (i, j) = int(rid[2:6]), (int(rid[7]), int(rid[9]))
        first = rows[n][f"prediction {i}"]
        got[rid] = 1 if rec.chosen == first else 2
        assert {rec.chosen, rec.rejected} == {first, rows[n][f"prediction {j}"]}
    got.update({rid: 0 for rid in expected["preferences"] if rid not in got})
    assert got == expected["preferences"] and prefs.ties == list(got.values()).count(0)


# -- a person in a browser ----------------------------------------------------------------------


def test_browser_annotator_submits_a_span(stack, owner, annotators, tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (`make setup` installs it)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir() or not shutil.which("node"):
        pytest.skip("playwright-core is not installed in tests/browser (`make setup` runs npm install there)")
    from feedback.argilla_sync import pull

    res, _ = _push(owner, "browser", "fine_grained", RESPONSES[:1])
    env = dict(
        os.environ,
        ARGILLA_URL=stack.url,
        ARGILLA_USER="ann-b",
        ARGILLA_PASSWORD=annotators["ann-b"]["password"],
        DATASET_URL=res.url,
        LABEL="unverifiable",
        PHRASE="Bananas are yellow.",
        SCREENSHOT=str(tmp_path / "submitted.png"),
    )
    proc = subprocess.run(
        ["node", str(BROWSER_DIR / "annotate_span.js")], capture_output=True, text=True, env=env, cwd=BROWSER_DIR, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = pull(owner, "browser", "heedful")
    assert [r.provenance.annotator for r in out.records] == ["ann-b"]
    assert [s.model_dump() for s in out.records[0].spans] == [
        {"start": 32, "end": 51, "label": "unverifiable", "text": "Bananas are yellow."}
    ]
    assert out.records[0].corrected_response == RESPONSES[0]["response"]  # the pre-filled suggestion, submitted


# -- last: down ---------------------------------------------------------------------------------


def test_down_leaves_no_process_behind(stack):
    from feedback import argilla_stack

    pids = [p["pid"] for p in argilla_stack.read_state()["processes"].values()]
    stopped = argilla_stack.down()
    assert sorted(stopped) == ["osmem", "redis", "server"]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert argilla_stack.read_state() is None and argilla_stack.down() == []
