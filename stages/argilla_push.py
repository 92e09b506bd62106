"""argilla_push: send samples (or pairs, or pre-annotated feedback) to an Argilla dataset.

Creates the workspace and the dataset from a template when missing, and upserts records
with ids derived from the sample, so re-running never duplicates anything. The output
lists what was pushed (ids, dataset, URL) so `argilla_pull` can follow it in a pipeline.
"""

from __future__ import annotations

from pydantic import Field

from feedback.argilla_client import ArgillaConnection
from feedback.argilla_items import InputFormat
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


class ArgillaPushStage(Stage):
    uses = "argilla_push"
    summary = "Upsert samples into an Argilla dataset (templates: fine_grained, verbal, preference, reaction)."
    Config = ArgillaPushConfig
    inputs = {
        "records": Input(
            ("responses", "preferences", "span_feedback", "verbal_feedback", "reactions", "qa_feedback"),
            doc="generate responses, preference pairs, feedback records (as suggestions), qa-feedback json",
        ),
    }
    outputs = {"pushed": Output("argilla_records", doc="one row per pushed record: id, dataset, workspace, url")}
    non_semantic_fields = frozenset({"batch_size"})

    def run(self):
        from feedback.argilla_client import connect
        from feedback.argilla_items import to_items
        from feedback.argilla_stack import remember_users
        from feedback.argilla_sync import push_items
        from pipeline.records import load_rows, save_rows

        cfg: ArgillaPushConfig = self.config
        path = self.ctx.input("records")
        rows = load_rows(path, what="records to push")
        upstream = path.parent.name if path.parent.parent == self.ctx.run_dir else None
        defaults = {"model": self.ctx.model, "run": self.ctx.run_name, "stage": upstream}
        items = to_items(rows, cfg.template.kind, cfg.input_format, defaults, cfg.import_user, where=str(path))
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
        }
