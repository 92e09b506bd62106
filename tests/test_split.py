"""The split stage on real files, in-process: one prompt's rows (copies of a question, ClariQ's
facets of one request) land on one side whatever the seed, explicit `split` values pull their
group, a group marked for both sides is an error naming its rows, an exact repeat of a held-out
row is held out once (ClariQ's facets of one request stay distinct), and the quickstart's needs
still split 12 / 4."""

from __future__ import annotations

import csv

import pytest

from pipeline.chat import last_user_text
from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from stages.split import SplitConfig, split_rows

from .conftest import ROOT

SEEDS = range(8)


def split_run(tmp_path, rows_path, seed=0, **with_):
    data = {
        "run_name": f"split{seed}",
        "model": "tiny",
        "seed": seed,
        "stages": [{"name": "split", "uses": "split", "inputs": {"rows": str(rows_path)}, "with": with_}],
    }
    return Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()


def split_outputs(result) -> tuple[list[dict], list[dict]]:
    assert result.ok, [r.error for r in result.records]
    stage = result.run_dir / "split"
    return load_rows(stage / "train"), load_rows(stage / "held_out")


def sides(train, held_out, key) -> set:
    """The keys found on both sides (a leak)."""
    return {key(r) for r in train} & {key(r) for r in held_out}


def needs_with_copies() -> list[dict]:
    """12 questions; q0..q3 asked twice more, for other needs (once with a trailing space)."""
    rows = [{"id": f"q{i}", "prompt": f"Question number {i}?", "need": f"need {i}"} for i in range(12)]
    for i in range(4):
        rows.append({"id": f"q{i}-again", "prompt": f"Question number {i}?", "need": f"another need {i}"})
        rows.append({"id": f"q{i}-more", "prompt": f"Question number {i}? ", "need": f"a third need {i}"})
    return rows


def question(row) -> str:
    return last_user_text(row["prompt"]).strip()


def test_copies_of_a_prompt_land_on_one_side_whatever_the_seed(tmp_path):
    path = tmp_path / "needs.jsonl"
    write_jsonl(needs_with_copies(), path)
    seen = set()
    for seed in SEEDS:
        (tmp_path / str(seed)).mkdir()
        train, held_out = split_outputs(split_run(tmp_path / str(seed), path, seed))
        assert len(train) + len(held_out) == 20 and not sides(train, held_out, question), seed
        seen.add(tuple(sorted(r["id"] for r in held_out)))
        # 20 rows in 12 groups, a quarter held out: 5 rows as close as whole groups allow
        assert 4 <= len(held_out) <= 6, (seed, len(held_out))
    assert len(seen) > 1  # the seed does choose


def test_a_chat_prompt_groups_by_its_last_user_turn():
    """A chat with a system turn asks what its last user turn asks (`pipeline.chat.last_user_text`)."""
    rows = [{"id": f"q{i}", "prompt": f"Question number {i}?"} for i in range(12)]
    for i in range(6):
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question number {i}?"}]
        rows.append({"id": f"q{i}-chat", "prompt": chat})
    for seed in SEEDS:
        train, held_out = split_rows(rows, SplitConfig(), seed)
        assert not sides(train, held_out, question), seed


