"""memory_export: read a serving memory file into the feedback datasets a training round uses.

The memory file is an input, so its content hash is part of the fingerprint: new feedback
from serving reruns this stage and everything downstream (the server folds its write-ahead
log into the .db file after each feedback, so the file itself changes).

Served feedback is untrusted: every record passes the quarantine (`feedback.quarantine`)
before it becomes training data; what it holds back is written to the `quarantine` output
with the reason, and counted in the metrics (`quarantined`, `quarantined_<reason>`).
"""

from __future__ import annotations

from pydantic import Field

from feedback.quarantine import QuarantineSettings
from pipeline.stage import Input, Output, Stage, StageConfig


class MemoryExportConfig(StageConfig):
    quarantine: QuarantineSettings = Field(
        default_factory=QuarantineSettings, description="caps and checks applied before feedback becomes training data"
    )


class MemoryExportStage(Stage):
    uses = "memory_export"
    version = "2"  # 2: edits and follow-ups pass the quarantine's text checks too (an export made before may hold what they now hold back)
    summary = "Serving feedback (MemPrompt memory file) -> reactions, verbal feedback, preference pairs."
    Config = MemoryExportConfig
    inputs = {"memory": Input(("memory",), doc="the SQLite memory file of `heedful serve --memory`")}
    outputs = {
        "reactions": Output("reactions", doc="Reaction records (P[Love])", required=False),
        "verbal_feedback": Output("verbal_feedback", doc="critiques and clarifications (C3PO, CUT, CoH)", required=False),
        "preferences": Output(
            "preferences", doc="user edits, loved vs. disliked / memory-distillation pairs (DPO)", required=False
        ),
        "followups": Output("followups", doc="the user's next turn after a reply (FLR)", required=False),
        "quarantine": Output(
            "quarantine", doc="feedback held back from training (quarantine.jsonl, with reasons)", required=False
        ),
    }

    def run(self):
        import shutil

        from serving.export import export_memory

        tmp = self.ctx.work_dir / "export"
        counts = export_memory(self.ctx.input("memory"), tmp, self.config.quarantine)
        for name in self.outputs:  # a kind with no records is not written (its output is optional)
            if (tmp / name).exists():
                shutil.move(str(tmp / name), str(self.ctx.output(name)))
        shutil.rmtree(tmp, ignore_errors=True)
        return {k: float(v) for k, v in counts.items()}
