"""c3po_data's held-out split is by prompt, as the `split` stage's (pipeline/prompt_groups.py): copies
of one prompt (a repeat, the same last user turn) never land both in `train` and in `eval_prompts`,
whatever the seed; with one row per prompt it holds out what its per-row draw (version 4) held
out. Its `batch_size` is part of the fingerprint: HF generate seeds each batch of sampled baselines."""

from __future__ import annotations

import copy
import json
import random

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.prompt_groups import group_key
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from stages.c3po_data import assign_splits
from trainers.feedback_eval import SCOPES

SEEDS = range(8)
FEEDBACK = 'When I ask about cooking, start your answer with "Chef\'s tip:".'


def scoped_rows(copies: bool = True, per_scope: int = 10) -> list[dict]:
    """`per_scope` prompts per scope (as `given_prompts` makes them: split ""); with `copies`,
    prompts 0..3 of each scope come twice more: word for word, and with a trailing space."""
    rows = []
    for scope in SCOPES:
        for i in range(per_scope):
            rows.append({"id": f"{scope}-{i}", "scope": scope, "prompt": f"{scope} question {i}?", "split": ""})
        if copies:
            for i in range(4):
                rows.append({"id": f"{scope}-{i}-again", "scope": scope, "prompt": f"{scope} question {i}?", "split": ""})
                rows.append({"id": f"{scope}-{i}-space", "scope": scope, "prompt": f"{scope} question {i}? ", "split": ""})
    return rows


def leaked(rows: list[dict]) -> set[str]:
    """The prompts found on both sides."""
    train = {group_key(r, -1) for r in rows if r["split"] == "train"}
    return train & {group_key(r, -1) for r in rows if r["split"] == "eval"}


def test_copies_of_a_prompt_are_held_out_together_whatever_the_seed():
    chosen = set()
    for seed in SEEDS:
        rows = assign_splits(scoped_rows(), 0.3, seed)
        assert not leaked(rows), seed
        for scope in SCOPES:  # 18 rows of 10 prompts per scope, 0.3: 5 rows as close as whole prompts allow
            held = sum(r["scope"] == scope and r["split"] == "eval" for r in rows)
            assert 3 <= held <= 7, (seed, scope, held)
            assert any(r["scope"] == scope and r["split"] == "train" for r in rows), (seed, scope)
        chosen.add(tuple(sorted(r["id"] for r in rows if r["split"] == "eval")))
    assert len(chosen) > 1  # the seed does choose


def version_4(rows: list[dict], eval_fraction: float, seed: int) -> list[dict]:
    """c3po_data version 4's per-row draw, word for word."""
    rng = random.Random(seed)
    for scope in SCOPES:
        free = [r for r in rows if r["scope"] == scope and not r["split"]]
        rng.shuffle(free)
        n_eval = round(len(free) * eval_fraction)
        for k, row in enumerate(free):
            row["split"] = "eval" if k < n_eval else "train"
    return rows


def test_distinct_prompts_are_held_out_as_version_4_held_them_out():
    """One row per prompt: the rows held out are those of version 4's shuffle, every seed and
    fraction, rows with their own split among them (a scope shuffled in turn from one generator)."""
    for seed in SEEDS:
        for fraction in (0.1, 0.25, 0.3, 0.5):
            rows = scoped_rows(copies=False, per_scope=7)
            for row in rows[::5]:
                row["split"] = "train"
            for row in rows[2::7]:
                row["split"] = "eval"
            want = [r["split"] for r in version_4(copy.deepcopy(rows), fraction, seed)]
            assert [r["split"] for r in assign_splits(rows, fraction, seed)] == want, (seed, fraction)


