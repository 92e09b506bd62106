"""Each stage's log holds what was printed while it ran, also through a handler made in an earlier
stage of the same process (an in-process run, a reused Ray worker)."""

from __future__ import annotations

import logging

from pipeline import registry
from pipeline.config import pipeline_from_dict
from pipeline.runner import Runner
from pipeline.stage import Stage

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


def test_a_handler_made_in_one_stage_writes_into_the_stage_running_later(tmp_path, capfd):
    registry.names()  # the built-in stages first
    registry.register(LibraryLoggingStage)
    try:
        stages = [{"name": name, "uses": LibraryLoggingStage.uses} for name in ("first", "second", "third")]
        result = Runner(
            pipeline_from_dict({"run_name": "logs", "model": "tiny", "stages": stages}, tmp_path),
            tmp_path / "runs",
            use_ray=False,
        ).execute()
    finally:
        registry._REGISTRY.pop(LibraryLoggingStage.uses, None)
        for handler in list(LIBRARY.handlers):
            LIBRARY.removeHandler(handler)
    assert result.ok, [r.error for r in result.records.values()]
    for name in ("first", "second", "third"):
        log = (result.run_dir / "logs" / f"{name}.log").read_text()
        others = {"first", "second", "third"} - {name}
        assert f"library warning from {name}" in log, log
        assert not any(f"library warning from {other}" in log for other in others), log
    printed = capfd.readouterr()
    assert "I/O operation on closed file" not in printed.err and "Logging error" not in printed.err
    assert printed.err.count("library warning from") == 3  # still on the terminal as well
