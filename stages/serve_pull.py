"""serve_pull: new feedback from a running `heedful serve` -> heedful records, quarantined, exactly once.

Why a watermark: the server's feedback rows have growing ids, so "everything after the
last id I took" is an exact, cheap question (`GET /v1/feedback/export?after=N`, admin
only). The cursor (watermark + the ids of every record taken) is an output of this stage,
written in the same atomic commit as the records: a pull that crashes commits neither, so
the rerun asks again from the old watermark and nothing is lost or taken twice; a record id
already in the cursor is skipped even if the server hands it out again (idempotent).

Users' feedback is untrusted: every record passes `feedback.quarantine` (verified author,
rate and volume caps, injection and instruction-like clarifications, duplicates, floods)
before it is written; what is held back goes to the `quarantine` output with the reason.
The cursor is only ever written as this stage's output (never to a shared file a crash could
leave ahead of the records); a later run starts from it with `cursor_file:`. To pull again in
the same run: `heedful run P.yaml --force pull`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from feedback.quarantine import QuarantineSettings
from feedback.served_kinds import OUTPUT_OF, conversational_preference
from pipeline.paths import ConfigPath
from pipeline.stage import Output, Stage, StageConfig


class ServePullConfig(StageConfig):
    url: str = Field(description="the server, e.g. http://127.0.0.1:8000")
    token_file: ConfigPath | None = Field(default=None, description="admin token file, mode 0600 (else $HEEDFUL_TOKEN)")
    cursor_file: ConfigPath | None = Field(
        default=None,
        description="start from this cursor.json (e.g. the previous "
        "round's output); default: this stage's last output in this run",
    )
    incremental: bool = Field(default=True, description="start after the previous pull's watermark")
    page: int = Field(default=1000, ge=1, le=10_000, description="records per request")
    quarantine: QuarantineSettings = Field(default_factory=QuarantineSettings)

    def credential_fields(self) -> tuple[str, ...]:
        """Where the admin token is read: not part of what the stage computes (pipeline/fingerprint.py)."""
        return ("token_file",)


def fetch_new(url: str, token: str | None, watermark: int, seen: set[str], page: int = 1000) -> tuple[list[dict[str, Any]], int]:
    """(new export rows in id order, the new watermark); rows whose record id is in `seen` are skipped."""
    import httpx

    from pipeline.errors import HeedfulError
    from serving.deploy_cli import server_root

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows, mark = [], watermark
    while True:
        try:
            r = httpx.get(
                server_root(url) + "/v1/feedback/export",
                headers=headers,
                params={"after": mark, "limit": page},
                timeout=120,
            )
        except httpx.HTTPError as exc:
            raise HeedfulError(f"serve_pull: cannot reach {url}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise HeedfulError(f"serve_pull: {url} refused the export ({r.status_code}): {message}")
        body = r.json()
        for row in body["data"]:
            record_id = str((row.get("record") or {}).get("id"))
            if record_id not in seen:
                seen.add(record_id)
                rows.append(row)
        mark = int(body["watermark"])
        if not body.get("more"):
            return rows, mark


def check_records(rows: list[dict[str, Any]], url: str) -> list[dict[str, Any]]:
    """Each record validated against its heedful schema; a bad one names the server row and field."""
    from pydantic import ValidationError

    from pipeline.errors import DataError
    from pipeline.schema import KINDS

    out = []
    for row in rows:
        kind = OUTPUT_OF.get(row.get("kind", ""))  # "" is no kind: same as a missing one
        if kind is None:
            continue  # a kind this stage does not turn into training data
        try:
            out.append(KINDS[kind].model_validate(row["record"]).model_dump(mode="json"))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{url} feedback row {row.get('id')}: field '{field}': {first['msg']}") from None
    return out


class ServePullStage(Stage):
    uses = "serve_pull"
    version = (
        "2"  # 2: edits and follow-ups pass the quarantine's text checks (a pull made before may hold what they now hold back)
    )
    summary = "Pull new feedback from a running heedful serve (by watermark), quarantined, as heedful records."
    Config = ServePullConfig
    inputs = {}
    outputs = {
        "reactions": Output("reactions", required=False, doc="love / neutral / dislike on a completion"),
        "verbal_feedback": Output("verbal_feedback", required=False, doc="critiques and clarifications"),
        "preferences": Output("preferences", required=False, doc="user edits: edit preferred over the reply"),
        "followups": Output("followups", required=False, doc="the user's next turn after a reply"),
        "quarantine": Output("report", required=False, doc="records held back, with the reason"),
        "cursor": Output("cursor", doc="watermark and ids of every record pulled so far"),
    }

    def run(self):
        from feedback.quarantine import candidate_from_record, quarantine
        from pipeline.artifacts import atomic_write_json
        from pipeline.records import save_rows
        from serving.deploy_cli import read_token, server_root

        cfg: ServePullConfig = self.config
        previous = self.ctx.run_dir / self.ctx.name / "cursor" / "cursor.json"
        cursor_path = Path(cfg.cursor_file).expanduser() if cfg.cursor_file else previous
        state = {"url": cfg.url, "watermark": 0, "ids": []}
        if cfg.incremental and cursor_path.is_file():
            loaded = json.loads(cursor_path.read_text(encoding="utf-8"))
            if server_root(str(loaded.get("url", ""))) == server_root(cfg.url):
                state = {**loaded, "url": cfg.url}
            else:  # another server: its watermarks count other records
                self.ctx.log.warning(
                    "serve_pull: the cursor %s is for %s, not %s: pulling %s from the start",
                    cursor_path,
                    loaded.get("url"),
                    cfg.url,
                    cfg.url,
                )
        token = read_token(Path(cfg.token_file) if cfg.token_file else None)  # falls back to $HEEDFUL_TOKEN
        seen = set(state["ids"])
        rows, watermark = fetch_new(cfg.url, token, int(state["watermark"]), seen, cfg.page)
        records = check_records(rows, cfg.url)
        created = {str(r["record"].get("id")): r["created"] for r in rows}
        result = quarantine([candidate_from_record(r, created.get(r["id"])) for r in records], cfg.quarantine)
        kept = {c.id for c in result.kept}
        by_kind: dict[str, list[dict]] = {}
        for rec in records:
            if rec["id"] in kept:
                kind = OUTPUT_OF[rec["kind"]]
                by_kind.setdefault(kind, []).append(conversational_preference(rec) if kind == "preferences" else rec)
        for kind, kind_rows in by_kind.items():
            save_rows(kind_rows, self.ctx.output(kind))
        if result.quarantined:
            save_rows(
                [{**(row := h.row()), "record": json.dumps(row["record"])} for h in result.quarantined],
                self.ctx.output("quarantine"),
            )
        new_state = {"url": cfg.url, "watermark": watermark, "ids": sorted(seen)}
        out = self.ctx.output("cursor")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "cursor.json", new_state)
        self.ctx.log.info(
            "%s: %d new record(s) up to watermark %d; %d kept, %d quarantined",
            cfg.url,
            len(records),
            watermark,
            len(result.kept),
            len(result.quarantined),
        )
        return {"new": len(records), "watermark": watermark, **result.counts(), **{kind: len(v) for kind, v in by_kind.items()}}
