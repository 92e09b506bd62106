from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.records import load_rows, save_rows


def test_bad_jsonl_names_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: field 'prompt' is missing"):
        load_rows(path, required=["prompt"])
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        load_rows(path)


def test_dataset_round_trip_keeps_nested_messages(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}]}]
    save_rows(rows, tmp_path / "ds")
    assert load_rows(tmp_path / "ds", required=["prompt"]) == rows
    assert not (tmp_path / "ds.tmp").exists()


def test_empty_dataset_round_trips(tmp_path):
    save_rows([], tmp_path / "empty")
    assert load_rows(tmp_path / "empty") == []


def test_empty_dataset_keeps_columns_of_example(tmp_path):
    from datasets import load_from_disk

    save_rows([], tmp_path / "empty", empty_like={"prompt": "x", "score": 1.0})
    assert load_from_disk(str(tmp_path / "empty")).column_names == ["prompt", "score"]


def test_rows_are_streamed_one_at_a_time(tmp_path):
    """Validation reads a file once, row by row: the first row arrives before the bad second line is read."""
    from pipeline.records import iter_rows

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    rows = iter_rows(path)
    assert next(rows) == (f"{path}:1", {"prompt": "a"})
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        next(rows)


def test_json_list_rows_carry_their_line(tmp_path):
    from pipeline.records import iter_rows

    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "a"},\n\n  {"prompt": "b",\n   "x": 1}\n]\n')
    assert [where for where, _ in iter_rows(path)] == [f"{path}:2", f"{path}:4"]
    assert load_rows(path) == [{"prompt": "a"}, {"prompt": "b", "x": 1}]
    path.write_text('[{"prompt": "a"} {"prompt": "b"}]')
    with pytest.raises(DataError, match=r"p\.json:1: invalid JSON"):
        load_rows(path)


def test_columns_absent_from_first_row_survive_a_round_trip(tmp_path):
    """A needs file where only some rows carry persona/keywords/id: every column is kept, None where a
    row has none, and the simulator still sees the later rows' facts and persona."""
    from feedback.simulator.needs import load_users

    path = tmp_path / "needs.jsonl"
    path.write_text(
        '{"need": "the capital of Japan", "prompt": "Where should I go?"}\n'
        '{"need": "a ramen place", "request": "Hungry.", "persona": "a student", "keywords": ["Tokyo"], "id": "n2"}\n'
    )
    save_rows(load_rows(path), tmp_path / "train")
    rows = load_rows(tmp_path / "train")
    assert list(rows[0]) == ["need", "prompt", "request", "persona", "keywords", "id"]
    assert rows[0] == {
        "need": "the capital of Japan",
        "prompt": "Where should I go?",
        "request": None,
        "persona": None,
        "keywords": None,
        "id": None,
    }
    assert rows[1]["keywords"] == ["Tokyo"] and rows[1]["persona"] == "a student" and rows[1]["id"] == "n2"
    # a None read back is no value: row 1 still falls back to its `request`, as from the JSONL itself
    users = load_users(tmp_path / "train")
    expected = [("row0", "Where should I go?", "", []), ("n2", "Hungry.", "a student", ["Tokyo"])]
    assert [(u.id, u.request, u.persona, u.facts) for u in users] == expected
    assert [(u.id, u.request, u.persona, u.facts) for u in load_users(path)] == expected


def test_mixed_type_column_is_a_data_error_naming_the_column(tmp_path):
    rows = [{"prompt": "hi", "keywords": ["Tokyo"]}, {"prompt": [{"role": "user", "content": "hi"}], "keywords": ["Kyoto"]}]
    with pytest.raises(DataError, match=r"out: cannot save column 'prompt'.*row 0 has a string, row 1 has a list"):
        save_rows(rows, tmp_path / "out")
    rows = [{"prompt": "a", "keywords": ["Tokyo"]}, {"prompt": "b", "keywords": None}, {"prompt": "c", "keywords": "Tokyo"}]
    with pytest.raises(DataError, match=r"column 'keywords'.*row 0 has a list, row 2 has a string"):
        save_rows(rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()
