"""Run folders, atomic outputs, manifests and fingerprints.

Layout of `runs/<run>/`:
  <stage>/                 committed outputs + manifest.json (only ever appears complete)
  .staging/<stage>/        work in progress; kept across interruptions for resume while
                           its fingerprint matches, discarded otherwise
  logs/<stage>.log         the last attempt's log (also for failed stages)
  run.json                 one record per `heedful run` invocation (status, timings)
  report.html              the run report
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def hash_path(path: Path) -> str:
    """Content hash of a file or a folder (relative names + bytes, sorted)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(rel.encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


#: `cached_hash_path`'s entries, under heedful's cache folder (pipeline/paths.py `cache_dir`)
FOLDER_HASHES = "folder_hashes"


def cached_hash_path(folder: Path, cache_dir: Path | None = None) -> str:
    """`hash_path(folder)`, remembered in `<heedful home>/cache/folder_hashes/`: a local model's
    gigabytes are read once per change, not at every `heedful run`.

    An entry is keyed by the folder's absolute path and holds the hash with a signature of every
    file's (relative name, size, mtime_ns, ctime_ns); it is used while the signature still
    matches, so a hit costs a stat walk and a changed, added or removed file (or another folder
    at that path) hashes once more. A folder that changed while it was read is hashed but not
    remembered. Entries are written atomically (a fresh temporary file renamed over the entry):
    processes that hash the same folder at once write the same answer, and a reader never sees
    half an entry; a cache that cannot be written only costs the next run a re-hash."""
    folder = Path(os.path.abspath(folder))
    root = cache_dir if cache_dir is not None else _cache_root() / FOLDER_HASHES
    entry_path = root / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:40]}.json"
    signature = _stat_signature(folder)
    try:
        entry = read_json(entry_path)
        if entry["path"] == str(folder) and entry["signature"] == signature:
            return str(entry["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hash_path(folder)
    if _stat_signature(folder) == signature:
        try:
            atomic_write_json(entry_path, {"path": str(folder), "signature": signature, "hash": digest})
        except OSError:
            pass
    return digest


def _stat_signature(folder: Path) -> str:
    """A hash of the (relative name, size, mtime_ns, ctime_ns) of every file `hash_path` reads."""
    stats = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = file.stat()
        stats.append([file.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return hash_json(stats)


def _cache_root() -> Path:
    """`pipeline.paths.cache_dir`, looked up here so a test can point this module's folder hashes
    elsewhere without moving every other cache (`cached_hash_path`'s `cache_dir` argument shadows
    the function's name inside it)."""
    from .paths import cache_dir

    return cache_dir()


class RunDir:
    """One pipeline run's folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def staging_dir(self, stage: str) -> Path:
        return self.root / ".staging" / stage

    def log_path(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.log"

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except (OSError, json.JSONDecodeError):
            return None

    def is_current(self, stage: str, fingerprint: str) -> bool:
        manifest = self.manifest(stage)
        if not manifest or manifest.get("fingerprint") != fingerprint:
            return False
        return all((self.stage_dir(stage) / out["path"]).exists() for out in manifest.get("outputs", {}).values())

    def begin(self, stage: str, fingerprint: str) -> tuple[Path, bool]:
        """Staging folder for `stage`. Returns (path, resumed): an interrupted attempt with
        the same fingerprint is kept so trainers can resume from their checkpoints."""
        staging = self.staging_dir(stage)
        marker = staging / ".fingerprint"
        resumed = staging.is_dir() and marker.is_file() and marker.read_text().strip() == fingerprint
        if not resumed:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            marker.write_text(fingerprint)
        return staging, resumed

    def commit(self, stage: str) -> Path:
        """Swap the staging folder in as the stage's output folder (atomic renames)."""
        staging = self.staging_dir(stage)
        final = self.stage_dir(stage)
        (staging / ".fingerprint").unlink(missing_ok=True)
        trash = None
        if final.exists():
            trash = self.root / ".trash" / f"{stage}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, trash)
        try:
            os.replace(staging, final)
        except BaseException:  # the earlier outputs go back: a failed commit leaves them as they were
            if trash is not None:
                os.replace(trash, final)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final

    # -- invocation records -------------------------------------------------------------

    def record_invocation(self, record: dict[str, Any], replace_last: bool = False) -> None:
        """Append an invocation record (or update the running one, so `status` is live)."""
        path = self.root / "run.json"
        history = read_json(path) if path.is_file() else {"invocations": []}
        if replace_last and history["invocations"]:
            history["invocations"][-1] = record
        else:
            history["invocations"].append(record)
        history["invocations"] = history["invocations"][-50:]
        atomic_write_json(path, history)

    def last_invocation(self) -> dict[str, Any] | None:
        """The last invocation record; one still marked running whose process is gone (kill -9,
        power loss) reads as interrupted, with its running stages interrupted too."""
        path = self.root / "run.json"
        if not path.is_file():
            return None
        invocations = read_json(path).get("invocations", [])
        if not invocations:
            return None
        last = invocations[-1]
        status = last.get("status")
        if status == "running" and process_alive(last.get("process")) is False:
            status = "interrupted"
        if status != "running":  # nothing can still be running once the driver stopped
            last = {
                **last,
                "status": status,
                "stages": [
                    {**s, "status": "interrupted", "error": "stopped mid-stage; rerun to resume"}
                    if s.get("status") == "running"
                    else s
                    for s in last.get("stages", [])
                ],
            }
        return last

    def staging_fingerprint(self, stage: str) -> str | None:
        """The fingerprint an unfinished attempt of `stage` was started with (None: no attempt kept)."""
        marker = self.staging_dir(stage) / ".fingerprint"
        try:
            return marker.read_text().strip()
        except OSError:
            return None


def this_process() -> dict[str, Any]:
    """Identifies the running driver in run.json so `heedful status` can tell a killed run."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _process_start(pid)}


def process_alive(process: dict[str, Any] | None) -> bool | None:
    """True/False for a process recorded by `this_process` on this host; None when unknown
    (no record, another host). A reused pid is told apart by its start time."""
    if not process or process.get("host") != socket.gethostname() or not process.get("pid"):
        return None
    pid = int(process["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = process.get("started")
    return started is None or _process_start(pid) in (None, started)


def _process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def describe_output(path: Path) -> dict[str, Any]:
    """Small facts about an output for the manifest and lineage (row counts, columns)."""
    info: dict[str, Any] = {}
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
            info.update(rows=len(ds), columns=list(ds.column_names))
        except Exception as exc:  # a description must never fail a stage
            info["describe_error"] = str(exc)
    elif path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as fh:
            info["rows"] = sum(1 for line in fh if line.strip())
    if path.is_dir():
        info["bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        info["bytes"] = path.stat().st_size
    return info


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("heedful", "torch", "transformers", "trl", "peft", "datasets", "ray", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def now() -> float:
    return time.time()
