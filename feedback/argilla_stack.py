"""The local Argilla 2.8 stack: Redis + osmem (in-memory OpenSearch) + argilla-server.

Everything binds 127.0.0.1 on free ports and lives under `$HEEDFUL_HOME/argilla`
(or `$HEEDFUL_ARGILLA_HOME`):

    state.json        ports, URL and the PID (+ kernel start time) of each process we started
    credentials.json  owner and annotator accounts with passwords and API keys (mode 0600)
    api_key           the owner's API key alone (mode 0600), for tools that read a key file
    argilla.db        SQLite database (kept across down/up; the index is rebuilt at start)
    logs/             one log per process

`down` stops exactly the processes recorded in state.json, after checking that each PID
still belongs to the process we started (same kernel start time), so a recycled PID is
never signalled. `up` twice is harmless: the second call finds the stack healthy and
returns it.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import HeedfulError
from pipeline.paths import heedful_home

OWNER = "owner"
LAUNCHER = Path(__file__).with_name("argilla_launcher.py")
SERVER_VENV_ENV = "HEEDFUL_ARGILLA_VENV"
ORDER = ("redis", "osmem", "server")


class StackError(HeedfulError):
    """The local stack could not be started, found or stopped."""


# -- where things are ------------------------------------------------------------------------


def stack_home() -> Path:
    """$HEEDFUL_ARGILLA_HOME, else $HEEDFUL_HOME/argilla (tests use their own)."""
    env = os.environ.get("HEEDFUL_ARGILLA_HOME")
    path = Path(env).expanduser() if env else heedful_home() / "argilla"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def server_venv() -> Path:
    """argilla-server's own virtualenv: $HEEDFUL_ARGILLA_VENV, else `.venv-argilla` beside the repo's code."""
    env = os.environ.get(SERVER_VENV_ENV)
    venv = Path(env) if env else Path(__file__).resolve().parent.parent / ".venv-argilla"
    if not (venv / "bin" / "python").exists():
        raise StackError(
            f"argilla-server's virtualenv not found at {venv}: run `make setup` (it creates .venv-argilla) "
            f"or point {SERVER_VENV_ENV} at a venv with `argilla-server==2.8.0 osmem-server`"
        )
    return venv


def osmem_binary(venv: Path) -> Path:
    found = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "osmem_server" / "bin" / "osmem-server"))
    if not found:
        raise StackError(f"osmem-server is not installed in {venv}: `{venv}/bin/pip install osmem-server`")
    return Path(found[0])


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    if not found:
        raise StackError("redis-server not found: `apt-get install -y redis-server` (make setup does it)")
    return Path(found)


# -- secrets ---------------------------------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
    os.replace(tmp, path)


def credentials_path() -> Path:
    return stack_home() / "credentials.json"


def load_credentials() -> dict[str, Any]:
    path = credentials_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def save_credentials(creds: dict[str, Any]) -> None:
    write_private(credentials_path(), json.dumps(creds, indent=2))
    write_private(stack_home() / "api_key", creds["owner"]["api_key"] + "\n")


def ensure_owner_credentials() -> dict[str, Any]:
    creds = load_credentials()
    if "owner" not in creds:
        creds["owner"] = {
            "username": OWNER,
            "password": secrets.token_urlsafe(12),
            "api_key": "hf.argilla." + secrets.token_urlsafe(32),
        }
        creds.setdefault("users", {})
        save_credentials(creds)
    return creds


# -- processes -------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` (None if gone or a zombie): tells our process from a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        _reap(pid)
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(proc: dict[str, Any]) -> bool:
    return _start_ticks(proc["pid"]) == proc["start_ticks"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True
        )
    ticks = None
    for _ in range(100):
        ticks = _start_ticks(proc.pid)
        if ticks is not None:
            break
        time.sleep(0.01)
    return {"pid": proc.pid, "start_ticks": ticks, "cmd": cmd[0], "log": str(log)}


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the stack -------------------------------------------------------------------------------


@dataclass
class StackInfo:
    url: str
    username: str
    home: Path
    processes: dict[str, dict[str, Any]]
    startup_seconds: float
    already_running: bool = False

    @property
    def api_key_file(self) -> Path:
        return self.home / "api_key"


def _state_path() -> Path:
    return stack_home() / "state.json"


def read_state() -> dict[str, Any] | None:
    path = _state_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _info(state: dict[str, Any], already: bool = False) -> StackInfo:
    return StackInfo(
        url=state["url"],
        username=OWNER,
        home=stack_home(),
        processes=state["processes"],
        startup_seconds=state.get("startup_seconds", 0.0),
        already_running=already,
    )


def healthy(state: dict[str, Any] | None) -> bool:
    if not state or not all(_alive(p) for p in state["processes"].values()):
        return False
    return _get(state["url"] + "/api/v1/version") == 200


def up(port: int | None = None, timeout: float = 120.0) -> StackInfo:
    """Start the stack (or return the running one). `port`: the UI/API port (default 6900 when free)."""
    from filelock import FileLock

    home = stack_home()
    with FileLock(str(home / "stack.lock")):
        state = read_state()
        if state is not None and healthy(state):  # healthy(None) is False anyway
            return _info(state, already=True)
        if state:
            _stop(state)
        venv = server_venv()
        osmem, redis = osmem_binary(venv), redis_binary()
        ensure_owner_credentials()  # the owner's key file exists before the server starts
        started = time.time()
        logs = home / "logs"
        logs.mkdir(exist_ok=True)
        tmp = home / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (home / "redis").mkdir(exist_ok=True)
        if port is None:
            port = 6900 if _port_free(6900) else _free_port()
        elif not _port_free(port):
            raise StackError(f"port {port} on 127.0.0.1 is taken; choose another with --port")
        redis_port, osmem_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGILLA_", "PYTHON", "VIRTUAL_ENV"))}
        env.update(TMPDIR=str(tmp), HF_HUB_DISABLE_TELEMETRY="1")
        procs: dict[str, dict[str, Any]] = {}
        state = {
            "url": f"http://127.0.0.1:{port}",
            "ports": {"server": port, "redis": redis_port, "osmem": osmem_port},
            "processes": procs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            procs["redis"] = _spawn(
                "redis",
                [
                    str(redis),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(redis_port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(home / "redis"),
                    "--protected-mode",
                    "yes",
                ],
                env,
                logs,
            )
            procs["osmem"] = _spawn(
                "osmem", [str(osmem), "--addr", f"127.0.0.1:{osmem_port}", "--no-stdin-watch", "--no-ja"], env, logs
            )
            _write_state(state)
            server_env = dict(env)
            server_env.update(
                ARGILLA_HOME_PATH=str(home / "server"),
                ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{home / 'argilla.db'}?check_same_thread=False",
                ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                ARGILLA_ELASTICSEARCH=f"http://127.0.0.1:{osmem_port}",
                ARGILLA_SEARCH_ENGINE="osmem",
                ARGILLA_ENABLE_TELEMETRY="0",
            )
            procs["server"] = _spawn(
                "server",
                [
                    str(venv / "bin" / "python"),
                    str(LAUNCHER),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--secrets",
                    str(credentials_path()),
                ],
                server_env,
                logs,
            )
            _write_state(state)
            deadline = time.time() + timeout
            while _get(state["url"] + "/api/v1/version", timeout=1.0) != 200:
                for name, proc in procs.items():
                    if not _alive(proc):
                        raise StackError(f"{name} exited during start-up; last lines of {proc['log']}:\n{_tail(proc['log'])}")
                if time.time() > deadline:
                    raise StackError(
                        f"argilla-server did not answer within {timeout:.0f}s; see {procs['server']['log']}:\n"
                        f"{_tail(procs['server']['log'])}"
                    )
                time.sleep(0.1)
        except BaseException:
            _stop(state)
            raise
        state["startup_seconds"] = round(time.time() - started, 2)
        _write_state(state)
        return _info(state)


def _write_state(state: dict[str, Any]) -> None:
    path = _state_path()
    tmp = path.with_name("state.json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _stop(state: dict[str, Any], grace: float = 5.0) -> list[str]:
    """SIGTERM each recorded process group (ours only), then SIGKILL what is left."""
    stopped = []
    procs = state.get("processes", {})
    names = [n for n in reversed(ORDER) if n in procs]
    for name in names:
        proc = procs[name]
        if _alive(proc):
            try:
                os.killpg(proc["pid"], signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace
    for name in names:
        proc = procs[name]
        while _alive(proc) and time.time() < deadline:
            time.sleep(0.05)
        if _alive(proc):
            try:
                os.killpg(proc["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(100):
                if not _alive(proc):
                    break
                time.sleep(0.02)
        _reap(proc["pid"])
    return stopped


def down(purge: bool = False) -> list[str]:
    """Stop what `up` started. `purge` also deletes the database and credentials."""
    from filelock import FileLock

    home = stack_home()
    with FileLock(str(home / "stack.lock")):
        state = read_state()
        stopped = _stop(state) if state else []
        _state_path().unlink(missing_ok=True)
        shutil.rmtree(home / "tmp", ignore_errors=True)
        if purge:
            for name in ("argilla.db", "credentials.json", "api_key"):
                (home / name).unlink(missing_ok=True)
            shutil.rmtree(home / "server", ignore_errors=True)
    return stopped


def status() -> dict[str, Any]:
    state = read_state()
    if not state:
        return {"running": False, "processes": {}}
    procs = {name: {"pid": p["pid"], "alive": _alive(p), "log": p["log"]} for name, p in state["processes"].items()}
    return {
        "running": healthy(state),
        "url": state["url"],
        "ports": state.get("ports", {}),
        "processes": procs,
        "started": state.get("started"),
        "startup_seconds": state.get("startup_seconds"),
    }


def local_url() -> str | None:
    state = read_state()
    return state["url"] if state else None


def remember_users(api_url: str, passwords: dict[str, str], api_keys: dict[str, str] | None = None) -> None:
    """Keep new users' passwords (and keys) in the local stack's 0600 credentials file.
    For another server nothing is stored: those accounts are managed there."""
    if not passwords or (local_url() or "").rstrip("/") != api_url.rstrip("/"):
        return
    creds = ensure_owner_credentials()
    for name, password in passwords.items():
        entry = creds.setdefault("users", {}).setdefault(name, {})
        entry["password"] = password
        if api_keys and name in api_keys:
            entry["api_key"] = api_keys[name]
    save_credentials(creds)
