"""Report sections are a stage hook: `Stage.report_section` of every registered stage class."""

from __future__ import annotations

import json
import os
import time

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


def test_plots_are_drawn_again_only_when_what_they_show_changed(tmp_path, monkeypatch):
    """A rebuilt report reuses each plot whose data is the same (byte for byte the same page) and
    draws the ones that changed; a plot no longer shown leaves the cache; outside a build nothing is kept."""
    from pipeline import report

    run = tmp_path / "run"
    for name in ("a", "b"):
        (run / name).mkdir(parents=True)
        (run / name / "manifest.json").write_text(json.dumps({"uses": "dpo", "fingerprint": "f" * 12, "metrics": {}}))
        rows = [{"step": s, "loss": 1.0 / s, "rewards/margins": 0.1 * s} for s in (1, 2, 3)]
        (run / name / "curves.json").write_text(json.dumps(rows))
    drawn: list[str] = []
    draw = report.curves_figure
    monkeypatch.setattr(report, "curves_figure", lambda groups, title: drawn.append(title) or draw(groups, title))

    first = build_report(run).read_text()
    assert sorted(drawn) == ["a (dpo)", "b (dpo)"] and first.count("<img") == 2
    cached = sorted(p.name for p in (run / report.FIGURE_CACHE).glob("*.html"))
    assert len(cached) == 2

    drawn.clear()
    assert build_report(run).read_text() == first and drawn == []  # nothing changed: nothing drawn
    (run / "b" / "curves.json").write_text(json.dumps([{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)]))
    second = build_report(run).read_text()
    assert drawn == ["b (dpo)"] and second != first and second.count("<img") == 2
    now = sorted(p.name for p in (run / report.FIGURE_CACHE).glob("*.html"))
    assert len(now) == 2 and len(set(now) & set(cached)) == 1  # b's old plot is gone

    # a crashed build's half-written plot goes once it is an hour old; a fresh one may be a build beside this one
    old, fresh = (run / report.FIGURE_CACHE / f".{n}.html.0123abcd.tmp" for n in ("old", "fresh"))
    for partial in (old, fresh):
        partial.write_text("<img")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert build_report(run).read_text() == second
    assert not old.exists() and fresh.exists()

    drawn.clear()
    assert report.plot_curves(json.loads((run / "a" / "curves.json").read_text()), "a (dpo)").startswith("<img")
    assert drawn == ["a (dpo)"]  # outside build_report: drawn, not cached


def test_a_plot_of_data_that_is_not_plain_json_is_drawn_every_time(tmp_path):
    """No key for an object's repr (it names a memory address: never the same twice) or a numpy
    array's shortened str (two arrays could share it): such a plot is drawn, never cached."""
    from pipeline import report

    drawn: list[object] = []

    def draw(data):
        drawn.append(data)

    tokens = (report._cache_dir.set(tmp_path), report._used.set(set()))
    try:
        for data in (object(), object(), {"a": [1, 2]}, {"a": [1, 2]}):
            assert report.cached_figure(draw, data) == ""
    finally:
        report._cache_dir.reset(tokens[0])
        report._used.reset(tokens[1])
    assert len(drawn) == 3  # both objects, the JSON data once
    assert len(list(tmp_path.glob("*.html"))) == 1
