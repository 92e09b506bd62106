"""Turn a pipeline file into a Ray job (entrypoint + runtime_env) and follow it.

The pipeline is validated here, before anything is sent, so config errors still name the
file and line. The job runs `python -m ray_jobs.entrypoint` on the cluster; its outputs go
to `runs_dir`, an absolute path that must be on storage the cluster's nodes share.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import HeedfulError

TEMPLATE = Path(__file__).with_name("runtime_env.yaml")
#: variables forwarded from the submitting shell: paths and offline switches, never secrets
FORWARDED_ENV = (
    "HEEDFUL_HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """Everything `JobSubmissionClient.submit_job` needs, built and checked locally."""

    job_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    run_name: str
    runs_dir: Path
    entrypoint_resources: dict[str, float] = field(default_factory=dict)


def dashboard_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local default; http:// added."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    return address if "://" in address else f"http://{address}"


def load_template(path: Path | None = None) -> dict[str, Any]:
    path = path or TEMPLATE
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise HeedfulError(f"runtime_env template {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise HeedfulError(f"runtime_env template {path}: expected a mapping (working_dir, pip, env_vars, ...)")
    return data


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HeedfulError(f"--env {item}: expected KEY=VALUE")
        env[key] = value
    return env


def build_job(
    pipeline_file: Path,
    overrides: list[str],
    *,
    runs_dir: Path,
    working_dir: Path | None,
    template: Path | None = None,
    pip: list[str] | None = None,
    env: list[str] | None = None,
    force: list[str] | None = None,
    job_id: str | None = None,
    python: str = "python",
) -> JobSpec:
    """Validate the pipeline and build the job; `working_dir=None` uploads nothing (shared filesystem)."""
    from pipeline.config import load_pipeline

    pipeline = load_pipeline(pipeline_file, list(overrides))  # ConfigError (file:line) before any network call
    for name in force or []:
        if name not in {s.name for s in pipeline.stages}:
            raise HeedfulError(f"--force {name}: no such stage")
    runtime_env = load_template(template)
    if working_dir is not None:
        root = working_dir.resolve()
        try:
            pipeline_arg = pipeline_file.resolve().relative_to(root).as_posix()
        except ValueError:
            raise HeedfulError(
                f"{pipeline_file} is outside the working dir {root}: Ray uploads only the working dir "
                "(pass --working-dir, or --no-working-dir when the cluster shares this filesystem)"
            ) from None
        runtime_env["working_dir"] = str(root)
    else:
        runtime_env.pop("working_dir", None)
        runtime_env.pop("excludes", None)
        pipeline_arg = str(pipeline_file.resolve())
    packages = list(runtime_env.get("pip") or []) + list(pip or [])
    if packages:
        runtime_env["pip"] = packages
    else:
        runtime_env.pop("pip", None)
    env_vars = {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    env_vars.update(parse_env(env or []))
    runtime_env["env_vars"] = env_vars

    run_name = pipeline.config.run_name
    runs_dir = runs_dir.expanduser().resolve()
    argv = [python, "-m", "ray_jobs.entrypoint", pipeline_arg, "--runs-dir", str(runs_dir)]
    for item in overrides:
        argv += ["--set", item]
    for name in force or []:
        argv += ["--force", name]
    job_id = job_id or f"heedful-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    metadata = {"heedful_job_id": job_id, "heedful_run": run_name, "pipeline": pipeline_arg, "runs_dir": str(runs_dir)}
    return JobSpec(job_id, shlex.join(argv), runtime_env, metadata, run_name, runs_dir)


def client(address: str | None):
    from pipeline.cluster import prepare_environment

    prepare_environment()
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # connection refused, auth mismatch: Ray's message says which
        hint = ""
        if "authentication" in str(exc).lower() and os.environ.get("RAY_AUTH_MODE") != "token":
            # `ray start` turns token auth on by default; the client needs it switched on too
            hint = "\n(the cluster uses token auth: export RAY_AUTH_MODE=token here as well)"
        raise HeedfulError(f"cannot reach the Ray dashboard at {url}: {exc}{hint}") from None


def submit(spec: JobSpec, address: str | None):
    """Submit; returns the client so callers can follow the job."""
    jobs = client(address)
    jobs.submit_job(
        entrypoint=spec.entrypoint,
        runtime_env=spec.runtime_env,
        metadata=spec.metadata,
        submission_id=spec.job_id,
        entrypoint_num_cpus=0,
    )
    return jobs


def follow(jobs, job_id: str, write: Callable[[str], None], poll_s: float = 0.5, timeout_s: float | None = None) -> str:
    """Stream the job's logs until it ends; returns the final status name."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the log stream can drop (dashboard restart): fall back to polling
        write(f"[log stream ended: {exc}; polling status]\n")
    return wait(jobs, job_id, poll_s, timeout_s)


def wait(jobs, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.time() > deadline:
            return status
        time.sleep(poll_s)
