"""argilla_push: send samples (or pairs, or pre-annotated feedback) to an Argilla dataset.

Creates the workspace and the dataset from a template when missing, and upserts records
with ids derived from the sample, so re-running never duplicates anything. The output
lists what was pushed (ids, dataset, URL) so `argilla_pull` can follow it in a pipeline.

With `select:` the stage is the loop's request for human review: it pushes only the items
the reward models are unsure or disagree about (feedback/argilla_review.py decides, from
the score stage's columns), each with `review_reason` / `review_score` / `review_detail`
metadata the annotator sees. An item already in the dataset (by record id) is left alone,
so a rerun or the next round never asks twice, and annotations never see their item change.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_serializer

from feedback.argilla_client import ArgillaConnection
from feedback.argilla_items import InputFormat
from feedback.argilla_review import ReviewSelection
from feedback.argilla_templates import TemplateOptions
from pipeline.stage import Input, Output, Stage, StageConfig


class ArgillaPushConfig(StageConfig):
    dataset: str = Field(description="Argilla dataset name (created when missing)")
    template: TemplateOptions = Field(default_factory=TemplateOptions)
    argilla: ArgillaConnection = Field(default_factory=ArgillaConnection)
    input_format: InputFormat = Field(default="auto", description="how to read the input rows (auto: by columns)")
    import_user: str = Field(default="qa-feedback", description="annotator credited with imported qa_feedback responses")
    max_items: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=250, ge=1, le=500, description="records per bulk upsert")
    select: ReviewSelection | None = Field(default=None, description="push only what needs review (docs/argilla.md)")

    @model_serializer(mode="wrap")
    def _without_unset_select(self, handler):
        """A config without `select` dumps (and so fingerprints) exactly as before it existed."""
        data = handler(self)
        if self.select is None and isinstance(data, dict):
            data.pop("select", None)
        return data


class ArgillaPushStage(Stage):
    uses = "argilla_push"
    summary = "Upsert samples into an Argilla dataset (templates: fine_grained, verbal, preference, reaction)."
    Config = ArgillaPushConfig
    inputs = {
        "records": Input(
            ("responses", "preferences", "span_feedback", "verbal_feedback", "reactions", "qa_feedback"),
            doc="generate responses, preference pairs, feedback records (as suggestions), qa-feedback json",
        ),
        "scores": Input(
            ("responses", "preferences"),
            required=False,
            doc="with `select`: the score stage's rows, matched to records by prompt and reply (default: records' columns)",
        ),
    }
    outputs = {"pushed": Output("argilla_records", doc="one row per pushed record: id, dataset, workspace, url")}
    non_semantic_fields = frozenset({"batch_size"})
    config: ArgillaPushConfig

    def run(self):
        from feedback.argilla_client import connect
        from feedback.argilla_items import drop_repeats, to_items
        from feedback.argilla_stack import remember_users
        from feedback.argilla_sync import push_items
        from pipeline.errors import UserError
        from pipeline.records import load_rows, save_rows

        cfg: ArgillaPushConfig = self.config
        path = self.ctx.input("records")
        rows = load_rows(path, what="records to push")
        upstream = path.parent.name if path.parent.parent == self.ctx.run_dir else None
        defaults = {"model": self.ctx.model, "run": self.ctx.run_name, "stage": upstream}
        if cfg.select is not None:
            return self._push_for_review(rows, defaults)
        if self.ctx.input("scores") is not None:
            raise UserError(f"{self.ctx.name}: the `scores` input is only read with `select:` (docs/argilla.md)")
        items = to_items(rows, cfg.template.kind, cfg.input_format, defaults, cfg.import_user, where=str(path))
        items, repeats = drop_repeats(items, lambda item: item)
        self._log_repeats(repeats)
        if cfg.max_items:
            items = items[: cfg.max_items]
        client = connect(cfg.argilla)
        ws = cfg.argilla.workspace
        self.ctx.log.info("pushing %d %s items to %s/%s on %s", len(items), cfg.template.kind, ws, cfg.dataset, client.api_url)
        result = push_items(client, cfg.dataset, ws, cfg.template, items, cfg.batch_size, desc=self.ctx.name)
        remember_users(client.api_url, result.new_users)
        save_rows(
            [
                {"id": i, "dataset": cfg.dataset, "workspace": ws, "template": cfg.template.kind, "url": result.url}
                for i in result.ids
            ],
            self.ctx.output("pushed"),
        )
        self.ctx.log.info("dataset: %s", result.url)
        return {
            "records": len(items),
            "created": result.created,
            "updated": result.updated,
            "records_per_s": round(result.records_per_s, 1),
            "repeats_dropped": repeats,
        }

    def _log_repeats(self, repeats: int) -> None:
        if repeats:
            self.ctx.log.warning(
                "%s: dropped %d item(s) repeating another's text (identical replies are one record)", self.ctx.name, repeats
            )

    def _push_for_review(self, rows: list[dict[str, Any]], defaults: dict[str, Any]) -> dict[str, Any]:
        """Select, then push only the selected items not yet in the dataset."""
        from feedback import argilla_review as review
        from feedback.argilla_client import connect
        from feedback.argilla_items import drop_repeats, sourced_items
        from feedback.argilla_stack import remember_users
        from feedback.argilla_sync import ensure_dataset, push_items
        from pipeline.records import load_rows, save_rows

        cfg = self.config
        assert cfg.select is not None
        where, scores_path = str(self.ctx.input("records")), self.ctx.input("scores")
        scores = load_rows(scores_path, what="scores") if scores_path is not None else None
        sourced, repeats = drop_repeats(sourced_items(rows, cfg.template.kind, cfg.input_format, defaults, where), lambda s: s[0])
        self._log_repeats(repeats)
        candidates = review.candidates(
            [(item.id, idx) for item, idx in sourced], rows, cfg.select, where, scores, str(scores_path)
        )
        choices = review.select(candidates, cfg.select)
        if cfg.max_items:
            choices = choices[: cfg.max_items]
        by_id = {item.id: item for item, _ in sourced}
        items = [by_id[c.id].model_copy(update={"extra": {**by_id[c.id].extra, **c.metadata()}}) for c in choices]
        client = connect(cfg.argilla)
        ws = cfg.argilla.workspace
        ds = ensure_dataset(client, cfg.dataset, ws, cfg.template)
        declare_review_metadata(client, str(ds.id))
        present = record_ids(client, str(ds.id))
        new = [item for item in items if item.id not in present]
        self.ctx.log.info(
            "%s: %d of %d item(s) selected (%s); %d already in %s/%s, pushing %d",
            self.ctx.name,
            len(choices),
            len(candidates),
            cfg.select.by,
            len(items) - len(new),
            ws,
            cfg.dataset,
            len(new),
        )
        result = push_items(client, cfg.dataset, ws, cfg.template, new, cfg.batch_size, desc=self.ctx.name)
        remember_users(client.api_url, result.new_users)
        base = {"dataset": cfg.dataset, "workspace": ws, "template": cfg.template.kind, "url": result.url}
        save_rows(
            [{"id": c.id, **base, **c.metadata(), "already_pushed": c.id in present} for c in choices],
            self.ctx.output("pushed"),
            empty_like={"id": "", **base, **review.Choice("", cfg.select.by, 0.0, "").metadata(), "already_pushed": False},
        )
        self.ctx.log.info("dataset: %s", result.url)
        return {
            "records": len(new),
            "created": result.created,
            "updated": result.updated,
            "records_per_s": round(result.records_per_s, 1),
            "candidates": len(candidates),
            "selected": len(choices),
            "already_pushed": len(items) - len(new),
            "repeats_dropped": repeats,
        }


def declare_review_metadata(client, dataset_id: str) -> None:
    """Add the review metadata properties (visible to annotators) the dataset lacks; the
    template's own metadata stays hidden, this is what the annotator should read."""
    from feedback.argilla_client import api
    from feedback.argilla_review import REVIEW_METADATA

    have = api(client, "GET", f"/api/v1/me/datasets/{dataset_id}/metadata-properties", "list metadata properties")
    names = {m["name"] for m in have["items"]}
    for name, (kind, title) in REVIEW_METADATA.items():
        if name not in names:
            body = {"name": name, "title": title, "settings": {"type": kind}, "visible_for_annotators": True}
            api(client, "POST", f"/api/v1/datasets/{dataset_id}/metadata-properties", f"add metadata property {name}", json=body)


def record_ids(client, dataset_id: str, page: int = 1000) -> set[str]:
    """The external ids of every record in the dataset (the server's list, not the search index)."""
    from feedback.argilla_client import api

    ids: set[str] = set()
    offset = 0
    while True:
        res = api(
            client, "GET", f"/api/v1/datasets/{dataset_id}/records", "list records", params={"offset": offset, "limit": page}
        )
        ids.update(str(r.get("external_id") or r["id"]) for r in res["items"])
        offset += len(res["items"])
        if not res["items"] or offset >= res.get("total", 0):
            return ids
