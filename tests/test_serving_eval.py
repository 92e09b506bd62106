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


def test_concurrent_asking_keeps_stream_order_and_raises_the_first_error():
    """The replies come back in stream order however the requests finish, several are in flight at
    once, and a failing request fails the evaluation rather than leaving a hole."""
    import random
    import threading
    import time

    from serving.stream_eval import _asked_together

    in_flight, most, lock = 0, 0, threading.Lock()

    def ask(task):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(random.Random(task["i"]).uniform(0.0, 0.02))  # finish out of order
        with lock:
            in_flight -= 1
        if task.get("boom"):
            raise RuntimeError("engine down")
        return {"i": task["i"]}

    seen: list[int] = []
    stream = [{"i": i} for i in range(60)]
    assert [r["i"] for r in _asked_together(ask, stream, seen.append)] == list(range(60))
    assert most > 1 and seen == [25, 50, 60]
    with pytest.raises(RuntimeError, match="engine down"):
        _asked_together(ask, stream[:10] + [{"i": 10, "boom": True}])
    assert _asked_together(ask, []) == []


def test_conditions_without_memory_go_through_the_engines_batches(tiny_model_path):
    """`no_memory` and `oracle` reach the served engine's micro-batcher several queries at a time;
    `memory` one by one. That the replies are each query's own, in stream order, is the test above's;
    that batched greedy replies equal unbatched ones, tests/test_serving_batching.py's (here every
    `tiny` reply to the long few-shot prompt is the same text, even with a random adapter)."""
    from serving.engine import ChatEngine

    conditions: list = ["no_memory", "oracle", "memory"]
    settings = StreamEvalSettings(model="tiny", n=12, seed=0, conditions=conditions, max_tokens=4, engine="hf")
    engine = ChatEngine("tiny", engine="hf", max_batch=16, batch_window=0.05)
    sizes: list[int] = []
    run_batch = engine._generate_batch
    engine._generate_batch = lambda jobs: sizes.append(len(jobs)) or run_batch(jobs)  # type: ignore[method-assign]
    try:
        report = run_stream_eval(TASKS, settings, engine=engine)
    finally:
        engine.close()
    assert sum(sizes) == 36 and max(sizes) > 1
    assert sizes[-12:] == [1] * 12  # the memory condition, last: one query at a time, in order
    for condition in conditions:
        assert report["summary"][condition]["concurrent"] is (condition != "memory")


@pytest.mark.slow
def test_memory_beats_no_memory_on_smollm2(smollm2_path):
    """On CTranslate2, named (the probe's choice varies by machine), whose cache of the few-shot start
    every query shares makes this stream ~2x faster than HF."""
    settings = StreamEvalSettings(model="smollm2-135m", n=24, seed=0, conditions=["no_memory", "memory"], engine="ct2")
    summary = run_stream_eval(TASKS, settings)["summary"]
    assert summary["memory"]["memory_used"] > 0
    assert summary["memory"]["accuracy"] > summary["no_memory"]["accuracy"]
