"""A throwaway Ray head on 127.0.0.1 for tests: `ray start --head` in its own session.

Stopping it ends exactly the processes of that session (SIGTERM, then SIGKILL after a
grace period) -- `ray stop` would also kill every other Ray on the machine, including other
people's. Token auth is on for the head and for this process (RAY_AUTH_MODE=token both sides).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import ensure_token_file

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str  # for `heedful run --address` / ray.init
    dashboard: str  # for `heedful submit --address` / JobSubmissionClient
    session: int  # process session id: every process of this cluster
    env: dict[str, str]
    temp_dir: Path

    def processes(self):
        import psutil

        out = []
        for proc in psutil.process_iter(["name"]):
            try:
                if os.getsid(proc.pid) == self.session:
                    out.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return out

    def train_workers(self):
        """Live Ray Train worker processes of this cluster."""
        import psutil

        found = []
        for proc in self.processes():
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found


def head_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run `python`
    env.update(extra or {})
    return env


@contextmanager
def ray_head(num_cpus: int = 2, startup_timeout: float = 120.0, attempts: int = 2):
    """A started head (dashboard up, job agent registered), stopped and removed on exit.

    `ray start` that exits during start-up is tried again with fresh ports (`attempts` in all): the
    ports are chosen free, but the rest of the suite runs Ray beside these tests, and a port taken
    between choosing and binding it ended a CI run (2026-12-05). The last failure's error carries
    the tail of Ray's start-up log, which is removed with the head's folder."""
    for attempt in range(attempts):
        head, proc, log = _start(num_cpus)
        try:
            deadline = time.time() + startup_timeout
            _wait_for_dashboard(head, proc, deadline)
            _wait_for_job_agent(head, proc, deadline)
        except RuntimeError as err:  # `ray start` exited
            tail = (head.temp_dir / "ray-start.log").read_text(errors="replace")[-3000:]
            _cleanup(head, proc, log)
            if attempt + 1 == attempts:
                raise RuntimeError(f"{err} (removed with the head's folder); its log ended:\n{tail}") from None
            continue
        except BaseException:
            _cleanup(head, proc, log)
            raise
        break
    try:
        yield head
    finally:
        _cleanup(head, proc, log)


def _start(num_cpus: int) -> tuple[RayHead, subprocess.Popen, Any]:
    port, dashboard_port, client_port, agent_port = free_port(), free_port(), free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = head_env()
    os.environ["RAY_AUTH_MODE"] = "token"  # this process talks to the head too
    # `ray start` with token auth only reads a token (ray.init would make one): on a fresh machine, where
    # nothing has made ~/.ray/auth_token yet, it exits with AuthenticationError (seen 2026-12-06, when
    # these modules started before the main suite's first ray.init). heedful's own, 0600 from creation.
    ensure_token_file()
    log = (temp_dir / "ray-start.log").open("w")
    proc = subprocess.Popen(
        [
            str(RAY_BIN),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(client_port),
            # the job agent's HTTP port is otherwise a fixed 52365: with another Ray on the machine
            # (the rest of the suite runs beside these tests) it cannot bind and no job can be submitted
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", proc.pid, env, temp_dir), proc, log


def _cleanup(head: RayHead, proc: subprocess.Popen, log: Any) -> None:
    _stop(head, proc)
    log.close()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _wait_for_dashboard(head: RayHead, proc: subprocess.Popen, deadline: float) -> None:
    import urllib.error
    import urllib.request

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: see {head.temp_dir / 'ray-start.log'}")
        try:
            with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # up, and asking for the token
            return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {head.dashboard} did not come up; see {head.temp_dir / 'ray-start.log'}")


def _wait_for_job_agent(head: RayHead, proc: subprocess.Popen, deadline: float) -> None:
    """Wait until the head node's job agent has registered (its address in the GCS's KV store).

    The dashboard answers before that; a job submitted in between waits 10 s for an agent and
    then fails with "No available agent to submit job" -- which happened on a loaded machine
    (the Ray-head modules run beside the rest of the suite, issue 15)."""
    # Asked from a child process: a GCS client opened in the test process (the job agent's key is
    # only in the GCS's KV store) made a later `ray.init` in it hang in GetClusterId (seen in CI).
    probe = (
        "import sys\n"
        "from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD\n"
        "from ray._raylet import GcsClient\n"
        "from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX\n"
        "keys = GcsClient(address=sys.argv[1]).internal_kv_keys(\n"
        "    DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(), namespace=KV_NAMESPACE_DASHBOARD)\n"
        "sys.exit(0 if keys else 1)\n"
    )
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: see {head.temp_dir / 'ray-start.log'}")
        try:
            found = subprocess.run([sys.executable, "-c", probe, head.gcs_address], env=head.env, timeout=60, capture_output=True)
            if found.returncode == 0:
                return
        except subprocess.TimeoutExpired:  # the GCS is still starting: ask again
            pass
        time.sleep(0.5)
    logs = sorted(head.temp_dir.glob("session_*/logs/dashboard_agent.log"))
    tail = logs[-1].read_text(errors="replace")[-2000:] if logs else "(no dashboard_agent.log)"
    raise TimeoutError(f"the job agent of the Ray head at {head.gcs_address} did not register:\n{tail}")


def _stop(head: RayHead, proc: subprocess.Popen, grace: float = 8.0) -> None:
    """End every process of the head's session, gracefully first."""
    import psutil

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    procs = head.processes()
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    left = head.processes()
    if left:
        raise RuntimeError(f"Ray head left processes behind: {[p.pid for p in left]}")
