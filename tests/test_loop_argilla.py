"""The closed loop learns from people's reviews in Argilla (`loop.argilla:`), not only from served feedback.

Fast tests check the loop file's checks, the round's stages and the reward pool by hand. The
slow test runs two rounds of `heedful loop` on the `tiny` model against a real `heedful serve`
(tests/serve_fixture.py) and the REAL local Argilla stack of tests/test_argilla.py, whose
annotator accounts submit answers through the same endpoints as the web UI: round 1 trains DPO
on the preferences annotators gave, round 2 pulls only what they submitted since, and the
deployed adapter's lineage names the Argilla records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.errors import HeedfulError
from pipeline.loop import HUMAN_STAGE, Loop, LoopFile, load_state, round_stages, trainable_counts
from pipeline.records import load_rows, save_rows

if shutil.which("redis-server"):  # the real stack's fixtures (one stack for this module)
    from .test_argilla import _push, annotators, owner, stack  # noqa: F401

SMALL = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "save_steps": 1, "lora": {"r": 4, "alpha": 8}}


def write_loop(tmp_path: Path, **loop) -> Path:
    spec = {"run_name": "h", "model": "tiny", "loop": {"server": "http://127.0.0.1:9", **loop}}
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_argilla_block_is_checked_before_any_round(tmp_path):
    dpo = [{"method": "dpo", "from": "human_preferences", "min_records": 2}]
    with pytest.raises(HeedfulError, match=r"loop.train: dpo learns from Argilla: set `loop.argilla"):
        LoopFile(write_loop(tmp_path, train=dpo))
    plove = [{"kind": "plove", "from": "human_reactions"}]
    with pytest.raises(HeedfulError, match=r"loop.rewards: plove learns from Argilla"):
        LoopFile(write_loop(tmp_path, train=[{"method": "kto", "from": "reactions"}], rewards=plove))
    with pytest.raises(HeedfulError, match=r"field 'loop.argilla.cursor_file': the loop sets it"):
        LoopFile(write_loop(tmp_path, train=dpo, argilla={"dataset": "d", "cursor_file": "c.json"}))
    with pytest.raises(HeedfulError, match=r"field 'loop.argilla.dataset': the Argilla dataset to pull is required"):
        LoopFile(write_loop(tmp_path, train=dpo, argilla={"include_drafts": True}))
    with pytest.raises(HeedfulError, match=r"field 'loop.argilla.argilla.workspce'"):
        LoopFile(write_loop(tmp_path, train=dpo, argilla={"dataset": "d", "argilla": {"workspce": "x"}}))
    with pytest.raises(HeedfulError, match=r"loop.train: cut cannot train from human_preferences"):
        LoopFile(write_loop(tmp_path, train=[{"method": "cut", "from": "human_preferences"}], argilla={"dataset": "d"}))


def test_the_human_stage_reads_the_previous_cursor_and_feeds_the_steps(tmp_path):
    train = [
        {"method": "kto", "from": "human_reactions", "min_records": 2, "with": SMALL},
        {"method": "dpo", "from": "preferences", "min_records": 2, "with": SMALL},
    ]
    loop = LoopFile(write_loop(tmp_path, train=train, argilla={"dataset": "reviews", "include_drafts": True}))
    pull = round_stages(loop, "pull", "runs/h/round-001/pull/cursor/cursor.json", None, {}, human_cursor="prev.json")
    assert [s["name"] for s in pull] == ["pull", HUMAN_STAGE]
    assert pull[1] == {
        "name": "human",
        "uses": "argilla_pull",
        # read the committed cursor, never write it back; a dataset not pushed yet is an empty pull
        "with": {
            "dataset": "reviews",
            "include_drafts": True,
            "cursor_file": "prev.json",
            "write_cursor_file": False,
            "if_missing": "empty",
        },
    }
    stages = round_stages(loop, "train", None, "/srv/adapter", {"human_reactions": 2, "preferences": 2}, human_cursor=None)
    trained = {s["name"]: s["inputs"] for s in stages if s["name"].startswith("train_")}
    assert trained == {
        "train_1_kto": {"feedback": "human.reactions", "adapter": "/srv/adapter"},
        "train_2_dpo": {"preferences": "pull.preferences", "adapter": "train_1_kto.adapter"},
    }
    # only the served preferences: the human step is skipped, not failed
    stages = round_stages(loop, "train", None, None, {"human_reactions": 1, "preferences": 2})
    assert [s["name"] for s in stages if s["name"].startswith("train_")] == ["train_2_dpo"]


def reaction(rid: str, value: str, prompt: str = "q") -> dict:
    provenance = {"source": "argilla", "annotator": "ann-a", "dataset": "heedful/r", "record_id": rid.split(":")[0]}
    return {"id": rid, "prompt": prompt, "response": "r", "reaction": value, "user_id": "ann-a", "provenance": provenance}


def test_human_reactions_that_are_all_love_cannot_train_kto(tmp_path):
    run = tmp_path / "round-001"
    save_rows([reaction("a:ann-a", "love"), reaction("b:ann-a", "love")], run / "human" / "reactions")
    assert trainable_counts(run / "pull", {"human_reactions": 2, "reactions": 0}) == {"human_reactions": 0, "reactions": 0}
    save_rows([reaction("a:ann-a", "love"), reaction("b:ann-a", "dislike")], run / "human" / "reactions")
    assert trainable_counts(run / "pull", {"human_reactions": 2}) == {"human_reactions": 2}


def test_a_reward_model_pools_the_human_reactions_of_every_round(tmp_path):
    from pipeline.loop_rewards import RewardStep, plan, reward_stages

    save_rows([reaction("a:ann-a", "love"), reaction("b:ann-a", "dislike")], tmp_path / "round-001" / "human" / "reactions")
    # round 2: a new one, and `b` again: the annotator changed their answer in Argilla
    save_rows([reaction("c:ann-a", "neutral"), reaction("b:ann-a", "love", "q2")], tmp_path / "round-002" / "human" / "reactions")
    steps = [RewardStep.model_validate({"kind": "plove", "from": "human_reactions", "min_records": 2})]
    round1 = {"round": 1, "run": "round-001", "counts": {"human_reactions": 2}}
    round2 = {"round": 2, "run": "round-002", "counts": {"human_reactions": 2}}
    (item,) = plan(steps, tmp_path, [round1, round2], round2)
    assert (
        item["trained"] and item["records"] == 3 and item["data"] == str(tmp_path / "round-002/reward_data/human_reactions.jsonl")
    )
    pooled = [json.loads(line) for line in Path(item["data"]).read_text().splitlines()]
    assert [(r["id"], r["reaction"], r["prompt"]) for r in pooled] == [
        ("a:ann-a", "love", "q"),
        ("b:ann-a", "love", "q2"),  # its newest version, in its first place
        ("c:ann-a", "neutral", "q"),
    ]
    assert reward_stages(steps, [item])[0]["inputs"] == {"feedback": item["data"]}
    (kept,) = plan(steps, tmp_path, [round1, round2], {**round2, "counts": {"human_reactions": 1}})
    assert not kept["trained"] and kept["why"] == "1 new human_reactions record(s) < min_records 2"


def test_the_pool_withdraws_by_each_later_rounds_answers(tmp_path):
    """Unit view of `pooled_rows`: round 2's pull saw `a` withdrawn (no longer live) and `b`
    answered again without a record (a tie); round 3 saw nothing new about them, yet they stay
    out; a row of another dataset and a round without answers.json (before argilla_pull v3)
    withdraw nothing."""
    from pipeline.loop_rewards import pooled_rows
    from stages.argilla_pull import write_answers

    def round_(name: str, rows: list[dict], live: set[str] | None, reread: set[str] = frozenset()) -> Path:
        folder = tmp_path / name / "human" / "reactions"
        save_rows(rows, folder)
        if live is not None:
            (folder.parent / "cursor").mkdir(parents=True, exist_ok=True)
            write_answers(folder.parent / "cursor", "heedful/r", set(live), set(reread))
        return folder

    elsewhere = {**reaction("e:ann-a", "love"), "provenance": {**reaction("e:ann-a", "love")["provenance"], "dataset": "x/y"}}
    old = round_("round-000", [reaction("z:ann-a", "love")], None)
    one = round_(
        "round-001", [reaction("a:ann-a", "love"), reaction("b:ann-a", "dislike"), elsewhere], {"a:ann-a", "b:ann-a", "z:ann-a"}
    )
    two = round_("round-002", [reaction("c:ann-a", "love")], {"b:ann-a", "c:ann-a", "z:ann-a"}, {"b:ann-a", "c:ann-a"})
    three = round_("round-003", [reaction("d:ann-a", "dislike")], {"b:ann-a", "c:ann-a", "d:ann-a", "z:ann-a"}, {"d:ann-a"})
    pool = pooled_rows([old, one, two, three])
    assert [r["id"] for r in pool.rows] == ["z:ann-a", "e:ann-a", "c:ann-a", "d:ann-a"]
    assert (pool.withdrawn, pool.left_out) == ([0, 0, 2, 0], 2)
    back = round_("round-004", [reaction("a:ann-a", "dislike")], {"a:ann-a", "b:ann-a", "c:ann-a", "d:ann-a"}, {"a:ann-a"})
    pool = pooled_rows([old, one, two, three, back])  # `a` answered again: back, in its new version
    assert [(r["id"], r["reaction"]) for r in pool.rows] == [
        ("e:ann-a", "love"),
        ("c:ann-a", "love"),
        ("d:ann-a", "dislike"),
        ("a:ann-a", "dislike"),
    ]
    # `z` (round 0) is not live in round 4's answers: withdrawn there; `b` stays out
    assert (pool.withdrawn, pool.left_out) == ([0, 0, 2, 0, 1], 2)


# -- against the real Argilla stack and a real server ------------------------------------------------

PAIRS = [
    {"prompt": f"Question {i}?", "chosen": f"A helpful answer {i}.", "rejected": f"no {i}", "source": "served"} for i in range(5)
]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed (`make setup`)")
def test_rounds_train_on_what_annotators_submitted_since_the_last_round(owner, annotators, tiny_model_path, tmp_path):  # noqa: F811
    from feedback.argilla_annotate import annotate

    from .test_loop import loop_file, server

    _push(owner, "loop-reviews", "preference", PAIRS)
    helpful = {}

    def prefer_helpful(task):  # A/B are shuffled: pick the helpful side
        helpful[task.id] = "a" if task.fields["response_a"].startswith("A helpful") else "b"
        return {"preference": helpful[task.id], "rationale": "it answers"}

    def ids_of(run_dir: Path) -> set[str]:
        return {r["id"] for r in load_rows(run_dir / "human" / "preferences", kind="preferences")}

    with server(tmp_path / "server") as live:
        runs = tmp_path / "runs"
        lenient = [{"metric": "kl_to_base", "max": 1000.0}, {"metric": "unfinished", "max": 1.0}]
        path = loop_file(
            tmp_path,
            live,
            "loop_h",
            lenient,
            train=[{"method": "dpo", "from": "human_preferences", "min_records": 2, "with": SMALL}],
            argilla={"dataset": "loop-reviews"},
        )

        def run_loop():
            return Loop(LoopFile(path), runs, use_ray=False).run(rounds=None, min_new=2, every=None, log=lambda *_: None)

        assert annotate("loop-reviews", prefer_helpful, client=annotators["ann-a"]["client"], limit=3) == 3
        first = set(helpful)
        (round1,) = run_loop()  # no served feedback at all: the 3 human preferences start the round
        here = runs / "loop_h" / "round-001"
        assert round1["counts"]["human_preferences"] == 3 and round1["trained"] == ["dpo"] and round1["deployed"]
        assert ids_of(here) == {f"{rid}:ann-a" for rid in first}
        for row in load_rows(here / "human" / "preferences"):  # the annotator's choice, whatever the A/B shuffle
            assert row["chosen"].startswith("A helpful") and row["provenance"]["dataset"] == "heedful/loop-reviews"
        dpo = next(s for s in json.loads((here / "pipeline.json").read_text())["config"]["stages"] if s["name"] == "train_1_dpo")
        assert dpo["inputs"]["preferences"] == "human.preferences"
        cursor1 = Path(round1["human_cursor"])
        assert cursor1 == here / "human" / "cursor" / "cursor.json"
        saved = cursor1.read_bytes()

        assert run_loop() == []  # nothing new in Argilla nor on the server: no round (counted before it)
        assert annotate("loop-reviews", prefer_helpful, client=annotators["ann-a"]["client"]) == 2
        (round2,) = run_loop()
        there = runs / "loop_h" / "round-002"
        assert round2["round"] == 2 and round2["human_cursor_in"] == str(cursor1)
        assert round2["counts"]["human_preferences"] == 2
        assert ids_of(there) == {f"{rid}:ann-a" for rid in set(helpful) - first}  # only what was submitted since
        assert cursor1.read_bytes() == saved  # round 1's cursor is read, never moved
        assert round2["current_version"] == round1["version_after"]

        # a kill before round 2's `human` stage committed: its rerun starts from the same cursor,
        # so it pulls the same records again, none lost, none of round 1's
        loop = LoopFile(path)
        Loop(loop, runs, use_ray=False).execute("replay", round_stages(loop, "pull", None, None, {}, human_cursor=str(cursor1)))
        assert ids_of(runs / "loop_h" / "replay") == ids_of(there)

        # what `heedful trace` reads for the deployed version: the Argilla records of both rounds
        card = json.loads((there / "export" / "package" / "heedful.json").read_text())
        traced = {(r["id"], r["source_stage"]) for r in card["feedback_records"] if r["kind"] == "preferences"}
        assert traced == {(i, "human") for i in ids_of(there)} | {(i, "round-001/human") for i in ids_of(here)}
        assert [e["human_cursor"] for e in load_state(runs / "loop_h")["rounds"]] == [str(cursor1), round2["human_cursor"]]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed (`make setup`)")
def test_the_reward_pool_leaves_out_answers_withdrawn_in_argilla_since(owner, annotators, tmp_path):  # noqa: F811
    """The loop's pulls do not accumulate (one round's records per round), so the reward models'
    pool merges every round's `human/preferences`. A preference an annotator later changed to a
    tie, one discarded and one whose record was deleted leave the pool from the round whose pull
    saw it (counted in that round's `withdrawn`), and stay out in later rounds that read nothing
    new about them; an answer given again comes back. The `human` stage runs as the loop
    configures it, each round from the previous round's cursor, against the real Argilla stack."""
    from feedback.argilla_annotate import annotate
    from feedback.argilla_client import api
    from pipeline.loop_rewards import RewardStep, plan, pooled_rows

    from .test_argilla import _answered, _revise

    _push(
        owner,
        "loop-withdrawn",
        "preference",
        [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)],
    )
    dpo = [{"method": "dpo", "from": "human_preferences", "with": SMALL}]
    rm = [{"kind": "followup", "from": "human_preferences", "with": {"followup": {"finetune": True}}}]
    loop = LoopFile(write_loop(tmp_path, train=dpo, rewards=rm, argilla={"dataset": "loop-withdrawn"}))
    runs = tmp_path / "runs"
    root = runs / loop.name
    driver = Loop(loop, runs, use_ray=False)
    logged: list[str] = []
    driver.log = logged.append
    steps = [RewardStep.model_validate(r) for r in rm]
    rounds: list[dict] = []

    def round_(number: int) -> tuple[dict, dict, list[dict]]:
        """Run round `number`'s human stage from the last round's cursor; its entry and reward plan."""
        cursor = str(root / rounds[-1]["run"] / "human" / "cursor" / "cursor.json") if rounds else None
        run = f"round-{number:03d}"
        (human,) = [s for s in round_stages(loop, "pull", None, None, {}, human_cursor=cursor) if s["name"] == HUMAN_STAGE]
        metrics = driver.execute(run, [human]).record(HUMAN_STAGE).metrics
        entry = {"round": number, "run": run, "counts": {"human_preferences": int(metrics["records"])}}
        rounds.append(entry)
        driver.state["rounds"] = rounds
        driver.count_withdrawn(entry)
        (item,) = plan(steps, root, rounds[:-1], entry)
        pooled = [json.loads(line) for line in Path(item["data"]).read_text().splitlines()] if item["trained"] else []
        return entry, item, pooled

    def good(task):
        return {"preference": "a" if task.fields["response_a"].startswith("good") else "b", "rationale": "correct"}

    annotate("loop-withdrawn", good, client=annotators["ann-a"]["client"])
    annotate("loop-withdrawn", lambda t: good(t) if t.fields["prompt"] == "Q0?" else None, client=annotators["ann-b"]["client"])
    entry1, item1, pool1 = round_(1)
    assert entry1["counts"]["human_preferences"] == 5 and entry1["withdrawn"] == {} and item1["withdrawn"] == 0
    ids = {(r["prompt"], r["provenance"]["annotator"]): r["id"] for r in pool1}
    assert len(pool1) == 5

    _revise(
        owner, annotators["ann-a"], "loop-withdrawn", "Q0?", {"values": {"preference": {"value": "tie"}}, "status": "submitted"}
    )
    _revise(owner, annotators["ann-a"], "loop-withdrawn", "Q1?", {"values": {}, "status": "discarded"})
    api(owner, "DELETE", f"/api/v1/records/{_answered(owner, 'loop-withdrawn', 'Q2?')['id']}", "delete a record")
    entry2, item2, pool2 = round_(2)  # nothing new: round 2 pulls no record, yet it sees the three withdrawn
    assert entry2["counts"]["human_preferences"] == 0 and entry2["withdrawn"] == {"human_preferences": 3}
    assert any("3 earlier human_preferences record(s) withdrawn" in line for line in logged)
    assert not item2["trained"]  # no new record: no refresh; the pool itself leaves the three out
    pool = pooled_rows([root / e["run"] / "human" / "preferences" for e in rounds])
    assert (pool.withdrawn, pool.left_out) == ([0, 3], 3)
    assert sorted(r["id"] for r in pool.rows) == sorted([ids["Q0?", "ann-b"], ids["Q3?", "ann-a"]])

    annotate("loop-withdrawn", good, client=annotators["ann-b"]["client"], limit=1)  # one new answer, nothing withdrawn
    entry3, item3, pool3 = round_(3)
    assert entry3["counts"]["human_preferences"] == 1 and entry3["withdrawn"] == {}
    (new,) = load_rows(root / "round-003" / "human" / "preferences")
    # round 3 read nothing about the three: they stay out, counted among the pool's withdrawn
    assert item3["trained"] and item3["withdrawn"] == 3 and item3["records"] == 3
    assert sorted(r["id"] for r in pool3) == sorted([ids["Q0?", "ann-b"], ids["Q3?", "ann-a"], new["id"]])
    data = Path(item3["data"]).read_bytes()
    assert plan(steps, root, rounds[:-1], entry3)[0]["data"] == item3["data"]  # a resumed round pools the same
    assert Path(item3["data"]).read_bytes() == data

    _revise(
        owner, annotators["ann-a"], "loop-withdrawn", "Q0?", {"values": {"preference": {"value": "a"}}, "status": "submitted"}
    )
    entry4, item4, pool4 = round_(4)  # the tie answered again: it comes back, once
    assert entry4["counts"]["human_preferences"] == 1 and entry4["withdrawn"] == {}
    assert item4["withdrawn"] == 2 and sorted(r["id"] for r in pool4) == sorted(
        [ids["Q0?", "ann-a"], ids["Q0?", "ann-b"], ids["Q3?", "ann-a"], new["id"]]
    )
