"""export: the adapter as a standard PEFT folder + model card + heedful.json lineage.

The package's version id (what a server reports for each completion it writes) and the
feedback records that shaped the adapter are in heedful.json; the stage's metrics repeat
the id and the record count so `heedful status` and the run report show them.
"""

from __future__ import annotations

from pipeline.artifacts import read_json
from pipeline.export import export_adapter
from pipeline.stage import Input, Output, Stage, StageConfig


class ExportConfig(StageConfig):
    merge: bool = False
    name: str | None = None
    description: str = ""
    license: str = "apache-2.0"


class ExportStage(Stage):
    uses = "export"
    summary = "Ship an adapter: PEFT files, model card, lineage; optionally a merged model."
    Config = ExportConfig
    inputs = {"adapter": Input(("adapter",), doc="PEFT adapter folder from a training stage")}
    outputs = {"package": Output("export", doc="folder loadable with PeftModel.from_pretrained")}

    def run(self):
        cfg: ExportConfig = self.config
        adapter = self.ctx.input("adapter")
        dest = export_adapter(
            adapter,
            self.ctx.output("package"),
            merge=cfg.merge,
            name=cfg.name or f"{self.ctx.run_name}-{adapter.parent.name}",
            description=cfg.description,
            license=cfg.license,
        )
        files = sorted(p.name for p in dest.iterdir())
        lineage = read_json(dest / "heedful.json")
        records = len(lineage.get("feedback_records", []))
        self.ctx.log.info("exported %s as version %s (%d feedback records)", ", ".join(files), lineage["version_id"], records)
        return {"files": len(files), "merged": cfg.merge, "version": lineage["version_id"], "feedback_records": records}
