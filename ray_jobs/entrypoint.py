"""What a heedful Ray job runs: `python -m ray_jobs.entrypoint PIPELINE.yaml --runs-dir DIR [--set K=V]`.

It is `heedful run` inside the job's driver, with two differences: it refuses to start a
private local Ray (inside a job RAY_ADDRESS names the cluster; without it the stages would
silently run on the head node alone), and it records the job in `<runs>/<run>/job.json` so
a run folder says which job produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_metadata() -> dict:
    """Metadata `heedful submit` attached to the job (empty outside a Ray job)."""
    try:
        return dict(json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("metadata") or {})
    except ValueError:
        return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.entrypoint", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--runs-dir", type=Path, required=True, help="absolute path on storage every node sees")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE")
    parser.add_argument("--allow-local", action="store_true", help="run without a cluster (debugging)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.environ.get("RAY_ADDRESS") and not args.allow_local:
        print(
            "error: RAY_ADDRESS is not set: this entrypoint runs inside a Ray job "
            "(use `heedful submit`, or `heedful run` locally)",
            file=sys.stderr,
        )
        return 2
    from pipeline import cli
    from pipeline.config import load_pipeline

    run_name = load_pipeline(args.pipeline, list(args.overrides)).config.run_name
    run_dir = args.runs_dir / run_name
    meta = job_metadata()
    record = {
        "job_id": meta.get("heedful_job_id"),
        "pipeline": str(args.pipeline),
        "overrides": args.overrides,
        "ray_address": os.environ.get("RAY_ADDRESS"),
        "started": _now(),
    }
    cli_args = ["run", str(args.pipeline), "--runs-dir", str(args.runs_dir)]
    for item in args.overrides:
        cli_args += ["--set", item]
    for stage in args.force:
        cli_args += ["--force", stage]
    sys.argv = ["heedful", *cli_args]
    code = 1
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if run_dir.is_dir():
            from pipeline.artifacts import atomic_write_json

            atomic_write_json(run_dir / "job.json", {**record, "finished": _now(), "exit_code": code})
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


if __name__ == "__main__":
    sys.exit(main())
