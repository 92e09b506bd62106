"""The streaming evaluation: the simulated user clarifies wrong answers and memory carries them forward."""

from __future__ import annotations

import pytest

from pipeline.paths import resolve_data_ref
from serving.stream_eval import StreamEvalSettings, make_stream, named_relation, run_stream_eval

TASKS = resolve_data_ref("data:memprompt/wordnet_stream.jsonl")


def test_named_relation_is_the_first_one_mentioned():
    assert named_relation("the synonym for roomy is spacious") == "syn"
    assert named_relation("The Antonym (not the synonym) of hot is cold") == "ant"
    assert named_relation("a homonym of wring is ring") == "hom"
    assert named_relation("spacious") is None


def test_stream_is_seeded_and_queries_hide_the_relation():
    a, b = make_stream(TASKS, 30, seed=3), make_stream(TASKS, 30, seed=3)
    assert a == b and a != make_stream(TASKS, 30, seed=4)
    for task in a:
        assert task["word1"] in task["query"]
        assert not any(w in task["query"].lower() for w in ("synonym", "antonym", "homophone"))


def test_clarifications_flow_into_memory_and_come_back_for_the_same_phrasing(tiny_model_path):
    """The random tiny model never names the relation, so every query is wrong: the user clarifies the first
    query of each phrasing, and every later query with that phrasing retrieves exactly that clarification."""
    settings = StreamEvalSettings(model="tiny", n=24, seed=0, conditions=["memory"], max_tokens=3)
    report = run_stream_eval(TASKS, settings)
    rows = report["results"]["memory"]
    seen: set[str] = set()
    for row in rows:
        if row["phrasing"] in seen:
            assert [m["clarification"] for m in row["memory"]] == [row["clarification"]]
        else:
            assert row["memory"] == []
        if not row["correct"]:
            assert row["clarified"]
            seen.add(row["phrasing"])
    summary = report["summary"]["memory"]
    assert summary["memory_used"] == summary["memory_used_correct_clarification"] == 24 - len(seen)


def test_conditions_without_memory_ask_at_once_and_get_the_replies_asked_alone(tiny_model_path):
    """No query of `no_memory` or `oracle` depends on another, so they are sent together and the engine
    batches them; greedy, each reply is the one the query gets alone (an engine that never batches)."""
    from serving.engine import ChatEngine

    settings = StreamEvalSettings(model="tiny", n=12, seed=0, conditions=["no_memory", "oracle"], max_tokens=4, engine="hf")
    batched, alone = (
        ChatEngine("tiny", engine="hf", max_batch=16, batch_window=0.05),
        ChatEngine("tiny", engine="hf", max_batch=1),
    )
    sizes: list[int] = []
    run_batch = batched._generate_batch
    batched._generate_batch = lambda jobs: sizes.append(len(jobs)) or run_batch(jobs)  # type: ignore[method-assign]
    try:
        together = run_stream_eval(TASKS, settings, engine=batched)["results"]
        one_by_one = run_stream_eval(TASKS, settings, engine=alone)["results"]
    finally:
        batched.close()
        alone.close()
    assert sum(sizes) == 24 and max(sizes) > 1  # every query went through the batcher, several at once
    for condition in ("no_memory", "oracle"):
        assert [r["query"] for r in together[condition]] == [r["query"] for r in one_by_one[condition]]  # stream order
        assert [r["reply"] for r in together[condition]] == [r["reply"] for r in one_by_one[condition]]


@pytest.mark.slow
def test_memory_beats_no_memory_on_smollm2(smollm2_path):
    """On CTranslate2, named (the probe's choice varies by machine), whose cache of the few-shot start
    every query shares makes this stream ~2x faster than HF."""
    settings = StreamEvalSettings(model="smollm2-135m", n=24, seed=0, conditions=["no_memory", "memory"], engine="ct2")
    summary = run_stream_eval(TASKS, settings)["summary"]
    assert summary["memory"]["memory_used"] > 0
    assert summary["memory"]["accuracy"] > summary["no_memory"]["accuracy"]
