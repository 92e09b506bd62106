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
