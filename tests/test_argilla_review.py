"""Asking people to review what the reward models are unsure or disagree about.

Pure tests check the selection by hand-computed cases (scores are powers of two apart so
distances are exact); the slow test runs score -> argilla_push (select) -> annotate ->
argilla_pull against the real local Argilla stack of tests/test_argilla.py.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from pydantic import ValidationError

if shutil.which("redis-server"):  # the real stack's fixtures (one stack for this module)
    from .test_argilla import annotators, owner, stack  # noqa: F401


def _select(rows, **cfg):
    from feedback.argilla_review import ReviewSelection, candidates, select

    sel = ReviewSelection(**cfg)
    return select(candidates([(r["id"], (i,)) for i, r in enumerate(rows)], rows, sel, "records.jsonl"), sel)


def _ids(choices):
    return [c.id for c in choices]


LOVE = [  # P[Love] -> distance to 0.5
    {"id": "a", "reward": 0.9375},  # .4375
    {"id": "b", "reward": 0.5625},  # .0625
    {"id": "c", "reward": 0.125},  # .375
    {"id": "d", "reward": 0.4375},  # .0625 (ties with b: id order)
    {"id": "e", "reward": 0.625},  # .125
    {"id": "f", "reward": 0.6875},  # .1875
    {"id": "g", "reward": 0.46875},  # .03125
]


def test_low_confidence_takes_the_closest_to_the_boundary_within_the_band():
    assert _ids(_select(LOVE, by="low_confidence", band=(0.25, 0.75), top_k=3)) == ["g", "b", "d"]
    assert _ids(_select(LOVE, by="low_confidence", band=(0.25, 0.75))) == ["g", "b", "d", "e", "f"]
    assert _ids(_select(LOVE, by="low_confidence", top_k=4)) == ["g", "b", "d", "e"]
    assert _ids(_select(LOVE, by="low_confidence", band=(0.5, 1.0), top_k=2)) == ["b", "e"]  # band is inclusive
    assert _ids(_select(LOVE, by="low_confidence", band=(0.125, 0.125))) == ["c"]
    # a scalar reward model: the boundary moves
    assert _ids(_select(LOVE, by="low_confidence", boundary=0.0, top_k=2)) == ["c", "d"]
    first = _select(LOVE, by="low_confidence", top_k=1)[0]
    assert first.metadata() == {
        "review_reason": "low_confidence",
        "review_score": 0.46875,
        "review_detail": "reward 0.469: 0.0312 from the boundary 0.5",
    }


def test_all_keeps_input_order_and_still_honours_band_and_top_k():
    assert _ids(_select(LOVE, by="all")) == list("abcdefg")
    assert _ids(_select(LOVE, by="all", band=(0.5, 1.0), top_k=2)) == ["a", "b"]
    assert _select(LOVE, by="all")[0].detail == "reward 0.938"


def test_disagreement_of_two_reward_models_in_sign():
    rows = [
        {"id": "x", "reward": 0.9, "reward_b": 0.2},  # disagree, primary .4 from 0.5
        {"id": "y", "reward": 0.3, "reward_b": 0.8},  # disagree, .2
        {"id": "z", "reward": 0.7, "reward_b": 0.6},  # agree
        {"id": "w", "reward": 0.5, "reward_b": 0.1},  # primary on the boundary: no side
        {"id": "v", "reward": 0.45, "reward_b": 0.55},  # disagree, .05
        {"id": "u", "reward": 0.2, "reward_b": 0.5},  # other on its boundary: no side
    ]
    got = _select(rows, by="disagreement", against="reward_b")
    assert _ids(got) == ["x", "y", "v"]  # the most confident contradictions first
    assert got[0].detail == "reward 0.9 (above 0.5) vs reward_b 0.2 (below 0.5)"
    assert _ids(_select(rows, by="disagreement", against="reward_b", top_k=2)) == ["x", "y"]
    assert _ids(_select(rows, by="disagreement", against="reward_b", band=(0.0, 0.5))) == ["y", "v"]
    # the second model is a logit (boundary 0): 0.2 and 0.8 are both "positive" now
    logits = [{"id": "p", "reward": 0.9, "rm_logit": -1.5}, {"id": "q", "reward": 0.3, "rm_logit": 0.8}]
    assert _ids(_select(logits, by="disagreement", against="rm_logit", against_boundary=0.0)) == ["p", "q"]
    assert _ids(_select(logits, by="disagreement", against="rm_logit", against_boundary=1.0)) == ["p"]


def test_disagreement_of_the_reward_model_and_the_users_reaction():
    rows = [
        {"id": "r1", "reward": 0.9, "reaction": "dislike"},  # disagree, .4
        {"id": "r2", "reward": 0.8, "reaction": "love"},  # agree
        {"id": "r3", "reward": 0.2, "reaction": "thumbs_up"},  # disagree, .3
        {"id": "r4", "reward": 0.3, "reaction": "neutral"},  # the user took no side
        {"id": "r5", "reward": 0.1, "reaction": "thumbs_down"},  # agree
        {"id": "r6", "reward": 0.6, "reaction": False},  # a KTO label: disagree, .1
    ]
    got = _select(rows, by="disagreement", against="reaction")
    assert _ids(got) == ["r1", "r3", "r6"]
    assert got[0].metadata()["review_detail"] == "reward 0.9 (above 0.5) vs reaction dislike"


def test_pairs_are_judged_by_their_margin_around_zero():
    from feedback.argilla_items import sourced_items
    from feedback.argilla_review import ReviewSelection, candidates, select

    pairs = [  # the score stage's best-of-n pairs carry score_chosen / score_rejected
        {"prompt": "q1", "chosen": "a", "rejected": "b", "score_chosen": 0.875, "score_rejected": 0.125},  # .75
        {"prompt": "q2", "chosen": "a", "rejected": "b", "score_chosen": 0.5625, "score_rejected": 0.5},  # .0625
        {"prompt": "q3", "chosen": "a", "rejected": "b", "score_chosen": 0.75, "score_rejected": 0.5},  # .25
    ]
    sel = ReviewSelection(by="low_confidence", score="score", top_k=2)  # boundary 0.5 is for single replies only
    sourced = sourced_items(pairs, "preference", "auto", {})
    got = select(candidates([(i.id, idx) for i, idx in sourced], pairs, sel, "pairs"), sel)
    assert [c.score for c in got] == [0.0625, 0.25]
    assert got[0].detail == "score margin chosen-rejected 0.0625: 0.0625 from the boundary 0"
    # replies the preference template pairs up (0 vs 1, 2 vs 3): margin A - B of their rewards
    replies = [
        {"prompt_id": "p", "sample_index": k, "prompt": "q", "response": f"r{k}", "reward": r}
        for k, r in enumerate((0.75, 0.25, 0.5, 0.53125))
    ]
    sourced = sourced_items(replies, "preference", "responses", {})
    assert [idx for _, idx in sourced] == [(0, 1), (2, 3)]
    sel = ReviewSelection(by="low_confidence", top_k=1)
    got = select(candidates([(i.id, idx) for i, idx in sourced], replies, sel, "replies"), sel)
    assert got[0].id == sourced[1][0].id and got[0].score == -0.03125


def test_scores_input_is_joined_by_prompt_and_reply():
    from feedback.argilla_review import ReviewSelection, candidates, select
    from pipeline.errors import DataError

    records = [{"prompt": "q", "response": f"r{k}", "reaction": "love"} for k in range(3)]
    scores = [{"prompt": "q", "response": f"r{k}", "reward": k / 4} for k in (2, 0, 1)] + [
        {"prompt": "other", "response": "r0", "reward": 1.0}
    ]
    sel = ReviewSelection(by="disagreement", against="reaction")
    got = candidates([(f"i{k}", (k,)) for k in range(3)], records, sel, "records", scores, "scores.jsonl")
    assert [(c.score, c.against_side) for c in got] == [(0.0, 1), (0.25, 1), (0.5, 1)]  # reward there, reaction here
    assert [c.id for c in select(got, sel)] == ["i0", "i1"]  # 0.5 is on the boundary: no disagreement
    with pytest.raises(DataError, match=r"records row 3: no row of scores.jsonl has the same prompt and reply"):
        candidates([("i3", (3,))], [*records, {"prompt": "q", "response": "new"}], sel, "records", scores, "scores.jsonl")


def test_bad_scores_and_configs_are_named():
    from feedback.argilla_review import ReviewSelection
    from pipeline.errors import DataError

    with pytest.raises(DataError, match=r"records.jsonl row 1: field 'reward' is missing"):
        _select([{"id": "a", "reward": 0.1}, {"id": "b"}], by="all")
    with pytest.raises(DataError, match=r"records.jsonl row 0: field 'reward': expected a number, got 'high'"):
        _select([{"id": "a", "reward": "high"}], by="all")
    with pytest.raises(DataError, match=r"row 0 \(select.against 'reaction'\): field 'reaction': 'meh' is not one of"):
        _select([{"id": "a", "reward": 0.1, "reaction": "meh"}], by="disagreement", against="reaction")
    for bad, message in (
        ({"by": "low_confidence"}, "would select every item"),
        ({"by": "disagreement"}, "needs `against`"),
        ({"by": "all", "band": (0.7, 0.3)}, "lo must not exceed hi"),
        ({"by": "low_confidence", "top_k": 1, "against": "reaction"}, "only read by `by: disagreement`"),
        ({"by": "disagreement", "against": "reward"}, "same column"),
        ({"by": "all", "top_k": 0}, "greater than or equal to 1"),
        ({"by": "sometimes"}, "low_confidence"),
    ):
        with pytest.raises(ValidationError, match=message):
            ReviewSelection(**bad)


def test_push_config_without_select_dumps_as_before():
    """No `select`: the config (and so the stage's fingerprint) is what it was before."""
    from stages.argilla_push import ArgillaPushConfig

    plain = ArgillaPushConfig(dataset="d").model_dump(mode="json")
    assert "select" not in plain and set(plain) == {
        "dataset",
        "template",
        "argilla",
        "input_format",
        "import_user",
        "max_items",
        "batch_size",
    }
    review = ArgillaPushConfig.model_validate({"dataset": "d", "select": {"by": "low_confidence", "top_k": 5}})
    assert review.model_dump(mode="json")["select"]["top_k"] == 5


# -- against the real Argilla server -----------------------------------------------------------


def stated_love(prompts, responses):
    """A 'reward model' that reads P[Love] from the reply ("... p=0.5625"): hand-computable."""
    return [float(re.search(r"p=([0-9.]+)", r).group(1)) for r in responses]


P_LOVE = [0.9375, 0.5625, 0.125, 0.40625, 0.625, 0.6875, 0.46875]  # distances to 0.5 differ: no ties


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed (`make setup`)")
def test_review_push_selects_once_and_annotations_come_back_as_training_records(owner, annotators, tmp_path):  # noqa: F811
    from feedback.argilla_annotate import annotate
    from feedback.argilla_client import api
    from feedback.argilla_sync import find_dataset
    from feedback.argilla_templates import stable_id
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows
    from pipeline.runner import Runner
    from trainers.kto import unpaired_rows

    data = tmp_path / "responses.jsonl"
    replies = [{"prompt_id": f"p{i}", "prompt": f"Question {i}?", "response": f"Answer p={p}"} for i, p in enumerate(P_LOVE)]
    data.write_text("".join(json.dumps(r) + "\n" for r in replies))
    ids = {p: stable_id(r["prompt"], r["response"]) for p, r in zip(P_LOVE, replies)}
    spec = {
        "run_name": "review",
        "model": "tiny",
        "stages": [
            {
                "name": "score",
                "uses": "score",
                "inputs": {"responses": str(data)},
                "with": {"function": "tests.test_argilla_review:stated_love", "best_of_n": False},
            },
            {
                "name": "push",
                "uses": "argilla_push",
                "inputs": {"records": "score.responses"},
                "with": {
                    "dataset": "review",
                    "template": {"kind": "reaction"},
                    "select": {"by": "low_confidence", "band": [0.25, 0.75], "top_k": 3},
                },
            },
            {"name": "pull", "uses": "argilla_pull", "inputs": {"pushed": "push.pushed"}, "with": {"accumulate": True}},
        ],
    }

    def run(force=()):
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False, force=set(force)).execute()
        assert result.ok, [r.error for r in result.records]
        return {r.name: r for r in result.records}, result.run_dir

    def in_dataset():
        ds = find_dataset(owner, "review", "heedful")
        res = api(owner, "GET", f"/api/v1/datasets/{ds.id}/records", "list", params={"limit": 1000})
        return {r["external_id"]: r["metadata"] for r in res["items"]}

    recs, run_dir = run()
    assert (recs["push"].metrics["created"], recs["push"].metrics["selected"]) == (3, 3)
    chosen = [0.46875, 0.5625, 0.40625]  # hand-computed: the 3 closest to 0.5 inside [0.25, 0.75]
    assert set(in_dataset()) == {ids[p] for p in chosen}
    for p in chosen:
        meta = in_dataset()[ids[p]]
        assert (meta["review_reason"], meta["review_score"]) == ("low_confidence", p)
        assert meta["review_detail"] == f"reward {p:.3g}: {abs(p - 0.5):.3g} from the boundary 0.5"
    pushed = load_rows(run_dir / "push" / "pushed")
    assert [r["review_score"] for r in pushed] == chosen and not any(r["already_pushed"] for r in pushed)

    # a rerun asks nobody twice
    recs, run_dir = run(force=["push"])
    metrics = recs["push"].metrics
    assert (metrics["created"], metrics["updated"], metrics["already_pushed"]) == (0, 0, 3)  # not even re-upserted
    assert len(in_dataset()) == 3 and all(r["already_pushed"] for r in load_rows(run_dir / "push" / "pushed"))

    # the annotator sees the reason (and not the hidden bookkeeping), answers, and pull reads it back
    seen = {}

    def react(task):
        seen[task.id] = task.metadata
        return {"reaction": "love" if task.id == ids[0.5625] else "dislike"}

    assert annotate("review", react, client=annotators["ann-a"]["client"], workspace="heedful") == 3
    assert all(set(meta) == {"review_reason", "review_score", "review_detail"} for meta in seen.values())
    recs, run_dir = run(force=["pull"])
    assert recs["pull"].metrics["new"] == 3
    reactions = load_rows(run_dir / "pull" / "reactions", kind="reactions")  # the schema a trainer reads
    assert {r["provenance"]["record_id"] for r in reactions} == {ids[p] for p in chosen}
    assert {(r["provenance"]["source"], r["provenance"]["dataset"], r["provenance"]["annotator"]) for r in reactions} == {
        ("argilla review", "heedful/review", "ann-a")
    }
    assert all(json.loads(r["provenance"]["extra"])["review"]["reason"] for r in reactions)
    kto = unpaired_rows(reactions, "pulled reactions")  # what the kto stage trains on
    assert sorted(r["label"] for r in kto) == [False, False, True]

    # a larger budget next time: only the new item is pushed
    spec["stages"][1]["with"]["select"]["top_k"] = 4
    recs, _ = run()
    assert (recs["push"].metrics["created"], recs["push"].metrics["already_pushed"]) == (1, 3)
    assert set(in_dataset()) == {ids[p] for p in [*chosen, 0.625]}
