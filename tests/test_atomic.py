"""A run killed mid-training leaves no half-written output; the rerun resumes and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from pipeline.config import pipeline_from_dict
from pipeline.runner import Runner

from .conftest import ROOT, heedful_cmd, tiny_pipeline, write_yaml


def test_kill_mid_dpo_then_resume(tmp_path, tiny_model_path):
    data = tiny_pipeline(align={"max_steps": 12, "save_steps": 2})
    data["run_name"] = "killed"
    config = write_yaml(tmp_path / "p.yaml", data)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(heedful_cmd() + ["run", str(config), "--no-ray", "--runs-dir", str(runs)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staging = runs / "killed" / ".staging" / "align" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (staging / "checkpoint-4").is_dir():
            assert proc.poll() is None, "run ended before it could be interrupted"
            time.sleep(0.2)
        assert (staging / "checkpoint-4").is_dir(), "training never reached checkpoint-4"
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = runs / "killed"
    assert not (run_dir / "align").exists(), "a killed stage must not leave a committed output"
    assert not (run_dir / "ship").exists()
    assert (run_dir / "pairs" / "manifest.json").is_file()

    result = Runner(pipeline_from_dict(data, tmp_path), runs, use_ray=False).execute()
    assert result.ok
    assert [r.status for r in result.records] == ["skipped", "skipped", "done", "done"]
    assert result.record("align").resumed
    log = (run_dir / "logs" / "align.log").read_text()
    assert "resuming from checkpoint-" in log
    assert result.record("align").metrics["steps"] == 12
    assert not (run_dir / ".staging" / "align").exists()
    assert not list(run_dir.glob("align/checkpoints"))
