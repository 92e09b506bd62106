"""Plan a pipeline, skip up-to-date stages, dispatch the rest as Ray tasks.

A stage's fingerprint = hash(stage type + version, the config's non-default fields, model,
seed, input fingerprints); an upstream fingerprint flows into its consumers, so changing one
stage's config reruns exactly that stage and what depends on it. Only non-default fields, so
that a field added to a config with a default leaves existing fingerprints alone; a changed
default must come with a bump of the stage's `version` (pipeline/fingerprint.py). File inputs
enter by content, and so do local model folders (the stage's model, and the models and adapters
its `with:` names): an alias or hub id by its name (pipeline/models.py `model_fingerprint`). An
input folder that names a local base model it loads on (a reward model given as a path) also
holds that base's fingerprint (pipeline/models.py `input_fingerprint`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import RunDir, atomic_write_json, hash_json, this_process
from .config import Pipeline, ResolvedStage
from .executor import StageOutcome, StageTask, execute_stage
from .fingerprint import Folders, semantic_config
from .models import input_fingerprint, model_fingerprint
from .record_schemas import check_pipeline_inputs


@dataclass
class StageRecord:
    name: str
    uses: str
    status: str  # skipped | done | failed | blocked | interrupted
    fingerprint: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    resumed: bool = False


@dataclass
class RunResult:
    run_dir: Path
    records: list[StageRecord]
    seconds: float
    ray: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(r.status in ("done", "skipped") for r in self.records)

    def record(self, name: str) -> StageRecord:
        return next(r for r in self.records if r.name == name)


def fingerprints(pipeline: Pipeline) -> dict[str, str]:
    """Every stage's fingerprint, computed before anything runs (inputs and model folders are hashed once)."""
    out: dict[str, str] = {}
    cache: dict[Path, str] = {}
    folders = functools.cache(model_fingerprint)
    for stage in pipeline.stages:
        inputs = {}
        for name, ref in stage.inputs.items():
            if ref.stage is not None:
                inputs[name] = f"{out[ref.stage]}:{ref.output}"
            else:
                assert ref.path is not None
                if ref.path not in cache:
                    cache[ref.path] = input_fingerprint(ref.path)
                inputs[name] = cache[ref.path]
        out[stage.name] = hash_json(
            {
                "uses": stage.spec.uses,
                "version": stage.cls.version,
                "config": _semantic_config(stage, folders),
                "model": folders(stage.model),
                "seed": pipeline.config.seed,
                "inputs": inputs,
            }
        )
    return out


def _semantic_config(stage: ResolvedStage, folders: Folders) -> dict[str, Any]:
    return semantic_config(stage.config, exclude=stage.cls.non_semantic_fields, folders=folders)


def _train_workers(stage: ResolvedStage) -> int:
    """Ray Train workers a trainer stage asks for (`num_workers` in TrainSettings); 1 otherwise.
    With more than one, `resources` are per worker (pipeline/distributed.py)."""
    return int(getattr(stage.config, "num_workers", 1) or 1)


def _stage_gpus(stage: ResolvedStage) -> float:
    """`use_gpu: true` on a single-worker trainer asks Ray for a GPU even without `resources`."""
    gpus = stage.spec.resources.num_gpus
    return max(gpus, 1.0) if getattr(stage.config, "use_gpu", None) is True else gpus


