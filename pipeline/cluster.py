"""Ray connection policy: loopback-only local clusters, or an existing cluster by address.

Without an address Ray starts a private local instance bound to 127.0.0.1 (we set
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, otherwise Ray binds the host IP). Ray's token auth
stays on; its token file is created by us with mode 0600 before Ray starts (Ray would write
it world-readable). `--address` or RAY_ADDRESS connects
to an existing cluster (RAY_AUTH_MODE must match what the cluster was started with).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

LOOPBACK = "127.0.0.1"


def prepare_environment() -> None:
    """Environment every Ray process of ours needs; call before `import ray`."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def target_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect (or start locally). Returns facts for the run record."""
    prepare_environment()
    import ray

    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "local": False}
    target = target_address(address)
    if target:
        ray.init(address=target, log_to_driver=True, logging_level=logging.WARNING)
        _tighten_token_file()
        return {"address": target, "local": False}
    ensure_token_file()  # before ray.init: Ray itself would write the token world-readable
    # Ray starts workers at nice +15 (worker_niceness): on a busy host the stages then starve
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    _tighten_token_file()
    return {"address": ray.get_runtime_context().gcs_address, "local": True}


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def max_cpus_per_node() -> float:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0)


def total_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def token_path() -> Path:
    """Where Ray reads its auth token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_token_file() -> Path | None:
    """Create Ray's auth token ourselves, 0600 from the first byte, when a new local cluster
    would generate one: Ray (2.5x) writes `~/.ray/auth_token` with the default umask and
    only finds an existing token. Nothing to do when auth is disabled or a token is set in
    RAY_AUTH_TOKEN. Returns the token file's path when it exists."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: tighten below
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))  # Ray's own format: 256 random bits, hex
    _tighten_token_file()
    return path


def _tighten_token_file() -> None:
    """Ray writes its auth token world-readable; secrets here live in 0600 files."""
    path = token_path()
    try:
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except OSError:
        pass
