"""Fingerprints, skipping, targeted reruns and failure isolation, on the tiny model in-process."""

from __future__ import annotations

import time

from pipeline.config import pipeline_from_dict
from pipeline.runner import Runner

from .conftest import tiny_pipeline


def run(tmp_path, data, **kwargs):
    pipeline = pipeline_from_dict(data, tmp_path)
    return Runner(pipeline, tmp_path / "runs", use_ray=False, **kwargs).execute()


def statuses(result) -> dict[str, str]:
    return {r.name: r.status for r in result.records}


def test_second_run_skips_everything_quickly(tmp_path, tiny_model_path):
    first = run(tmp_path, tiny_pipeline())
    assert first.ok and set(statuses(first).values()) == {"done"}
    manifest = (first.run_dir / "align" / "manifest.json").read_text()
    started = time.time()
    second = run(tmp_path, tiny_pipeline())
    assert set(statuses(second).values()) == {"skipped"}
    assert time.time() - started < 5
    assert (second.run_dir / "align" / "manifest.json").read_text() == manifest


def test_config_change_reruns_stage_and_dependents_only(tmp_path, tiny_model_path):
    run(tmp_path, tiny_pipeline())
    changed = run(tmp_path, tiny_pipeline(pairs={"min_margin": 0.0, "repetition_weight": 0.25}))
    assert statuses(changed) == {"sample": "skipped", "pairs": "done", "align": "done", "ship": "done"}
    leaf = run(tmp_path, tiny_pipeline(pairs={"repetition_weight": 0.25}, ship={"description": "v2"}))
    assert statuses(leaf) == {"sample": "skipped", "pairs": "skipped", "align": "skipped", "ship": "done"}


def test_non_semantic_change_does_not_rerun(tmp_path, tiny_model_path):
    run(tmp_path, tiny_pipeline())
    again = run(tmp_path, tiny_pipeline(align={"logging_steps": 5}, sample={"device": "cpu"}))
    assert set(statuses(again).values()) == {"skipped"}


def test_failed_stage_blocks_dependents_and_keeps_finished(tmp_path, tiny_model_path):
    first = run(tmp_path, tiny_pipeline())
    sample_manifest = (first.run_dir / "sample" / "manifest.json").read_text()
    old_adapter = (first.run_dir / "align" / "adapter" / "adapter_model.safetensors").read_bytes()
    failed = run(tmp_path, tiny_pipeline(pairs={"min_margin": 99.0}))
    assert statuses(failed) == {"sample": "skipped", "pairs": "failed", "align": "blocked", "ship": "blocked"}
    assert "min_margin" in failed.record("pairs").error
    assert "pairs" in failed.record("align").error
    assert not failed.ok
    # finished work from before is untouched
    assert (failed.run_dir / "sample" / "manifest.json").read_text() == sample_manifest
    assert (failed.run_dir / "align" / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter
    assert (failed.run_dir / "logs" / "pairs.log").is_file()


def test_force_reruns_stage_and_downstream(tmp_path, tiny_model_path):
    run(tmp_path, tiny_pipeline())
    forced = run(tmp_path, tiny_pipeline(), force={"align"})
    assert statuses(forced) == {"sample": "skipped", "pairs": "skipped", "align": "done", "ship": "done"}


def test_manifest_records_fingerprint_inputs_outputs_and_versions(tmp_path, tiny_model_path):
    import json

    result = run(tmp_path, tiny_pipeline())
    manifest = json.loads((result.run_dir / "pairs" / "manifest.json").read_text())
    assert manifest["fingerprint"] == result.record("pairs").fingerprint
    assert manifest["inputs"]["responses"]["stage"] == "sample"
    assert manifest["outputs"]["preferences"]["rows"] == manifest["metrics"]["pairs"]
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["packages"])
    assert manifest["timings"]["seconds"] >= 0


def test_status_command_shows_failed_and_blocked(tmp_path, tiny_model_path):
    import subprocess

    from .conftest import ROOT, heedful_cmd

    run(tmp_path, tiny_pipeline(pairs={"min_margin": 99.0}))
    proc = subprocess.run(
        heedful_cmd() + ["status", "t", "--runs-dir", str(tmp_path / "runs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") > 3}
    assert "done" in lines["sample"] and "failed" in lines["pairs"] and "blocked" in lines["align"]
    assert "min_margin" in lines["pairs"]


RAY_TOKEN_WATCH = """
import json, os, stat, threading
from pathlib import Path

path, seen, stop = Path.home() / ".ray" / "auth_token", [], threading.Event()

def watch():
    while not stop.is_set():
        try:
            seen.append(stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass

watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
from pipeline import cluster

cluster.connect(num_cpus=1)
import ray

answer = ray.get(ray.remote(lambda: 42).remote())
cluster.shutdown()
stop.set()
watcher.join()
print(json.dumps({"modes": sorted(set(seen)), "polls": len(seen), "answer": answer,
                  "dir": stat.S_IMODE(os.stat(path.parent).st_mode)}))
"""


def test_ray_token_file_is_0600_from_creation(tmp_path):
    """A fresh local cluster's auth token is never readable by others, not even during ray.init."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # a user without a token yet
    proc = subprocess.run([sys.executable, "-c", RAY_TOKEN_WATCH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["answer"] == 42 and seen["polls"] > 0  # the cluster ran, with the token file in place
    assert seen["modes"] == [0o600], f"token file modes seen: {[oct(m) for m in seen['modes']]}"
    assert seen["dir"] & 0o077 == 0


def test_runner_checks_file_inputs_before_anything_is_written(tmp_path):
    """The API path too: a bad data file stops the run before Ray, a model or the run folder."""
    import pytest

    from pipeline.errors import DataError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": 3}\n')
    pipeline = pipeline_from_dict(tiny_pipeline(prompts), tmp_path)
    with pytest.raises(DataError) as err:
        Runner(pipeline, tmp_path / "runs", use_ray=True, address="127.0.0.1:9").execute()
    assert f"{prompts}:2: field 'prompt': expected a string or a list of messages, got 3" in str(err.value)
    assert [p.file for p in err.value.problems] == ["stages.sample.inputs.prompts"]
    assert not (tmp_path / "runs").exists()
