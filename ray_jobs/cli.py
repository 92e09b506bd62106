"""`heedful submit` and `heedful jobs ...`: pipelines as Ray jobs (Ray Job Submission SDK).

Registered by pipeline/cli.py's SUBCOMMANDS: `submit_app` is one command, `jobs_app` a group.
ADDRESS is the cluster's dashboard (http://HEAD:8265); default RAY_API_SERVER_ADDRESS,
RAY_ADDRESS or http://127.0.0.1:8265. RAY_AUTH_MODE must match what the cluster was started with.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
ADDRESS_HELP = (
    "Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS or http://127.0.0.1:8265)"
)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def submit_app(
    pipeline_file: Path = typer.Argument(..., help="pipeline YAML (inside the working dir)"),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. stages.align.with.num_workers=4"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders go: a path every node sees (made absolute)"),
    working_dir: Path = typer.Option(Path("."), help="folder uploaded to the cluster (the pipeline file must be inside)"),
    no_working_dir: bool = typer.Option(
        False, "--no-working-dir", help="upload nothing: nodes share this filesystem and have heedful"
    ),
    runtime_env: Path | None = typer.Option(
        None, "--runtime-env", help="runtime_env YAML template (default: ray_jobs/runtime_env.yaml)"
    ),
    pip: list[str] = typer.Option([], "--pip", help="extra package for the job's nodes (repeatable)"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job (repeatable; visible in the dashboard)"),
    force: list[str] = typer.Option([], "--force", help="rerun this stage and its dependents"),
    job_id: str | None = typer.Option(None, "--job-id", help="submission id (default: heedful-<run>-<time>-<rand>)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the job id and return"),
):
    """Submit a pipeline as a Ray job: prints the job id, streams its logs, waits for the end."""
    from .submit import build_job, submit

    spec = build_job(
        pipeline_file,
        set_,
        runs_dir=runs_dir,
        working_dir=None if no_working_dir else working_dir,
        template=runtime_env,
        pip=pip,
        env=env,
        force=force,
        job_id=job_id,
    )
    jobs = submit(spec, address)
    console.print(f"job id: [bold]{spec.job_id}[/]")
    console.print(f"run:    {spec.runs_dir / spec.run_name} (on the cluster's filesystem)")
    if no_wait:
        console.print(f"follow with `heedful jobs logs {spec.job_id} --follow`")
        return
    _follow_or_detach(jobs, spec.job_id)


def _follow_or_detach(jobs, job_id: str) -> None:
    from .submit import follow

    try:
        status = follow(jobs, job_id, _write)
    except KeyboardInterrupt:
        console.print(f"\n[yellow]detached: job {job_id} keeps running; `heedful jobs stop {job_id}` stops it[/]")
        raise typer.Exit(130) from None
    style = "green" if status == "SUCCEEDED" else "red"
    console.print(f"job {job_id}: [{style}]{status}[/]")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(help="Ray jobs submitted with `heedful submit`: list, status, logs, stop.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Jobs on the cluster, newest first, with the heedful run each one drives."""
    from .submit import client

    table = Table()
    table.add_column("job id", no_wrap=True)
    for col in ("status", "run", "started"):
        table.add_column(col)
    details = sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    for job in details:
        meta = job.metadata or {}
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        table.add_row(job.submission_id or job.job_id or "-", str(job.status.value), meta.get("heedful_run", "-"), started)
    console.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """One job's status, run and timing."""
    from .submit import client

    info = client(address).get_job_info(job_id)
    meta = info.metadata or {}
    console.print(f"{job_id}: [bold]{info.status.value}[/]" + (f" ({info.message})" if info.message else ""))
    if meta.get("heedful_run"):
        console.print(f"run: {meta.get('runs_dir', '?')}/{meta['heedful_run']}")
    if info.start_time:
        end = info.end_time or None
        console.print(f"took: {((end or 0) - info.start_time) / 1000:.1f}s" if end else "running")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    follow_: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
):
    """A job's driver logs (stage logs included); --follow streams them."""
    from .submit import client

    jobs = client(address)
    if follow_:
        _follow_or_detach(jobs, job_id)
    else:
        _write(jobs.get_job_logs(job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Stop a job; finished stages stay, and resubmitting resumes the rest."""
    from .submit import client, wait

    jobs = client(address)
    if not jobs.stop_job(job_id):
        console.print(f"{job_id} was not running ({jobs.get_job_status(job_id).value})")
        return
    console.print(f"{job_id}: {wait(jobs, job_id, timeout_s=60)}")
