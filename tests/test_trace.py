"""Feedback lineage and `heedful trace`: an export names exactly the feedback records that shaped
its adapter, and a version id leads back to the export, its run and those records.

A real run on the tiny model, in-process: served feedback (a real memory file, read by the
`memory_export` stage) trains a KTO adapter; DPO on a file of preference records continues it;
the export ships it. Decoys that must *not* show up: critiques in the same memory file that no
training read, and a second DPO stage beside the chain. A second run continues the first
run's export (the closed loop's next round) and inherits its records. The command is run
against a real uvicorn server on 127.0.0.1 that serves the export after a hot deploy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import openai
import pytest
import typer
from typer.testing import CliRunner

from pipeline.config import pipeline_from_dict
from pipeline.errors import HeedfulError
from pipeline.records import write_jsonl
from pipeline.runner import Runner
from pipeline.schema import Preference, Provenance, Reaction, VerbalFeedback
from pipeline.trace import trace, trace_version
from serving.deploy_cli import deploy
from serving.identity import UserEntry, hash_token, write_users
from serving.local import ServerThread
from serving.service import ServeSettings
from serving.store import MemoryStore
from serving.versions import adapter_version_id

TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "lora": {"r": 4, "alpha": 8}}
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]


def _when(day: int) -> str:
    return f"2026-11-{day:02d}T10:00:00Z"


def _served(kind: str, record_id: str, user: str, day: int) -> Provenance:
    extra = json.dumps({"author_verified": True, "feedback": kind})
    return Provenance(source="serving", annotator=user, timestamp=_when(day), record_id=f"cmpl-{record_id}", extra=extra)


def memory_file(path: Path) -> Path:
    """Served feedback as the server stores it: 6 reactions (trained on) and 2 critiques (not)."""
    store = MemoryStore(path)
    for i, (country, city) in enumerate(CAPITALS):
        prompt = [{"role": "user", "content": f"What is the capital of {country}?"}]
        for j, (reply, reaction) in enumerate(((f"It is {city}.", "love"), ("Banana banana.", "dislike"))):
            rid = f"r-{2 * i + j}"
            record = Reaction(
                id=rid, prompt=prompt, response=reply, reaction=reaction, provenance=_served("reaction", rid, f"u{i}", 1 + i)
            )
            store.log_feedback(f"conv-{rid}", "reaction", record.model_dump(mode="json"))
    for i in range(2):
        vid = f"v-{i}"
        critique = VerbalFeedback(
            id=vid,
            prompt=f"Tell me about {CAPITALS[i][0]}.",
            response="Banana.",
            critique=f"Say something true about {CAPITALS[i][0]} next time.",
            provenance=_served("critique", vid, f"u{i}", 9),
        )
        store.log_feedback(f"conv-{vid}", "verbal", critique.model_dump(mode="json"))
    store.close()
    return path


def preference_file(path: Path, prefix: str, day: int) -> Path:
    rows = [
        Preference(
            id=f"{prefix}-{i}",
            prompt=[{"role": "user", "content": f"Capital of {country}?"}],
            chosen=[{"role": "assistant", "content": f"{city}."}],
            rejected=[{"role": "assistant", "content": "Banana."}],
            provenance=Provenance(source="import", timestamp=_when(day)),
        ).model_dump(mode="json")
        for i, (country, city) in enumerate(CAPITALS)
    ]
    write_jsonl(rows, path)
    return path


def first_round(tmp: Path) -> dict:
    return {
        "run_name": "round1",
        "model": "tiny",
        "seed": 0,
        "stages": [
            {"name": "pull", "uses": "memory_export", "inputs": {"memory": str(memory_file(tmp / "memory.db"))}},
            {"name": "react", "uses": "kto", "inputs": {"feedback": "pull.reactions"}, "with": TRAIN},
            {
                "name": "align",
                "uses": "dpo",
                "inputs": {"preferences": str(preference_file(tmp / "prefs.jsonl", "p", 20)), "adapter": "react.adapter"},
                "with": TRAIN,
            },
            {
                "name": "decoy",
                "uses": "dpo",
                "inputs": {"preferences": str(preference_file(tmp / "decoy.jsonl", "x", 21))},
                "with": TRAIN,
            },
            {"name": "ship", "uses": "export", "inputs": {"adapter": "align.adapter"}},
        ],
    }


def second_round(tmp: Path, previous_export: Path) -> dict:
    """The loop's next round: new preferences, continuing the deployed export (a file input)."""
    return {
        "run_name": "round2",
        "model": "tiny",
        "seed": 0,
        "stages": [
            {
                "name": "align",
                "uses": "dpo",
                "inputs": {"preferences": str(preference_file(tmp / "prefs2.jsonl", "q", 25)), "adapter": str(previous_export)},
                "with": TRAIN,
            },
            {"name": "ship", "uses": "export", "inputs": {"adapter": "align.adapter"}},
        ],
    }


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trace")
    runs = tmp / "runs"
    for build in (lambda: first_round(tmp), lambda: second_round(tmp, runs / "round1" / "ship" / "package")):
        result = Runner(pipeline_from_dict(build(), tmp), runs, use_ray=False).execute()
        assert result.ok, [(r.name, r.error) for r in result.records]
    return runs


