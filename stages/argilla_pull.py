"""argilla_pull: annotators' responses -> heedful feedback records, only what is new.

A pull is not a pure function of its config: annotators keep working. So the stage keeps
a cursor (response id -> updated_at) as an output; a forced rerun reads the previous
cursor of the same stage (or `cursor_file`, shared across runs) and writes only responses
that are new or changed since. To fetch new annotations: `heedful run P.yaml --force pull`.
To start over: `incremental: false` (or a `since:` timestamp).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from feedback.argilla_client import ArgillaConnection
from pipeline.stage import Input, Output, Stage, StageConfig


class ArgillaPullConfig(StageConfig):
    dataset: str | None = Field(default=None, description="Argilla dataset name (default: the `pushed` input's)")
    argilla: ArgillaConnection = Field(default_factory=ArgillaConnection)
    include_drafts: bool = Field(default=False, description="also pull draft (not yet submitted) responses")
    incremental: bool = Field(default=True, description="skip responses the previous pull already wrote")
    since: str | None = Field(default=None, description="only responses updated at/after this UTC time (ISO 8601)")
    cursor_file: str | None = Field(default=None, description="cursor shared across runs (default: this stage's last output)")
    accumulate: bool = Field(default=False, description="output = previous output + new (newer versions replace older)")
    on_invalid_span: Literal["error", "report"] = "error"


class ArgillaPullStage(Stage):
    uses = "argilla_pull"
    summary = "Pull submitted Argilla responses incrementally as span/verbal/preference/reaction records."
    Config = ArgillaPullConfig
    inputs = {"pushed": Input(("argilla_records",), required=False, doc="argilla_push output (orders pull after push)")}
    outputs = {
        "span_feedback": Output("span_feedback", required=False, doc="fine_grained template"),
        "verbal_feedback": Output("verbal_feedback", required=False, doc="verbal template"),
        "preferences": Output("preferences", required=False, doc="preference template (ties are counted, not written)"),
        "reactions": Output("reactions", required=False, doc="reaction template"),
        "cursor": Output("cursor", doc="response id -> updated_at of everything pulled so far"),
        "invalid": Output("report", required=False, doc="responses whose spans do not fit (on_invalid_span: report)"),
    }

    def run(self):
        from feedback.argilla_client import connect
        from feedback.argilla_sync import pull
        from feedback.argilla_templates import OUTPUT_KIND
        from pipeline.artifacts import atomic_write_json
        from pipeline.errors import DataError
        from pipeline.records import load_rows, save_rows
        from pipeline.schema import records_to_rows

        cfg: ArgillaPullConfig = self.config
        name, workspace = cfg.dataset, cfg.argilla.workspace
        pushed = self.ctx.input("pushed")
        if pushed is not None:
            first = load_rows(pushed, required=["dataset", "workspace"], what="pushed records")[:1]
            if first and not name:
                name, workspace = first[0]["dataset"], first[0]["workspace"]
        if not name:
            raise DataError("argilla_pull: set `dataset:` or wire a `pushed` input from argilla_push")
        previous = self.ctx.run_dir / self.ctx.name
        cursor_path = Path(cfg.cursor_file).expanduser() if cfg.cursor_file else previous / "cursor" / "cursor.json"
        cursor = {}
        if cfg.incremental and cursor_path.is_file():
            state = json.loads(cursor_path.read_text())
            if state.get("dataset") == f"{workspace}/{name}":
                cursor = state.get("responses", {})
        statuses = ["submitted", "draft"] if cfg.include_drafts else ["submitted"]
        client = connect(cfg.argilla)
        result = pull(client, name, workspace, statuses, cursor, cfg.since, cfg.on_invalid_span)
        kind = OUTPUT_KIND[result.kind]
        rows = records_to_rows(result.records)
        if cfg.accumulate and (previous / kind).exists():
            new_ids = {r["id"] for r in rows}
            rows = [r for r in load_rows(previous / kind) if r["id"] not in new_ids] + rows
        save_feedback(rows, kind, self.ctx.output(kind))
        state = {"dataset": result.dataset, "statuses": statuses, "responses": result.cursor}
        out = self.ctx.output("cursor")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "cursor.json", state)
        if cfg.cursor_file:
            cursor_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cursor_path, state)
        if result.invalid:
            self.ctx.log.warning("%d response(s) have spans that do not fit; see the `invalid` output", len(result.invalid))
            save_rows(result.invalid, self.ctx.output("invalid"))
        self.ctx.log.info(
            "%s: %d new record(s), %d already pulled, %d tie(s), from %d annotator(s)",
            result.dataset,
            len(result.records),
            result.already_pulled,
            result.ties,
            len(result.annotators),
        )
        return {
            "new": len(result.records),
            "records": len(rows),
            "already_pulled": result.already_pulled,
            "ties": result.ties,
            "invalid": len(result.invalid),
            "annotators": len(result.annotators),
            "output": kind,
        }


def save_feedback(rows: list[dict], kind: str, path: Path) -> None:
    """Save records; an empty pull still writes a loadable, typed dataset (0 rows)."""
    import os
    import shutil

    from datasets import Dataset

    from pipeline.records import save_rows
    from pipeline.schema import Preference, Provenance, Reaction, Span, SpanFeedback, VerbalFeedback

    if rows:
        save_rows(rows, path)
        return
    prov = Provenance(source="argilla", annotator="", dataset="", record_id="")
    example = {
        "span_feedback": SpanFeedback(
            id="",
            prompt="",
            response="x",
            spans=[Span(start=0, end=1, label="x", text="x")],
            corrected_response="",
            missing_info="",
            provenance=prov,
        ),
        "verbal_feedback": VerbalFeedback(id="", prompt="", response="", critique="", judgment="good", scope="", provenance=prov),
        "preferences": Preference(id="", prompt="", chosen="", rejected="", rationale="", provenance=prov),
        "reactions": Reaction(id="", prompt="", response="", reaction="love", user_id="", provenance=prov),
    }[kind]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    empty = Dataset.from_list([example.model_dump(mode="json")]).select([]).flatten_indices()
    empty.save_to_disk(str(tmp), num_shards=1)  # 0 shards would not load back
    os.replace(tmp, path)
