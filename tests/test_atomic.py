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
    # 40 steps: after checkpoint-4 the run must still be training when the kill lands (with 12, tiny's
    # fast steps once finished and committed the stage within the 0.5 s between seeing it and the kill)
    data = tiny_pipeline(align={"max_steps": 40, "save_steps": 2})
    data["run_name"] = "killed"
    config = write_yaml(tmp_path / "p.yaml", data)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        heedful_cmd() + ["run", str(config), "--no-ray", "--runs-dir", str(runs)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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
    # `heedful status` sees the driver is gone: the run and its stage read interrupted (not running), resumable
    status = subprocess.run(
        heedful_cmd() + ["status", "killed", "--runs-dir", str(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        timeout=120,
    )
    align = next(line for line in status.stdout.splitlines() if "│ align" in line)
    assert "interrupted" in align and "running" not in align and "rerun resumes" in align, status.stdout
    assert "run status: interrupted" in status.stdout and "pending" not in align, status.stdout

    result = Runner(pipeline_from_dict(data, tmp_path), runs, use_ray=False).execute()
    assert result.ok
    assert [r.status for r in result.records] == ["skipped", "skipped", "done", "done"]
    assert result.record("align").resumed
    log = (run_dir / "logs" / "align.log").read_text()
    assert "resuming from checkpoint-" in log
    assert result.record("align").metrics["steps"] == 40
    assert not (run_dir / ".staging" / "align").exists()
    assert not list(run_dir.glob("align/checkpoints"))


def test_generation_resumes_after_kill_with_identical_output(tmp_path, tiny_model_path):
    from pipeline.records import load_rows

    def sample_only(name):
        data = tiny_pipeline(sample={"max_prompts": 16, "batch_size": 2, "sampling": {"max_new_tokens": 24}})
        data["stages"] = data["stages"][:1]
        data["run_name"] = name
        return data

    clean = Runner(pipeline_from_dict(sample_only("clean"), tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert clean.ok

    config = write_yaml(tmp_path / "g.yaml", sample_only("killed"))
    proc = subprocess.Popen(
        heedful_cmd() + ["run", str(config), "--no-ray", "--runs-dir", str(tmp_path / "runs")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = tmp_path / "runs" / "killed" / ".staging" / "sample" / "partial"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (partial / "batch-00002.json").is_file():
            assert proc.poll() is None, "run ended before it could be interrupted"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "runs" / "killed" / "sample").exists()
    kept = sorted(p.name for p in partial.glob("batch-*.json"))
    assert 3 <= len(kept) < 8

    resumed = Runner(pipeline_from_dict(sample_only("killed"), tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert resumed.ok and resumed.record("sample").resumed
    a = load_rows(tmp_path / "runs" / "clean" / "sample" / "responses")
    b = load_rows(tmp_path / "runs" / "killed" / "sample" / "responses")
    assert [r["response"] for r in a] == [r["response"] for r in b]
