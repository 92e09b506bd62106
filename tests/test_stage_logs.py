"""Each stage's log holds what was printed while it ran, also through a handler made in an earlier
stage of the same process (an in-process run, a reused Ray worker)."""

from __future__ import annotations

import logging

from pipeline import registry
from pipeline.config import pipeline_from_dict
from pipeline.runner import Runner
from pipeline.stage import Input, Output, Stage

LIBRARY = logging.getLogger("heedful.tests.a_library")


class LibraryLoggingStage(Stage):
    """Logs as transformers does: a StreamHandler on sys.stderr, made on the library's first message."""

    uses = "library_logging_probe"

    def run(self):
        if not LIBRARY.handlers:
            LIBRARY.addHandler(logging.StreamHandler())  # sys.stderr as it is now: inside this stage
            LIBRARY.setLevel(logging.WARNING)
            LIBRARY.propagate = False
        LIBRARY.warning("library warning from %s", self.ctx.name)
        return {}


def _run_stages(tmp_path, stage: type[Stage], stages: list[dict], force: set[str] | None = None):
    """`stages` of the test stage class `stage`, in process, the class registered only meanwhile."""
    registry.names()  # the built-in stages first
    registry.register(stage)
    try:
        pipeline = pipeline_from_dict({"run_name": "logs", "model": "tiny", "stages": stages}, tmp_path)
        return Runner(pipeline, tmp_path / "runs", use_ray=False, force=force).execute()
    finally:
        registry._REGISTRY.pop(stage.uses, None)


def test_a_handler_made_in_one_stage_writes_into_the_stage_running_later(tmp_path, capfd):
    try:
        stages = [{"name": name, "uses": LibraryLoggingStage.uses} for name in ("first", "second", "third")]
        result = _run_stages(tmp_path, LibraryLoggingStage, stages)
    finally:
        for handler in list(LIBRARY.handlers):
            LIBRARY.removeHandler(handler)
    assert result.ok, [r.error for r in result.records]
    for name in ("first", "second", "third"):
        log = (result.run_dir / "logs" / f"{name}.log").read_text()
        others = {"first", "second", "third"} - {name}
        assert f"library warning from {name}" in log, log
        assert not any(f"library warning from {other}" in log for other in others), log
    printed = capfd.readouterr()
    assert "I/O operation on closed file" not in printed.err and "Logging error" not in printed.err
    assert printed.err.count("library warning from") == 3  # still on the terminal as well


class QuietStage(Stage):
    uses = "quiet_probe"
    inputs = {"notes": Input(kinds=("notes",), required=False)}
    outputs = {"notes": Output(kind="notes")}

    def run(self):
        print(f"working in {self.ctx.name}")
        self.ctx.output("notes").write_text("done")
        return {"answer": 42}


def _run_quiet(tmp_path, force=None):
    stages = [
        {"name": "first", "uses": QuietStage.uses},
        {"name": "second", "uses": QuietStage.uses, "inputs": {"notes": "first.notes"}},
    ]
    return _run_stages(tmp_path, QuietStage, stages, force)


def test_a_stage_whose_commit_fails_is_failed_and_its_log_keeps_the_traceback(tmp_path, monkeypatch):
    """The stage ran to the end, then moving its folder in failed (a full disk): the stage failed, its
    dependent was blocked, the streams are back, and the log shows what it printed, then why it failed."""
    import sys

    from pipeline.artifacts import RunDir

    real_commit = RunDir.commit

    def commit(self, stage):
        if stage == "first":
            raise OSError(28, "No space left on device")
        return real_commit(self, stage)

    monkeypatch.setattr(RunDir, "commit", commit)
    out, err = sys.stdout, sys.stderr
    result = _run_quiet(tmp_path)
    assert (sys.stdout, sys.stderr) == (out, err)
    assert not result.ok
    first, second = result.record("first"), result.record("second")
    assert first.status == "failed" and "No space left on device" in first.error
    assert second.status == "blocked"
    log = (result.run_dir / "logs" / "first.log").read_text()
    assert "working in first" in log and "OSError" in log
    assert log.index("working in first") < log.index("Traceback")


def test_a_failed_swap_puts_the_earlier_outputs_back(tmp_path, monkeypatch):
    """A rerun whose staging folder cannot be renamed into place (after the earlier outputs were
    moved aside): the earlier outputs are where they were, and the next run finds them current."""
    import os

    assert _run_quiet(tmp_path).ok
    first = tmp_path / "runs" / "logs" / "first"
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(os.path.join(".staging", "first")):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rerun = _run_quiet(tmp_path, force={"first"})
    assert rerun.record("first").status == "failed" and rerun.record("second").status == "blocked"
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(os, "replace", real_replace)
    again = _run_quiet(tmp_path)
    assert again.ok and again.record("first").status == "skipped"