def test_a_rows_own_split_pulls_its_copies_and_both_sides_are_an_error():
    rows = scoped_rows()
    rows[0]["split"] = "eval"  # in_scope question 0; its two copies come later, unmarked
    rows[1]["split"] = "train"
    for seed in SEEDS:
        got = assign_splits(copy.deepcopy(rows), 0.3, seed)
        assert {r["split"] for r in got if group_key(r, -1) == "in_scope question 0?"} == {"eval"}
        assert {r["split"] for r in got if group_key(r, -1) == "in_scope question 1?"} == {"train"}
        assert not leaked(got)
    rows[10]["split"] = "train"  # in_scope question 0 again, marked for the other side
    with pytest.raises(DataError, match=r"'in_scope question 0\?' are marked for both sides: train at p10; eval at p0"):
        assign_splits(rows, 0.3, 0, places=[f"p{i}" for i in range(len(rows))])


def test_a_prompt_in_two_scopes_goes_where_the_first_sent_it():
    rows = scoped_rows(copies=False)
    rows.append({"id": "dup", "scope": "out_of_scope", "prompt": "in_scope question 3?", "split": ""})
    for seed in SEEDS:
        assert not leaked(assign_splits(copy.deepcopy(rows), 0.3, seed)), seed


def c3po_data_stage(prompts, **with_) -> dict:
    return {
        "name": "data",
        "uses": "c3po_data",
        "inputs": {"prompts": str(prompts)},
        "with": {
            "feedback": FEEDBACK,
            "reviser": "template",
            "revision_template": "Chef's tip: {response}",
            "engine": "hf",
            "baseline_sampling": {"max_new_tokens": 6, "temperature": 0.7},
            **with_,
        },
    }


def run_data(tmp_path, prompts, seed=0, **with_):
    pipe = {"run_name": "data", "model": "tiny", "seed": seed, "stages": [c3po_data_stage(prompts, **with_)]}
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    return result


def test_the_stage_never_trains_on_a_held_out_prompt(tmp_path, tiny_model_path):
    """On a prompts file with repeats: no prompt of `eval_prompts` is among the training rows, and
    a prompt written twice word for word (the same scope, no id: the same derived id) is one
    held-out prompt (version 6), while its copy with a trailing space is another item and stays."""
    rows = [{k: r[k] for k in ("prompt", "scope")} for r in scoped_rows(per_scope=4)]
    write_jsonl(rows, tmp_path / "prompts.jsonl")
    for seed in (0, 1):
        result = run_data(tmp_path, tmp_path / "prompts.jsonl", seed=seed)
        train = load_rows(result.run_dir / "data" / "train")
        held_out = load_rows(result.run_dir / "data" / "eval_prompts")
        assert {group_key(r, -1) for r in train}.isdisjoint({group_key(r, -1) for r in held_out}), seed
        # each scope holds out one prompt's 3 rows (4 of 12 as close as whole prompts allow): its exact repeat goes
        assert [r["prompt"].endswith(" ") for r in held_out] == [False, True] * 3, seed
        assert len({r["id"] for r in held_out}) == len(held_out), seed
        assert result.record("data").metrics["eval_duplicates_dropped"] == 3
        assert len(train) + len(held_out) + 3 == len(rows)


def test_batch_size_is_part_of_the_fingerprint(tmp_path, tiny_model_path):
    """HF generate seeds each batch of baselines (seed + b) and samples them at a temperature, so
    another `batch_size` writes other baselines: a run with it is not skipped as up to date."""
    rows = [{"prompt": r["prompt"], "scope": r["scope"], "split": "train"} for r in scoped_rows(copies=False, per_scope=4)]
    write_jsonl(rows, tmp_path / "prompts.jsonl")
    baselines, statuses = [], []
    for with_ in ({}, {"batch_size": 1}, {"batch_size": 1, "device": "cpu"}):
        result = run_data(tmp_path, tmp_path / "prompts.jsonl", **with_)
        statuses.append(result.record("data").status)
        baselines.append([r["baseline"] for r in load_rows(result.run_dir / "data" / "train")])
        manifest = json.loads((result.run_dir / "data" / "manifest.json").read_text())
    assert statuses == ["done", "done", "skipped"]  # batch_size reruns; the device does not
    assert manifest["config"]["batch_size"] == 1
    assert baselines[1] != baselines[0]  # the same seed, other batches: other sampled baselines
