"""Push items into an Argilla dataset and pull annotations back out, incrementally.

Push creates the workspace and dataset when missing and upserts records by their stable
external id in batches (re-pushing updates, never duplicates; existing responses stay).
Pull reads responses with the wanted statuses, skips those already in the cursor
(response id -> updated_at), and turns the rest into heedful records; a response whose
spans do not fit the response text is reported with its record id, never dropped quietly.
It also says which answers stand now (`live`) and which it read again (`reread`), so an
accumulating pull can withdraw the rows of answers that were changed to a tie, discarded or
deleted (`withdraw`).
"""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DataError, UserError
from pipeline.progress import track

from .argilla_client import ArgillaError, api, errors
from .argilla_templates import (
    InvalidSpan,
    PushItem,
    TemplateOptions,
    detect_kind,
    parse_response,
    row_id,
    settings,
    to_record,
)

PAGE = 1000  # the server's maximum page size for record search


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The SDK warns on every lookup that finds nothing; we handle None ourselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def find_dataset(client, name: str, workspace: str):
    with quiet(), errors(f"look up dataset {workspace}/{name}"):
        if client.workspaces(workspace) is None:
            return None
        return client.datasets(name=name, workspace=workspace)


def ensure_workspace(client, name: str):
    import argilla as rg

    with quiet(), errors(f"create workspace {name}"):
        return client.workspaces(name) or rg.Workspace(name=name, client=client).create()


def ensure_dataset(client, name: str, workspace: str, opts: TemplateOptions):
    """The dataset, created from the template if missing; an existing one must match it."""
    import argilla as rg

    ds = find_dataset(client, name, workspace)
    if ds is None:
        ensure_workspace(client, workspace)
        with errors(f"create dataset {workspace}/{name}"):
            return rg.Dataset(name=name, workspace=workspace, settings=settings(opts, client), client=client).create()
    have = {q.name for q in ds.settings.questions}
    want = {q.name for q in settings(opts, client).questions}
    if not want <= have:
        raise ArgillaError(
            f"dataset {workspace}/{name} exists with questions {sorted(have)}, but the "
            f"'{opts.kind}' template needs {sorted(want)}: push to another dataset name"
        )
    if opts.kind == "fine_grained":
        labels = set(ds.settings.questions["spans"].labels)
        if not set(opts.span_labels) <= labels:
            raise ArgillaError(
                f"dataset {workspace}/{name} has span labels {sorted(labels)}; the config asks for "
                f"{sorted(opts.span_labels)}: push to another dataset name"
            )
    return ds


def ensure_user(client, username: str, workspace: str, role: str = "annotator") -> tuple[Any, str | None]:
    """(user id, new password or None if the user existed); the user joins `workspace`."""
    import argilla as rg

    with quiet(), errors(f"create user {username}"):
        user = client.users(username)
        password = None
        if user is None:
            password = secrets.token_urlsafe(12)
            user = rg.User(username=username, password=password, role=role, client=client).create()
        ws = ensure_workspace(client, workspace)
        if username not in {u.username for u in ws.users}:
            ws.add_user(user)
        return user.id, password


@dataclass
class PushResult:
    dataset: str
    workspace: str
    dataset_id: str
    url: str
    created: int = 0
    updated: int = 0
    seconds: float = 0.0
    ids: list[str] = field(default_factory=list)
    new_users: dict[str, str] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return (self.created + self.updated) / max(self.seconds, 1e-9)


