"""Submit responses as an annotator through the same API the web UI uses.

Simulated annotators (the ConvSim user simulator, scripted tests) call
`annotate(dataset, fn, client=...)`: every record still pending for that user is passed to
`fn`, and what it returns is submitted as that user's response. Annotators may not use the
SDK's record endpoints (owner/admin only, 403), so this goes through `/api/v1/me/...` and
`POST /api/v1/records/{id}/responses`, exactly like a person clicking Submit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .argilla_client import ArgillaConnection, ArgillaError, api, connect

PENDING = {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]}]}


@dataclass
class Task:
    """What an annotator sees of a record: its fields, visible metadata and suggestions."""

    id: str  # the heedful (external) id
    argilla_id: str
    fields: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    suggestions: dict[str, Any] = field(default_factory=dict)


def find_dataset(client, name: str, workspace: str | None = None) -> dict[str, Any]:
    """A dataset visible to the current user (annotators included), by name."""
    items = api(client, "GET", "/api/v1/me/datasets", "list my datasets")["items"]
    matches = [d for d in items if d["name"] == name]
    if workspace and len(matches) > 1:
        workspaces = {w["id"]: w["name"] for w in api(client, "GET", "/api/v1/me/workspaces", "list my workspaces")["items"]}
        matches = [d for d in matches if workspaces.get(d["workspace_id"]) == workspace]
    if not matches:
        raise ArgillaError(
            f"dataset '{name}' is not visible to this user: is it pushed, and is the user a member "
            f"of its workspace? (`heedful argilla add-user NAME --workspace {workspace or 'heedful'}`)"
        )
    return matches[0]


def annotate(
    dataset: Any,
    fn: Callable[[Task], dict[str, Any] | None],
    *,
    client=None,
    conn: ArgillaConnection | None = None,
    workspace: str | None = None,
    status: str = "submitted",
    limit: int | None = None,
    page_size: int = 50,
) -> int:
    """Answer pending records of `dataset` (a name or an `rg.Dataset`) with `fn`; returns how many.

    `fn` returns `{question: value}` (submitted with `status`), or
    `{"status": "discarded"}` / `{"status": "draft", "values": {...}}`, or None to skip."""
    client = client or connect(conn)
    if hasattr(dataset, "id") and hasattr(dataset, "name"):
        ds_id, name = str(dataset.id), dataset.name
    else:
        found = find_dataset(client, str(dataset), workspace or (conn.workspace if conn else None))
        ds_id, name = found["id"], found["name"]
    questions = api(client, "GET", f"/api/v1/datasets/{ds_id}/questions", f"read the questions of {name}")["items"]
    names = {q["id"]: q["name"] for q in questions}
    done, skipped = 0, 0
    while limit is None or done < limit:
        page = api(
            client,
            "POST",
            f"/api/v1/me/datasets/{ds_id}/records/search",
            f"list pending records of {name}",
            params={"include": ["suggestions"], "offset": skipped, "limit": page_size},
            json={"filters": PENDING},
        )
        items = page["items"]
        if not items:
            break
        for item in items:
            record = item["record"]
            task = Task(
                id=str(record.get("external_id") or record["id"]),
                argilla_id=record["id"],
                fields=record.get("fields") or {},
                metadata=record.get("metadata") or {},
                suggestions=_suggestions(record, names),
            )
            answer = fn(task)
            if answer is None:
                skipped += 1
                continue
            submit(client, record["id"], answer, status)
            done += 1
            if limit is not None and done >= limit:
                break
    return done


def _suggestions(record: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """question name -> suggested value (the API names questions by id)."""
    return {names.get(s["question_id"], s["question_id"]): s.get("value") for s in record.get("suggestions") or []}


def submit(client, record_id: str, answer: dict[str, Any], status: str = "submitted") -> dict[str, Any]:
    """POST one response for the current user. A discard always carries `"values": {}` (the
    server 500s without it, and that breaks later SDK reads of the dataset)."""
    if "status" in answer and set(answer) <= {"status", "values"}:
        status, values = answer["status"], answer.get("values") or {}
    else:
        values = answer
    body = {"values": {q: {"value": v} for q, v in values.items() if v is not None}, "status": status}
    return api(client, "POST", f"/api/v1/records/{record_id}/responses", f"submit a response to record {record_id}", json=body)
