"""Simulated users from data: a JSONL of needs, generate's responses, or a ClariQ TSV.

Accepted rows (first match wins):
  ClariQ       initial_request + facet_desc (+ facet_id): one user per facet, the need is
               facet_desc, the first turn initial_request
  needs/rows   a `need` field and a request in `prompt` (or `request`); generate's
               responses also carry `response`, the policy's first reply
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.records import load_rows

from .protocol import SimulatedUser


def is_clariq(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and "facet_desc" in rows[0] and "initial_request" in rows[0]


def clariq_users(rows: list[dict[str, Any]]) -> list[SimulatedUser]:
    users: dict[str, SimulatedUser] = {}
    for row in rows:
        fid = str(row.get("facet_id") or row["facet_desc"])
        if fid not in users and str(row["facet_desc"]).strip():
            users[fid] = SimulatedUser(
                id=f"clariq:{fid}", need=str(row["facet_desc"]).strip(), request=str(row["initial_request"]).strip()
            )
    return list(users.values())


def _pick(options: list[str], key: str, seed: int) -> str:
    if not options:
        return ""
    h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest(), 16)
    return options[h % len(options)]


def load_users(
    path: Path,
    need_field: str = "need",
    request_field: str = "prompt",
    personas: list[str] | None = None,
    styles: list[str] | None = None,
    seed: int = 0,
    max_users: int | None = None,
    system_prompt: str | None = None,
    facts_field: str | None = "keywords",
    rows: list[dict[str, Any]] | None = None,
) -> list[SimulatedUser]:
    """Users from `path`; persona/style come from the row, else a seeded pick from the lists.

    `system_prompt`: the policy's system prompt; None = the row's `system_prompt` (generate
    writes one), else none. `facts_field`: a list of facts a satisfying reply mentions.
    `rows`: `path`'s rows already read (evaluate drops exact repeats first); `path` then only
    names them in messages.
    """
    if rows is None:
        rows = load_rows(path, what="information needs")
    if is_clariq(rows):
        users = clariq_users(rows)
        for u in users:
            u.system_prompt = system_prompt
    else:
        users = []
        for i, row in enumerate(rows):
            # a dataset column a row has no value in reads as None: fall back then too
            request = row.get(request_field)
            if request is None:
                request = row.get("request")
            need = row.get(need_field)
            if need is None or request is None:
                missing = need_field if need is None else request_field
                raise DataError(
                    f"{path} row {i + 1}: field '{missing}' is missing (information needs need "
                    f"'{need_field}' and '{request_field}', or ClariQ's facet_desc and initial_request)"
                )
            base = str(row.get("prompt_id") or row.get("id") or f"row{i}")
            uid = f"{base}:{row['sample_index']}" if "sample_index" in row else base
            system = system_prompt if system_prompt is not None else (row.get("system_prompt") or None)
            facts = row.get(facts_field) if facts_field else None
            if facts is not None and not (isinstance(facts, list) and all(isinstance(f, str) for f in facts)):
                raise DataError(
                    f"{path} row {i + 1}: field '{facts_field}' must be a list of strings (facts a "
                    f"satisfying reply mentions), got {type(facts).__name__}"
                )
            users.append(
                SimulatedUser(
                    id=uid,
                    need=str(need),
                    request=str(request),
                    persona=str(row.get("persona") or ""),
                    style=str(row.get("style") or ""),
                    system_prompt=system or None,
                    facts=list(facts or []),
                    first_reply=str(row["response"]) if row.get("response") is not None else None,
                )
            )
    if not users:
        raise DataError(f"{path}: no information needs found")
    for u in users:
        u.persona = u.persona or _pick(personas or [], u.id + ":persona", seed)
        u.style = u.style or _pick(styles or [], u.id + ":style", seed)
    return users[:max_users] if max_users else users