def push_items(
    client,
    name: str,
    workspace: str,
    opts: TemplateOptions,
    items: list[PushItem],
    batch_size: int = 250,
    desc: str = "argilla push",
) -> PushResult:
    started = time.time()
    ids = [item.id for item in items]
    dupes = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    if dupes:
        raise DataError(f"{len(dupes)} items share an id (e.g. {sorted(dupes)[0]}): each sample must be unique")
    ds = ensure_dataset(client, name, workspace, opts)
    user_ids, new_users = {}, {}
    for username in sorted({r["user"] for item in items for r in item.responses}):
        user_ids[username], password = ensure_user(client, username, workspace)
        if password:
            new_users[username] = password
    result = PushResult(
        dataset=name,
        workspace=workspace,
        dataset_id=str(ds.id),
        url=f"{client.api_url.rstrip('/')}/dataset/{ds.id}/annotation-mode",
        ids=ids,
        new_users=new_users,
    )
    before = count_records(client, str(ds.id))
    batch_size = max(1, min(batch_size, 500))
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in track(batches, desc=f"{desc}: batches of {batch_size}"):
        models = []
        for item in batch:
            record = to_record(item, opts, user_ids)
            record.dataset = ds
            models.append(record.api_model())
        with errors(f"upsert {len(models)} records into {workspace}/{name}"):
            client.api.records.bulk_upsert(dataset_id=ds.id, records=models)
    # the server's bulk answer drops `updated_item_ids` (its response model omits it): count instead
    result.created = count_records(client, str(ds.id)) - before
    result.updated = len(items) - result.created
    result.seconds = time.time() - started
    return result


def count_records(client, dataset_id: str) -> int:
    res = api(client, "POST", f"/api/v1/datasets/{dataset_id}/records/search", "count records", params={"limit": 1}, json={})
    return int(res.get("total", 0))


# -- pull ------------------------------------------------------------------------------------


@dataclass
class PullResult:
    kind: str
    dataset: str
    records: list = field(default_factory=list)
    cursor: dict[str, str] = field(default_factory=dict)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    ties: int = 0
    already_pulled: int = 0
    older_than_since: int = 0
    responses_seen: int = 0
    annotators: set[str] = field(default_factory=set)
    seconds: float = 0.0
    #: row ids (`row_id`) of every response now in the wanted statuses, read this time or not
    live: set[str] = field(default_factory=set)
    #: row ids of the responses read this time (new or changed), whatever they yielded
    reread: set[str] = field(default_factory=set)


def iter_records(
    client, dataset_id: str, statuses: Iterable[str], page: int | None = None, attempts: int = 5
) -> Iterator[dict[str, Any]]:
    """Every record with at least one response in `statuses`, with responses (raw JSON:
    unlike the SDK's models it keeps each response's id and timestamps), each once.

    The server pages the search by offset. A record that leaves the filter while the pages are read
    (an answer discarded, a record deleted, mid-pull) would shift every later record back one place
    and the next page would start one record late: that record's answer, unchanged, would read as
    withdrawn, and the cursor would keep it from ever being read again. So the pages overlap by one
    record, and a page that does not start with the previous page's last record (the set changed
    under the listing) starts the listing over; after `attempts` such changes, a clear error."""
    body = {
        "filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": list(statuses)}]},
        "sort": [{"scope": {"entity": "record", "property": "inserted_at"}, "order": "asc"}],
    }
    for _ in range(attempts):
        listed = _list_records(client, dataset_id, body, max(2, page or PAGE))
        if listed is not None:
            yield from listed
            return
    raise ArgillaError(f"the records of dataset {dataset_id} changed under each of {attempts} listings: pull again")


def _list_records(client, dataset_id: str, body: dict[str, Any], page: int) -> list[dict[str, Any]] | None:
    """One listing, pages overlapping by one record; None when a page did not start where the
    previous one ended (`iter_records`)."""
    records: list[dict[str, Any]] = []
    while True:
        res = api(
            client,
            "POST",
            f"/api/v1/datasets/{dataset_id}/records/search",
            "search records",
            params={"include": ["responses"], "offset": max(len(records) - 1, 0), "limit": page},
            json=body,
        )
        items = [item["record"] for item in res["items"]]
        if records:
            if not items or items[0]["id"] != records[-1]["id"]:
                return None
            items = items[1:]
        records.extend(items)
        if not items or len(records) >= res.get("total", 0):
            return records


