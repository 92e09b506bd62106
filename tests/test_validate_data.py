"""Data files are checked before anything runs: one schema per record kind, file:line:field messages.

Each bad input is checked three ways: the schema check itself, `heedful validate` and
`heedful run` through the real CLI (a subprocess). `heedful run` must stop before Ray:
RAY_ADDRESS points at a port nobody listens on, so reaching Ray would end in a
connection error instead of the data error, and no run folder may appear.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.record_schemas import check_rows
from pipeline.records import load_rows

from .conftest import ROOT, SHARED_DATA, heedful_cmd, write_yaml

PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


#: name -> (stage type, input name, file name, rows, expected message after the path)
BAD_INPUTS = {
    "empty": ("dpo", "preferences", "prefs.jsonl", [], "prefs.jsonl is empty: a preferences input needs at least one record"),
    "chosen_number": (
        "dpo",
        "preferences",
        "prefs.jsonl",
        [PAIR, PAIR, {**PAIR, "chosen": 7}],
        "prefs.jsonl:3: field 'chosen': expected a string or a list of messages, got 7",
    ),
    "missing_field": (
        "dpo",
        "preferences",
        "prefs.jsonl",
        [PAIR, {"prompt": "x", "chosen": "y"}],
        "prefs.jsonl:2: field 'rejected' is missing",
    ),
    "bad_json": (
        "dpo",
        "preferences",
        "prefs.jsonl",
        [PAIR, PAIR, PAIR, '{"prompt": "x", "chosen": '],
        "prefs.jsonl:4: invalid JSON",
    ),
    "bad_message": (
        "dpo",
        "preferences",
        "prefs.jsonl",
        [{**PAIR, "rejected": [{"role": "assistant", "content": "ok"}, {"role": "robot", "content": "x"}]}],
        "prefs.jsonl:1: field 'rejected': message 1: role must be one of system, user, assistant, tool",
    ),
    "span_outside": (
        "train_reward",
        "feedback",
        "spans.jsonl",
        [
            {
                "kind": "span",
                "id": "s1",
                "prompt": "Q?",
                "response": "short",
                "provenance": {"source": "import"},
                "spans": [{"start": 2, "end": 40, "label": "Irrelevant"}],
            }
        ],
        "spans.jsonl:1: spans[0] [2, 40) is outside the response (length 5)",
    ),
    "prompt_missing": (
        "generate",
        "prompts",
        "prompts.jsonl",
        [{"prompt": "a"}, {"text": "b"}],
        "prompts.jsonl:2: field 'prompt' is missing",
    ),
}


def _pipeline(tmp_path: Path, uses: str, input_name: str, data_file: Path) -> Path:
    stage = {"name": "s", "uses": uses, "inputs": {input_name: str(data_file)}}
    if uses == "train_reward":
        stage["with"] = {"kind": "fine_grained"}
    return write_yaml(tmp_path / "p.yaml", {"run_name": "bad", "model": "tiny", "stages": [stage]})


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_schema_names_file_line_and_field(tmp_path, case):
    uses, input_name, file_name, rows, expected = BAD_INPUTS[case]
    from pipeline import registry

    path = _jsonl(tmp_path / file_name, rows)
    with pytest.raises(DataError) as err:
        check_rows(path, registry.get(uses).inputs[input_name].kinds)
    assert f"{tmp_path}/{expected}" in str(err.value)


@pytest.mark.parametrize("case", ["empty", "chosen_number", "missing_field", "bad_json", "span_outside"])
def test_validate_and_run_report_bad_data_before_ray(tmp_path, case):
    uses, input_name, file_name, rows, expected = BAD_INPUTS[case]
    config = _pipeline(tmp_path, uses, input_name, _jsonl(tmp_path / file_name, rows))
    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "COLUMNS": "300"}  # nothing listens there
    for command in (["validate", str(config)], ["run", str(config), "--runs-dir", str(runs)]):
        proc = subprocess.run(heedful_cmd() + command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert f"{tmp_path}/{expected}" in out and "nothing was run" in out, out
        assert "Traceback" not in out and 'File "' not in out, out
        assert "onnect" not in out, out  # no attempt to reach the (absent) Ray cluster
    assert not runs.exists(), "nothing may be written for a run that failed validation"


def test_load_rows_with_a_kind_gives_the_same_messages(tmp_path):
    path = _jsonl(tmp_path / "prefs.jsonl", [PAIR, {**PAIR, "chosen": 7}])
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: field 'chosen': expected a string or a list of messages, got 7"):
        load_rows(path, kind="preferences")
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="is empty: a preferences input needs at least one record"):
        load_rows(empty, kind="preferences")
    assert load_rows(empty) == []  # without a kind an empty file is just no rows
    conversational = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
        "id": 3,
    }
    ok = _jsonl(tmp_path / "ok.jsonl", [PAIR, conversational])
    assert load_rows(ok, kind="preferences") == [PAIR, conversational]  # extra columns are kept


def test_json_lists_report_the_line_a_record_starts_on(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text("[\n" + json.dumps(PAIR, indent=1) + ",\n" + json.dumps({**PAIR, "rejected": None}, indent=1) + "\n]\n")
    with pytest.raises(DataError, match=r"prefs\.json:7: field 'rejected': expected a string or a list of messages, got None"):
        check_rows(path, ["preferences"])


def test_qa_feedback_spans_must_lie_inside_the_prediction(tmp_path):
    row = {
        "question": "Q?",
        "passages": [["t", "x"]],
        "prediction 1": "abc",
        "prediction 2": "b",
        "prediction 3": "c",
        "prediction 4": "d",
        "feedback": str({"errors": [{"start": 1, "end": 9, "error type": "Irrelevant"}]}),
        "preference": "[1, 1, 1, 0, 2, 2]",
    }
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(DataError, match=r"qa\.json:1: field 'feedback.errors\[0\]': span \[1, 9\) is outside 'prediction 1'"):
        check_rows(path, ["span_feedback"])


def test_csv_lines_are_counted_from_the_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,,f\n")
    with pytest.raises(DataError, match=r"p\.csv:3: field 'chosen': is empty"):
        check_rows(path, ["preferences"])


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_and_their_data_validate(config):
    text = (ROOT / "configs" / config).read_text()
    if "shared/data" in text and not SHARED_DATA.is_dir():
        pytest.skip("the shared datasets are not beside this checkout")
    proc = subprocess.run(
        heedful_cmd() + ["validate", str(ROOT / "configs" / config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "path,kinds,field",
    [
        ("qa_feedback/feedback_400.json", ("reactions", "span_feedback", "preferences", "followups"), "prompt"),
        ("qa_feedback/feedback_400.json", ("prompts",), "question"),
        ("clariq/train.tsv", ("reactions",), "prompt"),
        ("clariq/train.tsv", ("responses", "prompts", "needs"), "prompt"),
    ],
)
def test_shared_datasets_pass_their_schemas(path, kinds, field):
    if not (SHARED_DATA / path).is_file():
        pytest.skip(f"{SHARED_DATA / path} is not here")
    assert check_rows(SHARED_DATA / path, kinds, prompt_field=field) > 100


@pytest.mark.parametrize(
    "path,kinds",
    [
        ("c3po/cooking_prompts.jsonl", ("prompts",)),
        ("quickstart/prompts.jsonl", ("prompts",)),
        ("quickstart/needs.jsonl", ("responses", "prompts", "needs")),
        ("users/needs.jsonl", ("responses", "prompts", "needs")),
    ],
)
def test_shipped_data_passes_its_schema(path, kinds):
    assert check_rows(ROOT / "data" / path, kinds) > 0


def test_kinds_checked_by_their_stage_are_let_through(tmp_path):
    """kto also reads unpaired rows (prompt/completion/label), a format its stage knows: not refused here,
    while rows in a known format are still checked."""
    from pipeline import registry

    kinds = registry.get("kto").inputs["feedback"].kinds if registry.get("kto") else ("unpaired_preferences", "reactions")
    unpaired = _jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "x", "label": True}])
    assert check_rows(unpaired, kinds) == 1
    logs = _jsonl(
        tmp_path / "r.jsonl",
        [{"prompt": "a", "response": "x", "reaction": "love"}, {"prompt": "a", "response": 7, "reaction": "love"}],
    )
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'response'"):
        check_rows(logs, kinds)


def test_renamed_columns_follow_the_stage_config(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "Why?"}, {"question": ["not", "messages"]}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'question': message 0: expected an object"):
        check_rows(path, ["prompts"], prompt_field="question")
    needs = _jsonl(tmp_path / "n.jsonl", [{"goal": "a recipe"}, {"goal": ""}])
    with pytest.raises(DataError, match=r"n\.jsonl:2: field 'goal': is empty"):
        check_rows(needs, ["needs"], need_field="goal")