#: (id, kind, source_stage) -> created of every record that shaped round 1's adapter
ROUND1: dict[tuple[str, str, str | None], str] = {
    **{(f"r-{i}", "reactions", "pull"): _when(1 + i // 2) for i in range(6)},
    **{(f"p-{i}", "preferences", None): _when(20) for i in range(3)},
}


def records_of(lineage: dict) -> dict:
    return {(r["id"], r["kind"], r["source_stage"]): r["created"] for r in lineage["feedback_records"]}


def test_export_lists_exactly_the_records_that_trained_the_adapter(runs):
    package = runs / "round1" / "ship" / "package"
    lineage = json.loads((package / "heedful.json").read_text())
    assert records_of(lineage) == ROUND1  # none missing, none extra (no critique, no decoy), times kept
    assert len(lineage["feedback_records"]) == len(ROUND1)  # and none twice
    assert lineage["feedback_record_counts"] == {"preferences": 3, "reactions": 6}
    read_by = {s["source_stage"] or Path(s["path"]).name: s["read_by"] for s in lineage["feedback_sources"]}
    assert read_by == {"pull": ["react"], "prefs.jsonl": ["align"]}
    # the version a server reports for this folder, and for the run's adapter it came from
    assert lineage["version_id"] == adapter_version_id(package)
    assert lineage["source_version_id"] == adapter_version_id(runs / "round1" / "align" / "adapter")
    assert json.loads((runs / "round1" / "ship" / "manifest.json").read_text())["metrics"]["version"] == lineage["version_id"]

    card = (package / "README.md").read_text()
    assert "| reactions | 6 | pull |" in card and "| preferences | 3 | prefs.jsonl |" in card
    assert lineage["version_id"] in card and "r-0" not in card  # counts in the card, ids in heedful.json


def test_next_round_inherits_the_records_of_the_export_it_continued(runs):
    lineage = json.loads((runs / "round2" / "ship" / "package" / "heedful.json").read_text())
    inherited = {(rid, kind, f"round1/{stage}" if stage else None): t for (rid, kind, stage), t in ROUND1.items()}
    assert records_of(lineage) == {**inherited, **{(f"q-{i}", "preferences", None): _when(25) for i in range(3)}}
    assert lineage["feedback_record_counts"] == {"preferences": 6, "reactions": 6}


def test_trace_version_leads_to_the_export_its_run_and_records(runs, tmp_path):
    package = runs / "round1" / "ship" / "package"
    version = adapter_version_id(package)
    found = trace_version(version, [runs])
    assert found.folder == package.resolve() and found.export == package.resolve()
    assert found.run_dir == (runs / "round1").resolve()
    info = found.as_dict()
    assert (info["run"], info["stage"], info["method"]) == ("round1", "align", "dpo")
    assert records_of(info) == ROUND1
    # the tiny model has no hub id, so the run's adapter has the same files: listed, not preferred
    assert (runs / "round1" / "align" / "adapter").resolve() in found.also

    # an export copied away from its runs still answers from its own heedful.json
    shelf = tmp_path / "shelf"
    shutil.copytree(package, shelf / "released")
    away = trace_version(version, [shelf])
    assert away.export == (shelf / "released").resolve() and records_of(away.as_dict()) == ROUND1


def test_trace_of_a_run_adapter_without_export_reads_the_run(runs):
    decoy = runs / "round1" / "decoy" / "adapter"
    found = trace_version(adapter_version_id(decoy), [runs])
    assert found.export is None and found.folder == decoy.resolve()
    assert records_of(found.as_dict()) == {(f"x-{i}", "preferences", None): _when(21) for i in range(3)}


def test_unknown_or_malformed_version_is_a_clear_error(runs, tmp_path):
    with pytest.raises(HeedfulError, match=r"version adp-000000000000 matches none of the \d+ adapter folder"):
        trace_version("adp-000000000000", [runs])
    with pytest.raises(HeedfulError, match="not an adapter version id"):
        trace_version("chatcmpl-123", [runs])
    with pytest.raises(HeedfulError, match="none of the folders to search exists"):
        trace_version("adp-000000000000", [tmp_path / "nowhere"])


def test_trace_command_prints_the_chain_and_the_records(runs):
    app = typer.Typer()
    app.command()(trace)
    version = adapter_version_id(runs / "round2" / "ship" / "package")
    cli = CliRunner()
    shown = cli.invoke(app, ["--version", version, "--runs-dir", str(runs), "-n", "2"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert version in shown.output and "round2" in shown.output and "align (dpo)" in shown.output
    assert "feedback records (2 of 12)" in shown.output and "10 more" in shown.output

    everything = cli.invoke(app, ["--version", version, "--runs-dir", str(runs), "--json"])
    assert everything.exit_code == 0, everything.output
    data = json.loads(everything.output)
    assert data["version"] == version and len(data["feedback_records"]) == 12

    elsewhere = cli.invoke(app, ["--version", version, "--runs-dir", str(runs / "none"), "--exports-dir", str(runs / "round2")])
    assert elsewhere.exit_code == 0 and "round2" in elsewhere.output, elsewhere.output

    refused = cli.invoke(app, ["--version", "adp-000000000000", "--runs-dir", str(runs)])
    assert refused.exit_code != 0 and "matches none" in str(refused.exception)
    neither = cli.invoke(app, ["--runs-dir", str(runs)])
    assert neither.exit_code != 0 and "give a completion id" in str(neither.exception)


ROOT_TOKEN, ALICE_TOKEN = "root-token-0123456789abcdef", "alice-token-0123456789abcdef"


def token_file(path: Path, token: str) -> Path:
    path.write_text(token)
    os.chmod(path, 0o600)
    return path


def test_trace_a_served_completion_end_to_end(runs, tmp_path):
    """serve (base) -> deploy round 2's export -> a user's completion -> trace it by id."""
    users = tmp_path / "users.yaml"
    write_users(users, [UserEntry("root", "admin", hash_token(ROOT_TOKEN)), UserEntry("alice", "user", hash_token(ALICE_TOKEN))])
    admin, alice = token_file(tmp_path / "root.token", ROOT_TOKEN), token_file(tmp_path / "alice.token", ALICE_TOKEN)
    package = runs / "round2" / "ship" / "package"
    settings = ServeSettings(model="tiny", memory=str(tmp_path / "memory.db"), users_file=str(users), max_tokens_default=4)
    app = typer.Typer()
    app.command()(trace)
    cli = CliRunner()
    with ServerThread(settings) as server:
        chat = openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_TOKEN, max_retries=0)

        def ask() -> str:
            reply = chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            return reply.id

        before = ask()
        deploy(server.url, package, ROOT_TOKEN)
        after = ask()

        def run(*args: str):
            return cli.invoke(app, [*args, "--server", server.url, "--runs-dir", str(runs)], env={"COLUMNS": "200"})

        traced = run(after, "--token-file", str(admin), "--json")
        assert traced.exit_code == 0, traced.output
        data = json.loads(traced.output)
        assert data["completion"]["id"] == after and data["version"] == adapter_version_id(package)
        assert data["export"] == str(package.resolve()) and data["run"] == "round2"
        assert len(data["feedback_records"]) == 12 and data["feedback_record_counts"] == {"preferences": 6, "reactions": 6}

        shown = run(after, "--token-file", str(admin))
        assert shown.exit_code == 0 and after in shown.output and "round1/pull" in shown.output

        base = run(before, "--token-file", str(admin))
        assert base.exit_code == 0 and "base model without an adapter" in base.output
        unknown = run("chatcmpl-nope", "--token-file", str(admin))
        assert unknown.exit_code != 0 and "404" in str(unknown.exception) and "chatcmpl-nope" in str(unknown.exception)
        not_admin = run(after, "--token-file", str(alice))
        assert not_admin.exit_code != 0 and "403" in str(not_admin.exception)