def test_clariq_facets_of_one_request_land_on_one_side(tmp_path):
    path = tmp_path / "clariq.tsv"
    fields = [
        "topic_id",
        "initial_request",
        "topic_desc",
        "clarification_need",
        "facet_id",
        "facet_desc",
        "question_id",
        "question",
        "answer",
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        for t in range(8):
            for f in range(3):  # three facets of each request, two clarifying questions each
                for q in range(2):
                    writer.writerow(
                        {
                            "topic_id": t,
                            "initial_request": f"Tell me about topic {t}",
                            "topic_desc": "",
                            "clarification_need": 2,
                            "facet_id": f"F{t}{f}",
                            "facet_desc": f"facet {f} of topic {t}",
                            "question_id": f"Q{t}{f}{q}",
                            "question": f"do you mean aspect {q}?",
                            "answer": "yes",
                        }
                    )
    for seed in SEEDS:
        (tmp_path / str(seed)).mkdir()
        train, held_out = split_outputs(split_run(tmp_path / str(seed), path, seed))
        assert not sides(train, held_out, lambda r: r["initial_request"]), seed
        assert len(held_out) == 12 and len(train) == 36  # 2 of the 8 requests, all 6 rows each


def test_explicit_split_pulls_its_group(tmp_path):
    rows = needs_with_copies()
    rows[0]["split"] = "held_out"  # q0: its two copies follow it out
    rows[1]["split"] = "train"  # q1: its copies stay in
    by_id = {r["id"]: r for r in rows}
    by_id["q2-more"]["split"] = "test"  # a copy's mark pulls the original too
    path = tmp_path / "needs.jsonl"
    write_jsonl(rows, path)
    for seed in SEEDS:
        (tmp_path / str(seed)).mkdir()
        train, held_out = split_outputs(split_run(tmp_path / str(seed), path, seed))
        out, kept = {r["id"] for r in held_out}, {r["id"] for r in train}
        assert {"q0", "q0-again", "q0-more", "q2", "q2-again", "q2-more"} <= out, seed
        assert {"q1", "q1-again", "q1-more"} <= kept, seed
        assert not sides(train, held_out, question)


def test_a_prompt_marked_for_both_sides_is_an_error_naming_its_rows(tmp_path):
    rows = needs_with_copies()
    rows[0]["split"] = "train"
    rows[12]["split"] = "eval"  # q0-again, line 13
    path = tmp_path / "needs.jsonl"
    write_jsonl(rows, path)
    result = split_run(tmp_path, path)
    assert not result.ok
    error = result.record("split").error
    assert "'Question number 0?' are marked for both sides" in error, error
    assert f"train at {path}:1;" in error and f"held out at {path}:13" in error, error
    assert "unexpected" not in error, error
    with pytest.raises(DataError, match=r"train at rows row 1; held out at rows row 13"):
        split_rows(rows, SplitConfig(), 0)


def test_rows_that_are_all_one_prompt_cannot_be_split():
    rows = [{"prompt": "Same?", "need": f"need {i}"} for i in range(6)]
    with pytest.raises(DataError, match="1 different prompts"):
        split_rows(rows, SplitConfig(), 0)


def test_quickstart_needs_split_12_and_4(tmp_path):
    train, held_out = split_outputs(split_run(tmp_path, ROOT / "data" / "quickstart" / "needs.jsonl"))
    assert (len(train), len(held_out)) == (12, 4)
    for seed in SEEDS:
        train, held_out = split_rows(load_rows(ROOT / "data" / "quickstart" / "needs.jsonl"), SplitConfig(), seed)
        assert (len(train), len(held_out)) == (12, 4)


def test_an_exact_repeat_of_a_held_out_need_is_one_held_out_row(tmp_path):
    """A held-out need written twice word for word (one copy marked `eval`, the other `test`: the
    mark is where a row goes, not what it is) is held out once, and the stage counts the repeat;
    another need asked with the same question is another item and stays."""
    rows = needs_with_copies()
    rows[0]["split"] = "eval"
    rows.append({**rows[0], "split": "test"})  # q0 again, every field but its mark equal
    path = tmp_path / "needs.jsonl"
    write_jsonl(rows, path)
    result = split_run(tmp_path, path)
    train, held_out = split_outputs(result)
    assert [r["id"] for r in held_out].count("q0") == 1
    assert {"q0-again", "q0-more"} <= {r["id"] for r in held_out}  # other needs of the same question
    assert result.record("split").metrics["held_out_duplicates_dropped"] == 1
    assert len(train) + len(held_out) == len(rows) - 1


def test_clariq_facets_of_one_request_stay_two_held_out_items(tmp_path):
    """Two facets of one ClariQ request share the request but not the need: two held-out items,
    while an exact repeat of a facet's row goes."""
    fields = ["topic_id", "initial_request", "facet_id", "facet_desc", "question", "answer", "split"]
    jaguar = {"topic_id": 1, "initial_request": "Tell me about jaguars", "question": "", "answer": "", "split": "held_out"}
    rows = [
        {**jaguar, "facet_id": "F1", "facet_desc": "the car"},
        {**jaguar, "facet_id": "F2", "facet_desc": "the animal"},
        {**jaguar, "facet_id": "F1", "facet_desc": "the car"},  # a word-for-word repeat of F1
        *(
            {
                **jaguar,
                "topic_id": t,
                "initial_request": f"Tell me about topic {t}",
                "facet_id": f"T{t}",
                "facet_desc": "x",
                "split": "",
            }
            for t in range(2, 6)
        ),
    ]
    path = tmp_path / "clariq.tsv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    result = split_run(tmp_path, path)
    _, held_out = split_outputs(result)
    assert [r["facet_id"] for r in held_out if r["initial_request"] == "Tell me about jaguars"] == ["F1", "F2"]
    assert result.record("split").metrics["held_out_duplicates_dropped"] == 1


def test_distinct_items_drops_exact_repeats_only():
    from pipeline.prompt_groups import distinct_items

    rows = [
        {"prompt": "q?", "need": "a", "split": "eval"},
        {"prompt": "q?", "need": "b"},  # another need: another item
        {"need": "a", "prompt": "q?", "split": "test"},  # the first, its fields in another order, another mark
        {"prompt": "q? ", "need": "a"},  # not word for word
        {"prompt": [{"role": "user", "content": "q?"}], "need": "a"},
        {"prompt": [{"role": "user", "content": "q?"}], "need": "a"},
    ]
    kept, repeats = distinct_items(rows)
    assert kept == [rows[0], rows[1], rows[3], rows[4]] and repeats == 2
    assert distinct_items(rows, ignore=())[1] == 1  # with the mark counted, only the chats repeat
