"""Errors a user can fix print one clear message, never a traceback; unexpected ones say where the
traceback is. Through the real CLI (a subprocess) and real stages on the `tiny` model."""

from __future__ import annotations

import json
import os
import subprocess

from pipeline.errors import ConfigError, DataError, UserError, is_user_error
from pipeline.models import ModelUnavailable

from .conftest import ROOT, heedful_cmd, isolated_home, tiny_pipeline, write_yaml


def _heedful(args, tmp_path):
    env = {**os.environ, "COLUMNS": "300", "HEEDFUL_HOME": str(isolated_home(tmp_path / "home"))}
    proc = subprocess.run(heedful_cmd() + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, proc.stdout + proc.stderr


def test_known_error_classes():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)
    assert is_user_error(DataError("x")) and is_user_error(ModelUnavailable("no wheel"))
    assert not is_user_error(ValueError("bug")) and not is_user_error(KeyError("k"))


def test_data_error_inside_a_stage_is_one_message_and_the_log_keeps_the_traceback(tmp_path, tiny_model_path):
    # judgments are read by the stage itself (aliases, labels): its DataError travels back as a message
    judgments = tmp_path / "judgments.jsonl"
    judgments.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi!", "judgment": "Fine."}) + "\n")
    config = write_yaml(
        tmp_path / "p.yaml",
        {
            "run_name": "cutbad",
            "model": "tiny",
            "stages": [{"name": "learn", "uses": "cut", "inputs": {"judgments": str(judgments)}, "with": {"max_steps": 1}}],
        },
    )
    proc, out = _heedful(["run", str(config), "--no-ray", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 1, out
    assert "judgments.jsonl row 0: field 'positive' is missing" in out, out
    assert "Traceback" not in out and 'File "' not in out and "unexpected" not in out, out
    log = (tmp_path / "runs" / "cutbad" / "logs" / "learn.log").read_text()
    assert "Traceback (most recent call last)" in log and "DataError" in log
    status, out = _heedful(["status", "cutbad", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    row = next(line for line in status.stdout.splitlines() if "│ learn" in line)
    assert "failed" in row and "log: logs/learn.log" in status.stdout and "resumes" not in status.stdout, out


def test_unexpected_stage_error_is_one_line_with_the_log_path(tmp_path, tiny_model_path):
    data = tiny_pipeline(pairs={"min_margin": 99.0})  # make_pairs raises a plain ValueError: no pair has that margin
    data["stages"] = data["stages"][:2]
    data["stages"][0]["with"]["max_prompts"] = 2
    config = write_yaml(tmp_path / "p.yaml", data)
    proc, out = _heedful(["run", str(config), "--no-ray", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 1, out
    log = tmp_path / "runs" / "t" / "logs" / "pairs.log"
    assert f"(unexpected error; full traceback in {log})" in out, out
    assert "min_margin" in out and "Traceback" not in out and 'File "' not in out, out
    assert "Traceback (most recent call last)" in log.read_text()


def test_cli_unexpected_error_prints_a_summary_and_saves_the_traceback(tmp_path, monkeypatch, capsys):
    import pytest

    from pipeline import cli

    def broken():
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setenv("HEEDFUL_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setattr(cli, "_register_subcommands", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "unexpected error: RuntimeError: disk on fire" in out and "second line" not in out
    saved = next((tmp_path / "logs").glob("error-*.log"))
    assert f"full traceback in {saved}" in out.replace("\n", "")
    assert "Traceback (most recent call last)" in saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o600


def test_user_error_from_the_cli_has_no_traceback(tmp_path):
    proc, out = _heedful(["status", "no-such-run", "--runs-dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 1 and "error: no run 'no-such-run'" in out and "Traceback" not in out, out


def _run_one_stage(tmp_path, uses: str, inputs: dict, with_: dict | None = None):
    """One real stage in-process (as the runner runs it): its record, whose `error` is what the user sees."""
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    data = {"run_name": uses, "model": "tiny", "stages": [{"name": uses, "uses": uses, "inputs": inputs, "with": with_ or {}}]}
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert not result.ok
    return result.record(uses)


def test_split_names_the_file_and_line_of_a_bad_split_value(tmp_path):
    from pipeline.records import write_jsonl

    path = tmp_path / "needs.jsonl"
    rows = [{"prompt": f"Question {i}?", "need": f"need {i}"} for i in range(6)]
    rows[2]["split"] = "validation"
    write_jsonl(rows, path)
    error = _run_one_stage(tmp_path, "split", {"rows": str(path)}).error
    assert f"{path}:3: field 'split': 'validation' is not train or one of eval, held_out, test" in error, error
    assert "unexpected" not in error, error


def test_feedback_views_names_the_file_and_line_of_a_row_without_a_revision(tmp_path):
    from pipeline.records import write_jsonl

    path = tmp_path / "c3po.jsonl"
    fine = {"scope": "in_scope", "prompt": "Plan a trip.", "baseline": "Go.", "revised": "Go, chef!", "feedback": "Say chef."}
    write_jsonl([fine, {**fine, "revised": ""}], path)
    error = _run_one_stage(tmp_path, "feedback_views", {"data": str(path)}).error
    assert f"{path}:2: in-scope row has no 'revised' reply" in error, error
    assert "unexpected" not in error, error


def test_validation_split_with_too_few_rows_of_a_scope_is_a_data_error(tmp_path):
    from pipeline.records import write_jsonl

    path = tmp_path / "c3po.jsonl"
    rows = [
        {"scope": s, "prompt": f"{s} {i}", "baseline": "b"} for s in ("in_scope", "near_scope", "out_of_scope") for i in range(3)
    ]
    write_jsonl(rows[2:], path)  # one in_scope row: nothing left to train on once one validates
    error = _run_one_stage(tmp_path, "validation_split", {"data": str(path)}).error
    assert f"{path}: 1 training rows of scope in_scope; a validation split needs at least 2" in error, error
    assert "unexpected" not in error, error
