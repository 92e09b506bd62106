"""argilla_pull: annotators' responses -> heedful feedback records, only what is new.

A pull is not a pure function of its config: annotators keep working. So the stage keeps
a cursor (response id -> updated_at) as an output; a forced rerun reads the previous
cursor of the same stage (or `cursor_file`, shared across runs) and writes only responses
that are new or changed since. To fetch new annotations: `heedful run P.yaml --force pull`.
To start over: `incremental: false` (or a `since:` timestamp).

`heedful loop` (`loop.argilla:`) chains rounds by this cursor the way it chains serve_pull's:
it names the previous round's committed cursor as `cursor_file` with `write_cursor_file: false`,
so the new cursor exists only as this stage's output, committed with its records (a kill before
that commit leaves the previous cursor as it was: nothing lost, nothing pulled twice), and with
`if_missing: empty`, because the loop's own stages may push the dataset only in a later round.

`accumulate: true` keeps what earlier pulls wrote, each (record, annotator) once in its newest
version, and only while the answer stands: an annotator who changes a preference to a tie,
empties a critique or reaction, discards or un-submits the record, or a response or record
deleted in Argilla withdraws the earlier row (`withdrawn` in the metrics and the log). The pull
can tell because it lists every record with an answer in the pulled statuses on each run (the
cursor only saves re-parsing): an answer no longer listed is gone. A dataset deleted as a whole
is an error, or with `if_missing: empty` a dataset without answers: its earlier rows are withdrawn
too (counted), rows of another dataset kept, the output written with what is left.

Every pull also says which answers stand, beside its cursor (`cursor/answers.json`: the row ids
of the responses now in the pulled statuses, `live`, and of those read again, `reread`; both
empty for a dataset that does not exist). The loop's pulls do not accumulate, one round's
records per round, so the loop's reward pool (pipeline/loop_rewards.py `pooled_rows`) withdraws
earlier rounds' rows by each later round's `answers.json`, by the rule `accumulate` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from feedback.argilla_client import ArgillaConnection
from pipeline.paths import ConfigPath
from pipeline.stage import Input, Output, Stage, StageConfig


class ArgillaPullConfig(StageConfig):
    dataset: str | None = Field(default=None, description="Argilla dataset name (default: the `pushed` input's)")
    argilla: ArgillaConnection = Field(default_factory=ArgillaConnection)
    include_drafts: bool = Field(default=False, description="also pull draft (not yet submitted) responses")
    incremental: bool = Field(default=True, description="skip responses the previous pull already wrote")
    since: str | None = Field(
        default=None, description="only responses updated at/after this time (ISO 8601; UTC unless it carries an offset)"
    )
    cursor_file: ConfigPath | None = Field(
        default=None, description="cursor shared across runs (default: this stage's last output)"
    )
    write_cursor_file: bool = Field(
        default=True, description="also write the new cursor to cursor_file (false: only read it; the loop's way)"
    )
    if_missing: Literal["error", "empty"] = Field(
        default="error", description="a dataset not pushed yet: fail, or pull nothing (the loop's way)"
    )
    accumulate: bool = Field(
        default=False,
        description="output = previous output + new (newer versions replace older; a withdrawn answer removes its row)",
    )
    on_invalid_span: Literal["error", "report"] = "error"


class ArgillaPullStage(Stage):
    uses = "argilla_pull"
    # 2: accumulate drops the rows of answers withdrawn (tie, discarded, deleted); 3: cursor/answers.json
    # (which answers stand, for the loop's reward pool); a dataset deleted as a whole withdraws accumulated rows
    version = "3"
    summary = "Pull submitted Argilla responses incrementally as span/verbal/preference/reaction records."
    Config = ArgillaPullConfig
    inputs = {"pushed": Input(("argilla_records",), required=False, doc="argilla_push output (orders pull after push)")}
    outputs = {
        "span_feedback": Output("span_feedback", required=False, doc="fine_grained template"),
        "verbal_feedback": Output("verbal_feedback", required=False, doc="verbal template"),
        "preferences": Output("preferences", required=False, doc="preference template (ties are counted, not written)"),
        "reactions": Output("reactions", required=False, doc="reaction template"),
        "cursor": Output(
            "cursor", doc="response id -> updated_at of everything pulled so far; answers.json: the answers standing now"
        ),
        "invalid": Output("report", required=False, doc="responses whose spans do not fit (on_invalid_span: report)"),
    }

    def run(self):
        from feedback.argilla_client import connect
        from feedback.argilla_sync import find_dataset, pull, withdraw
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
        cursor = read_cursor(cursor_path, f"{workspace}/{name}") if cfg.incremental else {}
        client = connect(cfg.argilla)
        out = self.ctx.output("cursor")
        out.mkdir(parents=True, exist_ok=True)
        if cfg.if_missing == "empty" and find_dataset(client, name, workspace) is None:
            return self.missing(cfg, f"{workspace}/{name}", cursor, previous)
        result = pull(client, name, workspace, statuses(cfg), cursor, cfg.since, cfg.on_invalid_span)
        kind = OUTPUT_KIND[result.kind]
        rows = records_to_rows(result.records)
        withdrawn = {"changed": 0, "gone": 0}
        if cfg.accumulate and (previous / kind).exists():
            kept, withdrawn = withdraw(load_rows(previous / kind), result)
            rows = kept + rows
        save_feedback(rows, kind, self.ctx.output(kind))
        state = {"dataset": result.dataset, "statuses": statuses(cfg), "responses": result.cursor}
        atomic_write_json(out / "cursor.json", state)
        write_answers(out, result.dataset, result.live, result.reread)
        if cfg.cursor_file and cfg.write_cursor_file:
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
        if sum(withdrawn.values()):
            self.ctx.log.info(
                "%s: %d earlier record(s) withdrawn: %d answered again without a record (a tie, an empty answer, "
                "an invalid span), %d discarded, back to draft or deleted",
                result.dataset,
                sum(withdrawn.values()),
                withdrawn["changed"],
                withdrawn["gone"],
            )
        return {
            "new": len(result.records),
            "records": len(rows),
            "already_pulled": result.already_pulled,
            "ties": result.ties,
            "withdrawn": sum(withdrawn.values()),
            "invalid": len(result.invalid),
            "annotators": len(result.annotators),
            "output": kind,
        }

    def missing(self, cfg: ArgillaPullConfig, dataset: str, cursor: dict[str, str], previous: Path) -> dict:
        """`if_missing: empty` and the dataset does not exist: nothing to pull, the cursor kept, no
        answer stands. Accumulated rows of the dataset (it was deleted as a whole) are withdrawn,
        counted like a deleted record's; rows of another dataset stay in the output."""
        from feedback.argilla_sync import standing
        from feedback.argilla_templates import OUTPUT_KIND
        from pipeline.artifacts import atomic_write_json
        from pipeline.records import load_rows

        out = self.ctx.output("cursor")
        atomic_write_json(out / "cursor.json", {"dataset": dataset, "statuses": statuses(cfg), "responses": cursor})
        write_answers(out, dataset, set(), set())
        metrics = {"new": 0, "records": 0, "already_pulled": 0, "ties": 0, "withdrawn": 0, "invalid": 0, "annotators": 0}
        earlier = [k for k in dict.fromkeys(OUTPUT_KIND.values()) if (previous / k).exists()] if cfg.accumulate else []
        if not earlier:
            self.ctx.log.info("%s does not exist (yet): nothing to pull", dataset)
            return {**metrics, "output": None}
        kind = earlier[0]  # a pull writes one kind
        kept, withdrawn = standing(load_rows(previous / kind), dataset, set(), set(), set())
        save_feedback(kept, kind, self.ctx.output(kind))
        self.ctx.log.info(
            "%s does not exist: nothing to pull; %d earlier record(s) of it withdrawn (the dataset was deleted)",
            dataset,
            withdrawn["gone"],
        )
        return {**metrics, "records": len(kept), "withdrawn": withdrawn["gone"], "output": kind}


