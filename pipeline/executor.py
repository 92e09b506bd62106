"""Run one stage to completion inside the current process (a Ray worker or the driver).

The executor owns the staging folder, logging, the manifest and the atomic commit;
the stage owns only its outputs. A stage that raises leaves its committed outputs
from earlier runs untouched.
"""

from __future__ import annotations

import logging
import platform
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .artifacts import MANIFEST, RunDir, atomic_write_json, describe_output, package_versions
from .errors import is_user_error
from .precision import known_cpu_precision
from .stage import StageContext


@dataclass
class StageTask:
    """Everything needed to run a stage, picklable for Ray."""

    run_name: str
    run_dir: str
    name: str
    uses: str
    config: dict[str, Any]
    model: str
    seed: int
    fingerprint: str
    inputs: dict[str, dict[str, Any]]
    num_threads: int = 1
    num_gpus: float = 0.0


@dataclass
class StageOutcome:
    name: str
    status: str  # done | failed
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    resumed: bool = False
    host: str = ""
    #: the error is a known, user-fixable one (pipeline/errors.is_user_error): shown without a traceback
    user_error: bool = False


class _Mirror:
    """sys.stdout / sys.stderr while a stage runs: every write also goes to the running stage's log.

    One mirror per underlying stream for the life of the process, installed again by every stage.
    Why not a fresh wrapper per stage: a logging handler made while a stage ran keeps the
    sys.stderr of that moment (transformers makes its library handler when it is first imported,
    usually inside the first stage that needs it, since heedful imports it lazily), and
    a later stage of the same process (an in-process run, a reused Ray worker) then wrote through
    the earlier stage's closed file: "I/O operation on closed file", and the warning lost. Through
    the shared mirror such a handler writes into whichever stage runs now, or only to the stream
    between stages."""

    _over: dict[int, _Mirror] = {}

    def __init__(self, stream):
        self._stream, self.file = stream, None

    @classmethod
    def of(cls, stream) -> _Mirror:
        if isinstance(stream, _Mirror):
            return stream
        return cls._over.setdefault(id(stream), cls(stream))  # the mirror holds the stream: its id stays its own

    def write(self, data):
        file = self.file
        if file is not None and not file.closed:
            file.write(data)
        return self._stream.write(data)

    def flush(self):
        file = self.file
        if file is not None and not file.closed:
            file.flush()
        self._stream.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def execute_stage(task: StageTask) -> StageOutcome:
    run = RunDir(Path(task.run_dir))
    staging, resumed = run.begin(task.name, task.fingerprint)
    log_file = (staging / "stage.log").open("a", encoding="utf-8")
    old_out, old_err = sys.stdout, sys.stderr
    mirrors = (_Mirror.of(old_out), _Mirror.of(old_err))
    old_files = tuple(m.file for m in mirrors)  # a stage run inside another's: its file comes back after

    def release_streams() -> None:
        for mirror, file in zip(mirrors, old_files):
            mirror.file = file
        sys.stdout, sys.stderr = old_out, old_err

    for mirror in mirrors:
        mirror.file = log_file
    sys.stdout, sys.stderr = mirrors
    log = _stage_logger(task.name)
    started = time.time()
    outcome = StageOutcome(task.name, "failed", resumed=resumed, host=socket.gethostname())
    try:
        _set_threads(task.num_threads)
        cls = registry.get(task.uses)
        if cls is None:
            raise RuntimeError(f"stage type '{task.uses}' is not registered on host {socket.gethostname()}")
        config = cls.Config.model_validate(task.config)
        ctx = StageContext(
            name=task.name,
            uses=task.uses,
            run_name=task.run_name,
            run_dir=run.root,
            work_dir=staging,
            model=task.model,
            seed=task.seed,
            inputs={k: Path(v["path"]) for k, v in task.inputs.items()},
            log=log,
            num_threads=task.num_threads,
        )
        if resumed:
            log.info("resuming an interrupted attempt from %s", staging)
        log.info("stage %s (%s) starting on %s", task.name, task.uses, socket.gethostname())
        metrics = cls(config, ctx).run() or {}
        outputs = {}
        for out_name, spec in cls.outputs.items():
            path = ctx.output(out_name)
            if not path.exists():
                if spec.required:
                    raise RuntimeError(f"stage finished without writing its declared output '{out_name}'")
                continue
            outputs[out_name] = {"kind": spec.kind, "path": out_name, **describe_output(path)}
        finished = time.time()
        outcome.status, outcome.metrics, outcome.seconds = "done", _jsonable(metrics), finished - started
        atomic_write_json(staging / MANIFEST, _manifest(task, cls.version, outputs, outcome, started, finished))
        log.info("stage %s done in %.1fs", task.name, outcome.seconds)
        release_streams()
        log_file.close()
        final = run.commit(task.name)
        try:
            _copy_log(final / "stage.log", run.log_path(task.name))
        except OSError as exc:  # committed, so done: only the copy under logs/ is missing
            log.warning(
                "stage %s: its log is %s (copying it to %s failed: %s)",
                task.name,
                final / "stage.log",
                run.log_path(task.name),
                exc,
            )
    except BaseException as exc:  # report everything, including KeyboardInterrupt in-process
        outcome.seconds = time.time() - started
        outcome.user_error = is_user_error(exc)
        outcome.error = str(exc) if outcome.user_error else f"{type(exc).__name__}: {exc}"
        outcome.traceback = traceback.format_exc()  # kept in the stage log, not shown for user errors
        outcome.status = "failed"  # also when the stage ran to the end and committing it failed
        log.error("stage %s failed: %s", task.name, outcome.error)
        if log_file.closed:  # the stage ran to the end and committing it failed
            _log_after_commit_failed(run, task.name, outcome.traceback)
        else:
            log_file.write(outcome.traceback)
        if not isinstance(exc, Exception):
            raise
    finally:
        release_streams()
        if not log_file.closed:
            log_file.close()
            _copy_log(staging / "stage.log", run.log_path(task.name))
        for handler in list(log.handlers):
            log.removeHandler(handler)
    return outcome


