"""`heedful memory export` keeps every kind of feedback the server takes, as `serve_pull` does.

The bug this guards: the export turned only reactions and verbal feedback into datasets, so a
user's edit (a preference: their text preferred over the reply) and their follow-up turns
were silently dropped, while `serve_pull` kept them. Both now read one table
(`feedback/served_kinds.py`); a kind the server adds without a row there fails here.

A real uvicorn server on 127.0.0.1 (tiny model) takes a real chat completion, an edit and a
follow-up from a user with a token; the real CLI command exports the memory file.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from typer.testing import CliRunner

from feedback.served_kinds import OUTPUT_OF, artifact_kind
from pipeline.records import load_rows
from pipeline.schema import KINDS, SpanFeedback, rows_to_records
from serving.identity import UserEntry, hash_token, write_users
from serving.local import ServerThread
from serving.memory_cli import app as memory_app
from serving.service import ServeSettings

TOKEN = "alice-token-0123456789abcdef"


def test_the_table_covers_every_served_kind():
    served = {cls.model_fields["kind"].default for cls in KINDS.values()} - {SpanFeedback.model_fields["kind"].default}
    assert set(OUTPUT_OF) == served  # every record kind the server logs has an artifact kind
    assert all(KINDS[artifact_kind(kind)].model_fields["kind"].default == kind for kind in OUTPUT_OF)
    assert artifact_kind("span") is None and artifact_kind("") is None


@pytest.fixture(scope="module")
def live(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_kinds")
    users = root / "users.yaml"
    write_users(users, [UserEntry("alice", "user", hash_token(TOKEN))])
    settings = ServeSettings(model="tiny", memory=str(root / "memory.db"), users_file=str(users), max_tokens_default=4)
    with ServerThread(settings) as server:
        server.memory = root / "memory.db"  # where the export reads from
        yield server


def test_memory_export_keeps_edits_and_followups(live, tmp_path):
    chat = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKEN, max_retries=0)
    # sampled, seeded: bare `tiny` writes the same empty greedy reply to every prompt, and the export must
    # be seen to pick this reply, not the next turn's
    first = chat.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=1.0, seed=1
    )
    reply = first.choices[0].message.content
    r = httpx.post(
        live.url + "/v1/feedback",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"completion_id": first.id, "reaction": "love", "edit": "Blue, like the sky."},
    )
    assert r.status_code == 200, r.text
    second = chat.chat.completions.create(  # the user's next turn in the same conversation: a follow-up record
        model="tiny",
        messages=[{"role": "user", "content": "Another one."}],
        max_tokens=4,
        temperature=1.0,
        seed=2,
        extra_body={"conversation_id": first.model_extra["conversation_id"]},
    )
    assert reply and reply != second.choices[0].message.content

    dest = tmp_path / "export"
    done = CliRunner().invoke(memory_app, ["export", "--to", str(dest), "--memory", str(live.memory)])
    assert done.exit_code == 0, done.output
    counts = json.loads((dest / "export.json").read_text())["counts"]
    assert counts["preferences"] == 1 and counts["followups"] == 1 and counts["reactions"] == 1

    (edit,) = rows_to_records("preferences", load_rows(dest / "preferences"))
    assert edit.provenance.annotator == "alice" and json.loads(edit.provenance.extra or "{}")["feedback"] == "edit"
    # in the export's conversational columns, like the pairs it derives (one dataset, one shape)
    assert edit.prompt == [{"role": "user", "content": "Name a colour."}]
    assert edit.chosen == [{"role": "assistant", "content": "Blue, like the sky."}]
    assert edit.rejected == [{"role": "assistant", "content": reply}]
    (followup,) = rows_to_records("followups", load_rows(dest / "followups"))
    assert followup.followup == "Another one." and followup.response == reply
    assert [r.reaction for r in rows_to_records("reactions", load_rows(dest / "reactions"))] == ["love"]
