"""export: the adapter as a standard PEFT folder + model card + heedful.json lineage."""

from __future__ import annotations

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
        self.ctx.log.info("exported %s", ", ".join(files))
        return {"files": len(files), "merged": cfg.merge}