def _model_content(model: str | None) -> str | None:
    from .models import model_fingerprint

    return None if model is None else model_fingerprint(model)


def _manifest(task: StageTask, version: str, outputs, outcome: StageOutcome, started: float, finished: float) -> dict:
    return {
        "stage": task.name,
        "uses": task.uses,
        "version": version,
        "fingerprint": task.fingerprint,
        "run_name": task.run_name,
        "model": task.model,
        # what the model was when this ran: a local folder's content hash (retrained in place later, the
        # path alone would still match), an alias or hub id as named (pipeline/models.py model_fingerprint)
        "model_content": _model_content(task.model),
        "seed": task.seed,
        "config": task.config,
        "inputs": task.inputs,
        "outputs": outputs,
        "metrics": outcome.metrics,
        "status": "complete",
        "resumed": outcome.resumed,
        "timings": {
            "started": _iso(started),
            "finished": _iso(finished),
            "seconds": round(finished - started, 3),
        },
        "packages": package_versions(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # the host's CPU precision (pipeline/precision.py): what a stage's CPU models computed in, except a
            # CTranslate2 engine's (fp32); None when no model has asked yet
            "cpu_precision": _cpu_precision(),
        },
    }


def _cpu_precision() -> str | None:
    """The host's CPU precision as far as known (a bad HEEDFUL_CPU_PRECISION is the model stages' error)."""
    try:
        return known_cpu_precision()
    except ValueError:
        return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _stage_logger(name: str) -> logging.Logger:
    log = logging.getLogger(f"heedful.stage.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    log.addHandler(handler)
    return log


def _set_threads(n: int) -> None:
    from .threads import set_torch_threads

    set_torch_threads(n)
    if not sys.stdout.isatty():  # carriage-return bars turn forwarded logs into noise
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _log_after_commit_failed(run: RunDir, name: str, text: str) -> None:
    """runs/<run>/logs/<stage>.log: what the stage printed (its staging folder's log: a failed
    commit leaves the staging folder in place), then the commit's traceback. Best effort: the disk
    that failed the commit may fail this too, and the outcome carries the error anyway."""
    try:
        staged = run.staging_dir(name) / "stage.log"
        dst = run.log_path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(staged.read_bytes() if staged.is_file() else b"")  # never an earlier run's log
        with dst.open("a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:
        pass


def _copy_log(src: Path, dst: Path) -> None:
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


def outcome_dict(outcome: StageOutcome) -> dict[str, Any]:
    return asdict(outcome)
