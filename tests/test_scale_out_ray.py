"""Scale-out on a real Ray head (`ray start --head` on 127.0.0.1, token auth), tiny model:
`heedful submit` of the quickstart as a Ray job, independent stages overlapping, and DPO on 2
Ray Train workers (gloo) matching 1 worker even when one worker is killed mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.records import write_jsonl
from pipeline.runner import Runner

from .conftest import ROOT, heedful_cmd
from .ray_head import ray_head
from .test_dpo import toy_preferences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tiny_model_path):
    with ray_head(num_cpus=2) as cluster:
        yield cluster


def heedful(head, *args, timeout=300):
    return subprocess.run(heedful_cmd() + list(args), cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=timeout)


QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def quickstart_names() -> dict[str, str]:
    """The quickstart's stage name for each kind of stage it uses, read from its config (names change)."""
    from pipeline.config import load_pipeline

    names = {s.spec.uses: s.name for s in load_pipeline(QUICKSTART).stages}
    missing = {"generate", "simulate", "dpo", "export"} - set(names)
    assert not missing, f"the quickstart no longer has a {sorted(missing)} stage: update this test"
    return names


def quickstart_small(names: dict[str, str]) -> list[str]:
    """--set overrides sizing the quickstart for the tiny model (as tests/test_e2e_quickstart.py does for SmolLM2)."""
    sample, users, align = (f"stages.{names[k]}.with" for k in ("generate", "simulate", "dpo"))
    return [
        "model=tiny",
        f"{sample}.max_prompts=4",
        f"{sample}.sampling.max_new_tokens=16",
        f"{users}.max_rounds=2",
        f"{users}.policy_sampling.max_new_tokens=16",
        f"{users}.user_sampling.max_new_tokens=8",
        f"{users}.simulator.model=tiny",
        f"{users}.feedback_on_last_round=false",
        f"{users}.cache=false",
        f"{align}.max_steps=2",
        f"{align}.max_length=64",
    ] + (
        [
            f"stages.{names['evaluate']}.with.users.max_rounds=1",
            f"stages.{names['evaluate']}.with.users.policy_sampling.max_new_tokens=16",
            f"stages.{names['evaluate']}.with.users.user_sampling.max_new_tokens=8",
            f"stages.{names['evaluate']}.with.sampling.max_new_tokens=16",
            f"stages.{names['evaluate']}.with.max_general=4",
        ]
        if "evaluate" in names
        else []
    )