ANSWERS_FILE = "answers.json"


def write_answers(cursor_dir: Path, dataset: str, live: set[str], reread: set[str]) -> None:
    """`cursor_dir/answers.json`: which answers of `dataset` stand after this pull (`live` row ids)
    and which it read again (`reread`), for withdrawing earlier rows (`read_answers`)."""
    from pipeline.artifacts import atomic_write_json

    atomic_write_json(cursor_dir / ANSWERS_FILE, {"dataset": dataset, "live": sorted(live), "reread": sorted(reread)})


def read_answers(cursor_dir: Path) -> dict | None:
    """What `write_answers` wrote (`dataset`, and `live` and `reread` as sets), or None (a pull
    made before argilla_pull v3, or another stage's cursor: no withdrawal can be told)."""
    path = cursor_dir / ANSWERS_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return {"dataset": state["dataset"], "live": set(state["live"]), "reread": set(state["reread"])}


def statuses(cfg: ArgillaPullConfig) -> list[str]:
    """The response statuses a pull takes."""
    return ["submitted", "draft"] if cfg.include_drafts else ["submitted"]


def read_cursor(path: Path | None, dataset: str) -> dict[str, str]:
    """The responses (id -> updated_at) a cursor file lists for `dataset` ("workspace/name");
    {} without the file, or for another dataset's cursor."""
    if path is None or not path.is_file():
        return {}
    state = json.loads(path.read_text(encoding="utf-8"))
    return dict(state.get("responses", {})) if state.get("dataset") == dataset else {}


def count_new(cfg: ArgillaPullConfig, cursor_file: str | None) -> dict[str, int]:
    """New records a pull with `cfg` would write after `cursor_file`, as `{kind: n}` (read only:
    nothing is written, the cursor does not move; {} while the dataset does not exist).
    It reads every responded record of the dataset, as the pull does."""
    from feedback.argilla_client import connect
    from feedback.argilla_sync import find_dataset, pull
    from feedback.argilla_templates import OUTPUT_KIND

    if not cfg.dataset:
        raise ValueError("count_new needs `dataset:`")
    client = connect(cfg.argilla)
    workspace = cfg.argilla.workspace
    if find_dataset(client, cfg.dataset, workspace) is None:
        return {}
    cursor = read_cursor(Path(cursor_file).expanduser() if cursor_file else None, f"{workspace}/{cfg.dataset}")
    result = pull(client, cfg.dataset, workspace, statuses(cfg), cursor, cfg.since, "report")
    return {OUTPUT_KIND[result.kind]: len(result.records)} if result.records else {}


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
