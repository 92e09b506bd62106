"""The arena's verbal validation split (`validation_split`) splits by prompt, as `split` does: copies
of one prompt (a repeat, a chat asking the same last user turn, a prompt in two scopes) never land
both in the fit part and among the validation prompts, whatever the seed; with one row per prompt
it picks what its per-row draw (version 1) picked; a scope of one prompt cannot be split."""

from __future__ import annotations

import random

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.prompt_groups import group_key
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from stages.validation_split import split_by_scope
from trainers.feedback_eval import SCOPES

SEEDS = range(8)


def c3po_rows(copies: bool = True, chats: bool = True) -> list[dict]:
    """8 prompts per scope (c3po_data's training rows); with `copies`, prompts 0..3 of each scope
    come twice more: once as a chat with a system turn (else word for word), once with a trailing space."""
    rows = []
    for scope in SCOPES:
        for i in range(8):
            rows.append({"id": f"{scope}-{i}", "scope": scope, "prompt": f"{scope} question {i}?", "baseline": "b"})
        if copies:
            for i in range(4):
                chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{scope} question {i}?"}]
                again = chat if chats else f"{scope} question {i}?"
                rows.append({"id": f"{scope}-{i}-chat", "scope": scope, "prompt": again, "baseline": "b"})
                rows.append({"id": f"{scope}-{i}-again", "scope": scope, "prompt": f"{scope} question {i}? ", "baseline": "b"})
    return rows


def leaked(fit: list[dict], validation: list[dict]) -> set[str]:
    """The prompts found on both sides."""
    return {group_key(r, -1) for r in fit} & {group_key(r, -1) for r in validation}


def test_copies_of_a_prompt_validate_together_whatever_the_seed():
    rows = c3po_rows()
    chosen = set()
    for seed in SEEDS:
        fit, validation = split_by_scope(rows, 0.25, seed)
        assert not leaked(fit, validation), seed
        assert len(fit) + len(validation) == len(rows)
        for scope in SCOPES:  # 16 rows of 8 prompts per scope, a quarter: 4 rows as close as whole prompts allow
            assert 3 <= sum(r["scope"] == scope for r in validation) <= 5, (seed, scope)
            assert any(r["scope"] == scope for r in fit), (seed, scope)
        chosen.add(tuple(sorted(r["id"] for r in validation)))
    assert len(chosen) > 1  # the seed does choose


def run_stage(folder, path, seed: int):
    """The stage on the file `path` (run in `folder`): (its result, its fit rows, its validation rows)."""
    data = {
        "run_name": f"validation{seed}",
        "model": "tiny",
        "seed": seed,
        "stages": [{"name": "validation", "uses": "validation_split", "inputs": {"data": str(path)}}],
    }
    result = Runner(pipeline_from_dict(data, folder), folder / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    return result, load_rows(result.run_dir / "validation" / "fit"), load_rows(result.run_dir / "validation" / "validation")


def test_the_stage_keeps_a_prompts_rows_on_one_side(tmp_path):
    """The stage on a file (version 2): fit and validation share no prompt (text prompts only: a
    dataset column holds one type)."""
    path = tmp_path / "c3po.jsonl"
    write_jsonl(c3po_rows(chats=False), path)
    for seed in (0, 1, 2):
        result, fit, validation = run_stage(tmp_path / str(seed), path, seed)
        assert not leaked(fit, validation), seed
        assert len(fit) + len(validation) == 48


def version_1(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """validation_split v1's per-row draw, for comparison."""
    fit, validation = [], []
    for scope in SCOPES:
        mine = [r for r in rows if r["scope"] == scope]
        order = list(range(len(mine)))
        random.Random(f"{seed}:{scope}").shuffle(order)
        n = min(len(mine) - 1, max(1, round(len(mine) * fraction)))
        picked = set(order[:n])
        validation += [r for k, r in enumerate(mine) if k in picked]
        fit += [r for k, r in enumerate(mine) if k not in picked]
    return fit, validation


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.34, 0.5, 0.9])
def test_one_row_per_prompt_picks_what_version_1_picked(fraction):
    rows = c3po_rows(copies=False)
    for seed in SEEDS:
        assert split_by_scope(rows, fraction, seed) == version_1(rows, fraction, seed), (seed, fraction)


def test_a_prompt_in_two_scopes_goes_where_the_first_scope_sent_it():
    rows = c3po_rows(copies=False)
    # in_scope's prompt 0 asked again as a near-scope prompt (a system turn set the context otherwise)
    chat = [{"role": "system", "content": "Not about cooking."}, {"role": "user", "content": "in_scope question 0?"}]
    rows.append({"id": "near-copy", "scope": "near_scope", "prompt": chat, "baseline": "b"})
    went = set()
    for seed in range(16):
        fit, validation = split_by_scope(rows, 0.25, seed)
        assert not leaked(fit, validation), seed
        for scope in SCOPES:
            assert any(r["scope"] == scope for r in validation) and any(r["scope"] == scope for r in fit), (seed, scope)
        went.add(any(r["id"] == "near-copy" for r in validation))
    assert went == {True, False}  # both sides happen, always with the in-scope original


def test_a_scope_of_one_prompt_cannot_be_split():
    rows = [r for r in c3po_rows(copies=False) if r["scope"] != "near_scope"]
    rows += [{"scope": "near_scope", "prompt": "The same near question?", "baseline": f"b{i}"} for i in range(4)]
    with pytest.raises(DataError, match=r"the 4 training rows of scope near_scope ask 1 different prompts"):
        split_by_scope(rows, 0.25, 0)


def test_a_row_of_no_known_scope_is_an_error_naming_it():
    """Not a training row silently left out of both sides (a file input is checked against c3po_data's
    schema before the stage runs; this is the stage's own check, for rows from upstream)."""
    rows = c3po_rows(copies=False)
    rows[4]["scope"] = "nearscope"
    with pytest.raises(DataError, match=r"^c3po data row 5: field 'scope': 'nearscope' is not one of in_scope, near_scope"):
        split_by_scope(rows, 0.25, 0)
    places = [f"c3po.jsonl:{i + 1}" for i in range(len(rows))]
    with pytest.raises(DataError, match=r"^c3po.jsonl:5: field 'scope'"):
        split_by_scope(rows, 0.25, 0, "c3po.jsonl", places)


def test_an_exact_repeat_of_a_validation_prompt_is_scored_once(tmp_path):
    """c3po_data rows written twice (the same id, prompt and scope; their sampled baselines differ,
    but evaluate scores the prompt): a copied prompt that validates is one validation prompt, the
    stage counts the repeats; a prompt asked again under another id is another item and stays."""
    rows = c3po_rows(chats=False)
    rows += [{**r, "baseline": "another sample"} for r in rows if r["id"].endswith(("-0", "-1", "-2", "-3"))]
    path = tmp_path / "c3po.jsonl"
    write_jsonl(rows, path)
    dropped = 0
    for seed in (0, 1, 2):
        result, fit, validation = run_stage(tmp_path / str(seed), path, seed)
        ids = [r["id"] for r in validation]
        assert len(ids) == len(set(ids)), seed  # each validation prompt once
        repeats = sum(i in ids for i in {r["id"] for r in rows if r["baseline"] == "another sample"})
        assert result.record("validation").metrics["validation_duplicates_dropped"] == repeats
        assert len(fit) + len(validation) + repeats == len(rows)
        assert not leaked(fit, validation), seed
        dropped += repeats
    assert dropped  # a copied prompt did validate
