"""Simulated annotators into a REAL local Argilla: the simulator answers through the annotate hook,
and pulling gives the same records a person's answers would."""

from __future__ import annotations

import pytest

from .test_argilla import RESPONSES, _push, annotators, owner, stack  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["reaction", "verbal"])
def test_simulated_annotator_submits_through_the_hook(owner, annotators, tmp_path, tiny_model_path, kind):  # noqa: F811
    from feedback.argilla_annotate import annotate
    from feedback.argilla_sync import pull
    from feedback.simulator.cli import build_annotator
    from feedback.simulator.protocol import Judge
    from pipeline.llm import HFClient
    from pipeline.llm_cache import CachedLLM, LLMCache
    from pipeline.records import write_jsonl

    needs = tmp_path / "needs.jsonl"
    write_jsonl(
        [{"id": "p1", "prompt": RESPONSES[0]["prompt"], "need": "the capital city of France", "keywords": ["Paris"]}], needs
    )
    simulator = CachedLLM(HFClient("tiny"), LLMCache(tmp_path / "cache.sqlite"))
    annotator = build_annotator(simulator, Judge(simulator).calibrate(), kind, needs)
    submitted = {}

    def fn(task):
        answer = annotator(task)
        submitted[task.fields["response"]] = answer
        return answer

    name = f"sim-{kind}"
    _push(owner, name, kind, RESPONSES)
    assert annotate(name, fn, client=annotators["ann-b"]["client"], workspace="heedful") == len(RESPONSES)
    assert annotate(name, fn, client=annotators["ann-b"]["client"], workspace="heedful") == 0  # nothing pending
    records = pull(owner, name, "heedful").records
    assert len(records) == len(RESPONSES)
    for rec in records:
        answer = submitted[rec.response]
        assert rec.provenance.source == "argilla" and rec.provenance.annotator == "ann-b"
        if kind == "reaction":
            assert rec.reaction == answer["reaction"]
        else:
            assert (rec.critique, rec.judgment) == (answer["critique"], answer["judgment"])
    # "It is Lyon." mentions none of the need's facts: never satisfied, whatever the tiny model thinks
    lyon = submitted["It is Lyon."]
    assert lyon.get("judgment", "needs_work") == "needs_work" and lyon.get("reaction") != "love"