def test_submit_quickstart_as_ray_job(head, tmp_path):
    from pipeline.config import load_pipeline

    names = quickstart_names()
    overrides = quickstart_small(names)
    runs = tmp_path / "runs"
    args = ["submit", "configs/quickstart.yaml", "--address", head.dashboard, "--runs-dir", str(runs)]
    for item in overrides:
        args += ["--set", item]
    proc = heedful(head, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    job_id = re.search(r"job id: (\S+)", out).group(1)
    assert job_id.startswith("heedful-quickstart-")
    align, ship = names["dpo"], names["export"]
    assert f"[{align}] stage {align} done" in out  # the job's logs were streamed back
    assert f"job {job_id}: SUCCEEDED" in out

    stages = [s.name for s in load_pipeline(QUICKSTART, overrides).stages]
    run_dir = runs / "quickstart"
    assert all((run_dir / name / "manifest.json").is_file() for name in stages)
    package = run_dir / ship / "package"
    assert (package / "adapter_model.safetensors").is_file()
    lineage = json.loads((package / "heedful.json").read_text())
    assert lineage["base_model"]["name"] == "tiny"
    # the adapter's lineage: every stage upstream of the export (the evaluation runs beside it)
    assert [s["name"] for s in lineage["stages"]] == [n for n in stages if n not in (ship, names.get("evaluate"))]
    trained = json.loads((run_dir / align / "manifest.json").read_text())
    assert trained["metrics"]["steps"] == 2 and trained["config"]["max_steps"] == 2
    job = json.loads((run_dir / "job.json").read_text())
    assert job["job_id"] == job_id and job["exit_code"] == 0

    from typer.testing import CliRunner

    from ray_jobs.cli import jobs_app

    jobs = lambda *a: CliRunner().invoke(jobs_app, [*a, "--address", head.dashboard])  # noqa: E731
    status = jobs("status", job_id)
    assert status.exit_code == 0 and "SUCCEEDED" in status.output and "quickstart" in status.output, status.output
    assert f"[{ship}] stage {ship} done" in jobs("logs", job_id).output
    assert job_id in jobs("list").output


def _generate_stage(name, num_cpus, prompts, max_new_tokens=16):
    return {
        "name": name,
        "uses": "generate",
        "inputs": {"prompts": str(prompts)},
        "resources": {"num_cpus": num_cpus},
        "with": {"num_samples": 2, "max_prompts": 4, "sampling": {"max_new_tokens": max_new_tokens, "temperature": 1.0}},
    }


def _task_windows(head, names, timeout=20.0):
    """(start, end) of each stage's Ray task from Ray's state API (task events arrive with a delay).
    Asks `head`'s dashboard over HTTP: with no address the state API looks for a local cluster and
    fails when it finds several (the rest of the suite, or anyone else on the machine, may run one
    too); with the GCS address it opens a GCS client in this process, and a later `ray.init` here
    then hung in GetClusterId (seen in CI). The drivers' own `ray.init` stays the only GCS client."""
    from ray.util.state import list_tasks

    deadline = time.time() + timeout
    while True:
        tasks = {
            t.name: t
            for t in list_tasks(address=head.dashboard, filters=[("state", "=", "FINISHED")], detail=True, limit=1000)
            # a FINISHED task's times can lag behind its state in Ray's task events: wait for both
            if t.name in {f"stage:{n}" for n in names} and t.start_time_ms and t.end_time_ms
        }
        if len(tasks) == len(names) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(tasks) == len(names), f"Ray's state API shows {sorted(tasks)} finished, expected {names}"
    return {n: (tasks[f"stage:{n}"].start_time_ms / 1000, tasks[f"stage:{n}"].end_time_ms / 1000) for n in names}


def test_independent_stages_run_concurrently_when_resources_allow(head, tmp_path):
    """Two independent 1-CPU stages on a 2-CPU cluster overlap; at 2 CPUs each they cannot."""
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": f"Name a fact about the number {i}."} for i in range(4)], prompts)
    spans, shortest = {}, {}
    for cpus in (1, 2):
        names = [f"a{cpus}", f"b{cpus}"]
        # the 2-CPU stages run on warm workers: longer replies keep each (about 2 s) well above Ray's timing noise
        stages = [_generate_stage(n, cpus, prompts, max_new_tokens=16 if cpus == 1 else 320) for n in names]
        data = {"run_name": f"overlap{cpus}", "model": "tiny", "stages": stages}
        result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", address=head.gcs_address).execute()
        assert result.ok, [r.error for r in result.records]
        (s1, e1), (s2, e2) = _task_windows(head, names).values()
        spans[cpus] = min(e1, e2) - max(s1, s2)  # > 0: the two ran at the same time
        shortest[cpus] = min(e1 - s1, e2 - s2)
    assert spans[1] > 0.5, spans
    # Ray's task events are stamped as the worker reports them: one worker running the two 2-CPU stages
    # back to back was seen to "overlap" by 0.11 s and 0.28 s (CI, 2026-12-04 and -07, stages of 0.5 s).
    # Stages run together would overlap by about the shorter one's whole length.
    assert spans[2] <= 0.4 * shortest[2], (spans, shortest)


def _dpo(prefs, workers, steps, save_steps=50, run_name=None):
    return {
        "run_name": run_name or f"dpo-w{workers}",
        "model": "tiny",
        "stages": [
            {
                "name": "align",
                "uses": "dpo",
                "inputs": {"preferences": str(prefs)},
                "with": {
                    "max_steps": steps,
                    "learning_rate": 5e-3,
                    "per_device_train_batch_size": 4 // workers,
                    "beta": 0.1,
                    "max_length": 64,
                    "save_steps": save_steps,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "num_workers": workers,
                },
            }
        ],
    }


def _losses(run_dir):
    return [row["loss"] for row in json.loads((run_dir / "align" / "curves.json").read_text()) if "loss" in row]


@pytest.fixture(scope="module")
def one_worker_losses(tmp_path_factory):
    """The reference: 1 worker, batch 4, in-process; 8 steps."""
    tmp = tmp_path_factory.mktemp("w1")
    prefs = toy_preferences(tmp / "prefs.jsonl")
    result = Runner(pipeline_from_dict(_dpo(prefs, 1, 8), tmp), tmp / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    return _losses(result.run_dir)


def test_dpo_on_two_workers_matches_one_worker_and_survives_a_killed_worker(head, tmp_path, one_worker_losses):
    """DPO on 2 Ray Train workers x batch 2 (gloo DDP) vs 1 worker x batch 4, with one worker
    SIGKILLed after the first reported checkpoint: Ray Train restarts the group, training
    resumes from that checkpoint and finishes, and every step's loss equals the 1-worker run's
    (steps before the kill from the first group, the rest from the restarted one, whose
    optimizer, scheduler, RNG and data position were restored)."""
    from pipeline import cluster

    prefs = toy_preferences(tmp_path / "prefs.jsonl")
    runner = Runner(
        pipeline_from_dict(_dpo(prefs, 2, 8, save_steps=2, run_name="dpo-kill"), tmp_path),
        tmp_path / "runs",
        address=head.gcs_address,
    )
    cluster.connect(head.gcs_address)  # the driver connects here; the run goes on in a thread
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", runner.execute()), daemon=True)
    thread.start()
    storage = runner.run.root / ".staging" / "align" / "checkpoints" / "ray_train" / "dpo-kill-align"
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and thread.is_alive() and killed is None:
        if (storage / "checkpoint-2").is_dir():
            workers = head.train_workers()
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=240)
    result = outcome.get("result")
    assert killed is not None, "never saw a reported checkpoint with live training workers"
    assert result is not None and result.ok, result and [r.error for r in result.records]
    metrics = result.record("align").metrics
    assert metrics["num_workers"] == 2 and metrics["steps"] == 8 and metrics["resumed_from_step"] >= 2, metrics
    log = (result.run_dir / "logs" / "align.log").read_text()
    assert f"resuming from step {metrics['resumed_from_step']}" in log  # rank 0's lines reach the stage log
    losses = _losses(result.run_dir)
    assert len(losses) == len(one_worker_losses) == 8
    assert losses[-1] < losses[0] - 0.1  # it learned
    assert max(abs(a - b) for a, b in zip(losses, one_worker_losses)) < 1e-3, (losses, one_worker_losses)
    assert (result.run_dir / "align" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (result.run_dir / "align" / "checkpoints").exists()