class Runner:
    """Drives one invocation of a pipeline. `use_ray=False` runs stages in-process."""

    def __init__(
        self,
        pipeline: Pipeline,
        runs_dir: Path,
        *,
        use_ray: bool = True,
        address: str | None = None,
        force: set[str] | None = None,
        on_event: Callable[[str, StageRecord | None, str], None] | None = None,
    ):
        self.pipeline = pipeline
        self.run = RunDir(Path(runs_dir).resolve() / pipeline.config.run_name)
        self.use_ray = use_ray
        self.address = address or pipeline.config.ray.address
        self.force = force or set()
        self.on_event = on_event or (lambda kind, record, text: None)
        self.fps = fingerprints(pipeline)
        self._process = this_process()

    # -- planning -------------------------------------------------------------------------

    def plan(self) -> dict[str, str]:
        """stage -> 'skip' | 'run'. Forced stages and their dependents run."""
        forced: set[str] = set()
        for name in self.force:
            forced |= {name} | self.pipeline.downstream(name)
        return {
            s.name: "skip" if s.name not in forced and self.run.is_current(s.name, self.fps[s.name]) else "run"
            for s in self.pipeline.stages
        }

    def task_for(self, stage: ResolvedStage, num_cpus: float) -> StageTask:
        inputs: dict[str, dict[str, Any]] = {}
        for name, ref in stage.inputs.items():
            if ref.stage is not None:
                assert ref.output is not None  # a stage reference always names its output (config._parse_ref)
                path = self.run.stage_dir(ref.stage) / ref.output
                kind = self.pipeline.stage(ref.stage).cls.outputs[ref.output].kind
                inputs[name] = {
                    "ref": ref.raw,
                    "path": str(path),
                    "kind": kind,
                    "stage": ref.stage,
                    "output": ref.output,
                    "fingerprint": self.fps[ref.stage],
                }
            else:
                kind = stage.cls.inputs[name].kinds[0]
                inputs[name] = {"ref": ref.raw, "path": str(ref.path), "kind": kind, "stage": None, "output": None}
        return StageTask(
            run_name=self.pipeline.config.run_name,
            run_dir=str(self.run.root),
            name=stage.name,
            uses=stage.spec.uses,
            config=stage.config.model_dump(mode="json"),
            model=stage.model,
            seed=self.pipeline.config.seed,
            fingerprint=self.fps[stage.name],
            inputs=inputs,
            num_threads=max(1, int(num_cpus)),
            num_gpus=stage.spec.resources.num_gpus,
        )

    # -- execution ------------------------------------------------------------------------

    def execute(self) -> RunResult:
        started = time.time()
        plan = self.plan()
        # file inputs are checked before anything is written, Ray starts or a model loads
        check_pipeline_inputs(self.pipeline, only=[name for name, what in plan.items() if what == "run"])
        self.run.root.mkdir(parents=True, exist_ok=True)
        self._save_pipeline()
        records: dict[str, StageRecord] = {}
        self._records, self._started = records, started
        self._running: set[str] = set()
        for stage in self.pipeline.stages:
            if plan[stage.name] == "skip":
                manifest = self.run.manifest(stage.name) or {}
                records[stage.name] = StageRecord(
                    stage.name, stage.spec.uses, "skipped", self.fps[stage.name], metrics=manifest.get("metrics", {})
                )
                self.on_event("skipped", records[stage.name], "up to date")
        self._write_invocation(status="running", first=True)
        to_run = [s for s in self.pipeline.stages if plan[s.name] == "run"]
        ray_info = None
        try:
            if to_run:
                if self.use_ray:
                    ray_info = self._run_with_ray(to_run, records)
                else:
                    self._run_in_process(to_run, records)
        except KeyboardInterrupt:
            self._write_invocation(status="interrupted")
            raise
        result = RunResult(self.run.root, [records[s.name] for s in self.pipeline.stages], time.time() - started, ray_info)
        self._write_invocation(status="ok" if result.ok else "failed", ray=ray_info)
        return result

    def _started_stage(self, name: str) -> None:
        self._running.add(name)
        self._write_invocation(status="running")
        self.on_event("started", None, name)

    def _write_invocation(self, status: str, first: bool = False, ray: dict[str, Any] | None = None) -> None:
        """run.json is updated as stages finish, so `heedful status` works during a run."""
        stages = []
        for stage in self.pipeline.stages:
            record = self._records.get(stage.name)
            state = "running" if stage.name in self._running else "pending"
            stages.append(
                record.__dict__
                if record
                else {"name": stage.name, "uses": stage.spec.uses, "status": state, "fingerprint": self.fps[stage.name]}
            )
        self.run.record_invocation(
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
                "seconds": round(time.time() - self._started, 3),
                "status": status,
                "ok": status == "ok",
                "process": self._process,
                "ray": ray,
                "stages": stages,
            },
            replace_last=not first,
        )

    def _ready(self, stage: ResolvedStage, records: dict[str, StageRecord]) -> bool | None:
        """True when all deps finished well; None when a dep failed (stage is blocked)."""
        states = [records.get(dep) for dep in stage.deps]
        if any(r is not None and r.status in ("failed", "blocked", "interrupted") for r in states):
            return None
        return all(r is not None and r.status in ("done", "skipped") for r in states)

    def _finish(self, stage: ResolvedStage, outcome: StageOutcome, records: dict[str, StageRecord]) -> None:
        error = outcome.error
        if outcome.status == "failed" and not outcome.user_error:
            # unexpected: a one-line summary and where the whole traceback is
            first = ((error or "").strip().splitlines() or ["unknown error"])[0][:300]
            error = f"{first} (unexpected error; full traceback in {self.run.log_path(stage.name)})"
        record = StageRecord(
            stage.name,
            stage.spec.uses,
            outcome.status,
            self.fps[stage.name],
            outcome.seconds,
            outcome.metrics,
            error,
            outcome.resumed,
        )
        records[stage.name] = record
        self._running.discard(stage.name)
        self._write_invocation(status="running")
        self.on_event(outcome.status, record, error or "")

    def _block_dependents(self, pending: list[ResolvedStage], records: dict[str, StageRecord]) -> list[ResolvedStage]:
        still = []
        for stage in pending:
            if self._ready(stage, records) is None:
                failed = [
                    d for d in stage.deps if records.get(d) and records[d].status != "done" and records[d].status != "skipped"
                ]
                records[stage.name] = StageRecord(
                    stage.name,
                    stage.spec.uses,
                    "blocked",
                    self.fps[stage.name],
                    error=f"upstream stage failed: {', '.join(failed)}",
                )
                self.on_event("blocked", records[stage.name], records[stage.name].error or "")
            else:
                still.append(stage)
        return still

    def _run_in_process(self, to_run: list[ResolvedStage], records: dict[str, StageRecord]) -> None:
        import os

        pending = list(to_run)
        while pending:
            pending = self._block_dependents(pending, records)
            ready = [s for s in pending if self._ready(s, records)]
            if not ready:
                break
            stage = ready[0]
            pending.remove(stage)
            self._started_stage(stage.name)
            outcome = execute_stage(self.task_for(stage, stage.spec.resources.num_cpus or os.cpu_count() or 1))
            self._finish(stage, outcome, records)

    def _run_with_ray(self, to_run: list[ResolvedStage], records: dict[str, StageRecord]) -> dict[str, Any]:
        from . import cluster

        info = cluster.connect(self.address, self.pipeline.config.ray.num_cpus)
        import ray

        remote_execute = ray.remote(execute_stage)
        cap = cluster.max_cpus_per_node()
        pending = list(to_run)
        running: dict[Any, ResolvedStage] = {}
        try:
            while pending or running:
                pending = self._block_dependents(pending, records)
                for stage in [s for s in pending if self._ready(s, records)]:
                    pending.remove(stage)
                    num_cpus = min(stage.num_cpus, cap) if math.isfinite(stage.num_cpus) else cap
                    task_cpus, task_gpus = num_cpus, _stage_gpus(stage)
                    workers = _train_workers(stage)
                    if workers > 1:  # the task only coordinates Ray Train workers, which hold the resources
                        num_cpus = min(stage.spec.resources.num_cpus or max(1.0, cap // workers), cap)
                        task_cpus, task_gpus = 0, 0
                    task = self.task_for(stage, num_cpus)
                    ref = remote_execute.options(
                        name=f"stage:{stage.name}",
                        num_cpus=task_cpus,
                        num_gpus=task_gpus,
                        max_retries=0,
                    ).remote(task)
                    running[ref] = stage
                    self._started_stage(stage.name)
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1)
                stage = running.pop(done[0])
                try:
                    outcome = ray.get(done[0])
                except Exception as exc:  # the worker died (OOM kill, segfault): not a Python error
                    outcome = StageOutcome(stage.name, "failed", error=f"{type(exc).__name__}: {exc}")
                self._finish(stage, outcome, records)
        except KeyboardInterrupt:
            for ref, stage in running.items():
                ray.cancel(ref, force=True)
                records[stage.name] = StageRecord(
                    stage.name, stage.spec.uses, "interrupted", self.fps[stage.name], error="interrupted; rerun to resume"
                )
            raise
        finally:
            if info.get("local"):
                cluster.shutdown()
        return info

    def _save_pipeline(self) -> None:
        atomic_write_json(
            self.run.root / "pipeline.json",
            {
                "source": str(self.pipeline.source) if self.pipeline.source else None,
                "config": self.pipeline.config.model_dump(mode="json", by_alias=True),
                "order": [s.name for s in self.pipeline.stages],
                "fingerprints": self.fps,
            },
        )
