"""kill -9 of `heedful loop` in every phase of a round, on a real Ray head and a real server:
each rerun resumes the round where it stopped; at the end no feedback record was lost or pulled
twice, exactly one round exists, and the server was always on the old or the new version.

The loop runs as a subprocess (`heedful loop FILE --address <head>`); the fault hook
HEEDFUL_FAULT_PAUSE=<point> makes it print `PAUSED <point>` and wait, and the test then kills
its whole process group with SIGKILL: no cleanup code runs, as in a real crash.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import warnings

import pytest

from pipeline.loop import load_state
from serving.store import MemoryStore
from serving.versions import adapter_version_id

from .conftest import ROOT, heedful_cmd
from .ray_head import ray_head
from .test_loop import QUESTIONS, active, converse, loop_file, pulled_ids, server

pytestmark = pytest.mark.slow
POINTS = ["after-pull", "train", "evaluate", "deploy", "after-deploy"]


@pytest.fixture(scope="module")
def head(tiny_model_path):
    with ray_head(num_cpus=2) as cluster:
        yield cluster


def loop_once(head, path, runs, pause: str | None, timeout: float = 240, retry: bool = True) -> str:
    """Run `heedful loop`; with `pause`, kill -9 it once it reports the pause. Its output.

    Lines are read on a thread so the deadline holds even when the loop prints nothing; past it,
    the loop is asked for its threads' stacks (SIGUSR1, see pipeline/cli.py) and killed. Once in
    CI (beside the main suite, on a slower machine) one invocation printed nothing for 20 minutes
    and locally it never did: a hung invocation is reported as a warning with its stacks and run
    again once (a kill -9 and a rerun is what this test is about); a second hang fails.
    """
    env = {**head.env, "HEEDFUL_FAULT_PAUSE": pause or ""}
    cmd = heedful_cmd() + ["loop", str(path), "--runs-dir", str(runs), "--address", head.gcs_address]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout or []), lines.put(None)], daemon=True).start()
    seen: list[str] = []
    deadline = time.time() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
            deadline = time.time() + timeout
        except queue.Empty:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(3)
            while not lines.empty():
                seen.append(lines.get() or "")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report = f"heedful loop (pause {pause}) printed nothing for {timeout}s:\n" + "".join(seen[-150:])
            if not retry:
                pytest.fail(report)
            warnings.warn(report + "\n(killed; running it again once)", stacklevel=1)
            return loop_once(head, path, runs, pause, timeout, retry=False)
        if line is None:
            break
        seen.append(line)
        if pause and line.strip() == f"PAUSED {pause}":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "".join(seen)
    proc.wait()
    assert pause is None, f"never paused at {pause}:\n" + "".join(seen[-40:])
    assert proc.returncode == 0, "".join(seen[-60:])
    return "".join(seen)


def test_kill_9_in_every_phase_resumes_without_losing_or_repeating_records(head, tmp_path):
    runs = tmp_path / "runs"
    with server(tmp_path / "server") as live:
        converse(live, "alice", QUESTIONS)
        path = loop_file(tmp_path, live, "loop_k", [{"metric": "kl_to_base", "max": 1000.0}])
        before = active(live)
        for point in POINTS:
            loop_once(head, path, runs, pause=point)
            state = load_state(runs / "loop_k")
            assert len(state["rounds"]) == 1, f"killed at {point}: a second round was started"
            export = runs / "loop_k" / "round-001" / "export" / "package"
            allowed = {before} | ({adapter_version_id(export)} if (export / "adapter_config.json").is_file() else set())
            assert active(live) in allowed, f"killed at {point}: the server serves {active(live)}"
            if point == "after-deploy":
                assert active(live) == adapter_version_id(export)  # the server switched before the kill
        out = loop_once(head, path, runs, pause=None)
        assert "resuming round-001" in out
        entry = load_state(runs / "loop_k")["rounds"][0]
        assert entry["phase"] == "done" and entry["deployed"] is True
        assert active(live) == entry["version_after"] != before
        stored = {r["id"] for r in MemoryStore(live.memory).feedback() if r["kind"] in ("reaction", "preference")}
        ids = pulled_ids(runs / "loop_k")
        assert sorted(ids) == sorted(stored)  # each record pulled exactly once over six invocations
        cursor = json.loads((runs / "loop_k" / "round-001" / "pull" / "cursor" / "cursor.json").read_text())
        assert set(cursor["ids"]) >= stored
        # a second rerun finds nothing new and starts no round
        loop_once(head, path, runs, pause=None)
        assert len(load_state(runs / "loop_k")["rounds"]) == 1
