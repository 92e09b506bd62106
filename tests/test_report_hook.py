"""Report sections are a stage hook: `Stage.report_section` of every registered stage class."""

from __future__ import annotations

import json

from pipeline import registry
from pipeline.report import build_report
from pipeline.stage import Stage


class ProbeStage(Stage):
    uses = "report_probe"

    @classmethod
    def report_section(cls, run_root, manifests):
        mine = [name for name, m in manifests.items() if m.get("uses") == cls.uses]
        return f"<h2>probe sections for {', '.join(mine)}</h2>" if mine else None


def test_a_stage_class_adds_its_section_and_sees_every_manifest(tmp_path):
    run = tmp_path / "run"
    for name, uses in (("a", "report_probe"), ("b", "generate")):
        (run / name).mkdir(parents=True)
        (run / name / "manifest.json").write_text(json.dumps({"uses": uses, "fingerprint": "f" * 12, "metrics": {}}))
    registry.names()  # the built-in stages first, then the probe as a third-party stage
    registry.register(ProbeStage)
    try:
        page = build_report(run).read_text()
    finally:
        registry._REGISTRY.pop(ProbeStage.uses, None)
    assert "<h2>probe sections for a</h2>" in page
    assert Stage.report_section(run, {}) is None  # the default: no section