def _naive_utc(ts: str) -> str:
    """An ISO time -> the server's naive UTC form ('2026-01-02T03:04:05'), for string comparison.

    An offset is converted, not dropped: '05:00+02:00' is 03:00 UTC (cutting the text at '+'
    kept 05:00, and a '-05:00' offset stayed in the string). A time without one is UTC."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(ts.strip().replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
    except ValueError:
        raise UserError(f"since: {ts!r} is not an ISO 8601 time (e.g. 2026-01-02T03:04:05+02:00)") from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat()


def pull(
    client,
    name: str,
    workspace: str,
    statuses: Iterable[str] = ("submitted",),
    cursor: dict[str, str] | None = None,
    since: str | None = None,
    on_invalid: str = "error",
) -> PullResult:
    started = time.time()
    statuses = list(statuses)
    ds = find_dataset(client, name, workspace)
    if ds is None:
        raise ArgillaError(f"dataset {workspace}/{name} not found on {client.api_url}: push it first")
    questions = {q.name: q for q in ds.settings.questions}
    kind = detect_kind(set(questions))
    labels = list(questions["spans"].labels) if kind == "fine_grained" else None
    with errors("list users"):
        users = {str(u.id): u.username for u in client.users}
    ref = f"{workspace}/{name}"
    result = PullResult(kind=kind, dataset=ref, cursor=dict(cursor or {}))
    since_key = _naive_utc(since) if since else None
    for record in iter_records(client, str(ds.id), statuses):
        for response in record.get("responses") or []:
            if response.get("status") not in statuses:
                continue
            result.responses_seen += 1
            key, updated = str(response["id"]), response.get("updated_at") or ""
            annotator = users.get(str(response.get("user_id")), str(response.get("user_id")))
            result.live.add(row_id(record, annotator))
            if result.cursor.get(key) == updated:
                result.already_pulled += 1
                continue
            if since_key and updated < since_key:
                result.older_than_since += 1
                continue
            result.reread.add(row_id(record, annotator))
            try:
                records = parse_response(kind, record, response, annotator, ref, labels)
            except InvalidSpan as exc:
                result.invalid.append(
                    {"record_id": str(record.get("external_id") or record["id"]), "annotator": annotator, "problem": str(exc)}
                )
                continue
            if kind == "preference" and not records:
                result.ties += 1
            result.records.extend(records)
            result.annotators.add(annotator)
            result.cursor[key] = updated
    if result.invalid and on_invalid == "error":
        shown = "\n".join(f"  {p['problem']} (annotator {p['annotator']})" for p in result.invalid[:10])
        more = f"\n  ... and {len(result.invalid) - 10} more" if len(result.invalid) > 10 else ""
        raise DataError(
            f"{ref}: {len(result.invalid)} response(s) with spans that do not fit the response text:\n"
            f"{shown}{more}\n(nothing was written; set on_invalid_span: report to write them to the "
            "`invalid` output and pull the rest)"
        )
    result.seconds = time.time() - started
    return result


def withdraw(previous: list[dict[str, Any]], result: PullResult) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows of an earlier pull of `result`'s dataset that still stand, and what was withdrawn.

    A row stands while its answer does: the annotator's response is still in the pulled
    statuses (`live`) and was not read again this time (`reread`: a changed answer is replaced
    by what it yields now, which is nothing for a tie, an emptied critique or an invalid span).
    Withdrawn: `changed` (read again, now yields no record) and `gone` (the response was
    discarded, sent back to draft, deleted, or its record was deleted: the search lists every
    record with an answer in the statuses, so one it no longer lists has none). A row of another
    dataset is kept: this pull cannot see its answers."""
    return standing(previous, result.dataset, result.live, result.reread, {str(r.id) for r in result.records})


def standing(
    previous: list[dict[str, Any]], dataset: str, live: set[str], reread: set[str], new_ids: set[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """`withdraw` from what a pull of `dataset` ("workspace/name") saw: the row ids whose answers
    stand (`live`), those it read again (`reread`) and the ids of the rows it wrote (`new_ids`,
    which replace their earlier versions). Also what the closed loop's reward pool applies to each
    earlier round's rows, from a round's `answers.json` (stages/argilla_pull.py)."""
    kept: list[dict[str, Any]] = []
    counts = {"changed": 0, "gone": 0}
    for row in previous:
        rid = str(row.get("id"))
        if (row.get("provenance") or {}).get("dataset") != dataset:
            if rid not in new_ids:
                kept.append(row)
        elif rid in live and rid not in reread:
            kept.append(row)
        elif rid not in new_ids:
            counts["changed" if rid in live else "gone"] += 1
    return kept, counts
