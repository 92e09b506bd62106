"""`heedful memory ...` and `heedful serve` argument checks, in-process (typer's CliRunner)."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from pipeline import cli
from pipeline.records import load_rows

cli._register_subcommands()
runner = CliRunner()


def heedful(*args):
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=True)


def test_memory_commands_round_trip(tmp_path):
    mem = tmp_path / "m.db"
    r = heedful(
        "memory",
        "add",
        "--memory",
        mem,
        "--query",
        "What is akin to < roomy > ?",
        "--clarification",
        "when I ask 'akin to', I want a synonym.",
        "--user",
        "ann",
    )
    assert r.exit_code == 0, r.output
    rows = tmp_path / "seed.jsonl"
    rows.write_text(
        json.dumps({"key_query": "What rings like < paws > ?", "clarification": "homophone"})
        + "\n"
        + json.dumps({"key_query": "What is far from < near > ?", "clarification": "antonym"})
        + "\n"
    )
    r = heedful("memory", "import", rows, "--memory", mem)
    assert r.exit_code == 0 and "imported 2" in r.output, r.output
    r = heedful("memory", "list", "--memory", mem)
    assert "3 entries" in r.output and "What rings like" in r.output
    assert heedful("memory", "remove", "2", "--memory", mem).exit_code == 0
    r = heedful("memory", "stats", "--memory", mem)
    assert "entries" in r.output and " 2" in r.output
    r = heedful("memory", "export", "--memory", mem, "--to", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert [e["key_query"] for e in load_rows(tmp_path / "out" / "memory.jsonl")] == [
        "What is akin to < roomy > ?",
        "What is far from < near > ?",
    ]
    assert not (tmp_path / "out" / "reactions").exists()  # no reactions: nothing written


def test_memory_import_names_the_bad_line(tmp_path):
    from pipeline.errors import DataError

    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"key_query": "q", "clarification": "c"}) + "\n" + json.dumps({"key_query": "q2"}) + "\n")
    r = heedful("memory", "import", rows, "--memory", tmp_path / "m.db")
    assert isinstance(r.exception, DataError)
    assert f"{rows}:2: field 'clarification' is missing" in str(r.exception)


def test_serve_refuses_a_readable_token_file_and_a_bad_template(tmp_path):
    from pipeline.errors import HeedfulError

    token = tmp_path / "token"
    token.write_text("x" * 32)
    os.chmod(token, 0o644)
    r = heedful("serve", "--model", "tiny", "--memory", tmp_path / "m.db", "--token-file", token)
    assert isinstance(r.exception, HeedfulError) and "chmod 600" in str(r.exception)
    r = heedful("serve", "--model", "tiny", "--memory", tmp_path / "m.db", "--template", "{query} only")
    assert isinstance(r.exception, HeedfulError) and "{clarification}" in str(r.exception)
    assert "x" * 32 not in r.output


def test_serve_refuses_unsafe_multi_user_settings(tmp_path):
    """A users file readable by others, two auth modes at once, or global memory among several users."""
    from pipeline.errors import HeedfulError
    from serving.identity import UserEntry, hash_token, write_users

    users = tmp_path / "users.yaml"
    write_users(users, [UserEntry("alice", "user", hash_token("a" * 24))])
    token = tmp_path / "token"
    token.write_text("x" * 32)
    os.chmod(token, 0o600)
    serve = ("serve", "--model", "tiny", "--memory", tmp_path / "m.db")
    r = heedful(*serve, "--users-file", users, "--scope", "global")
    assert isinstance(r.exception, HeedfulError) and "scope 'global'" in str(r.exception)
    r = heedful(*serve, "--users-file", users, "--token-file", token)
    assert isinstance(r.exception, HeedfulError) and "not both" in str(r.exception)
    os.chmod(users, 0o644)
    r = heedful(*serve, "--users-file", users)
    assert isinstance(r.exception, HeedfulError) and "chmod 600" in str(r.exception)
    assert not (tmp_path / "m.db").exists()  # refused before anything was created
