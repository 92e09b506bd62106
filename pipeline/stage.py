"""The contract between the spine and a stage.

A stage file defines one `Config` (pydantic, extra keys forbidden) and one `Stage`
subclass that declares typed inputs/outputs. Stages import heavy libraries inside
`run()` so that validating a pipeline stays fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base for every stage's `with:` block. Unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Input:
    """A named input. `kinds` lists the artifact kinds accepted from an upstream stage."""

    kinds: tuple[str, ...]
    required: bool = True
    doc: str = ""


@dataclass(frozen=True)
class Output:
    """A named output written under the stage folder, at `<stage>/<name>`."""

    kind: str
    doc: str = ""
    required: bool = True


@dataclass
class Resources:
    """What a stage asks Ray for. `num_cpus=None` means: the stage class default."""

    num_cpus: float | None = None
    num_gpus: float = 0.0


@dataclass
class StageContext:
    """Everything a running stage may touch. Outputs go to `output(name)` only."""

    name: str
    uses: str
    run_name: str
    run_dir: Path
    work_dir: Path
    model: str
    seed: int
    inputs: dict[str, Path]
    log: logging.Logger
    num_threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Path:
        """Path where output `name` must be written (inside the staging folder)."""
        return self.work_dir / name

    @property
    def checkpoint_dir(self) -> Path:
        """Survives an interrupted run (staging is kept while the fingerprint matches)."""
        path = self.work_dir / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input(self, name: str) -> Path | None:
        return self.inputs.get(name)

    def save_curves(self, rows: list[dict[str, Any]]) -> None:
        """Training curves (one dict per logged step); the run report plots them."""
        from .artifacts import atomic_write_json

        atomic_write_json(self.work_dir / "curves.json", rows)


class Stage:
    """Base class: subclasses set `uses`, `Config`, `inputs`, `outputs` and implement `run`."""

    uses: ClassVar[str] = ""
    #: part of the fingerprint: bump it when the stage's results change for an unchanged
    #: config, including when a config DEFAULT changes (only non-default fields are hashed;
    #: tests/test_fingerprint_defaults.py catches a default changed without a bump)
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    inputs: ClassVar[dict[str, Input]] = {}
    outputs: ClassVar[dict[str, Output]] = {}
    default_num_cpus: ClassVar[float] = 1.0
    #: config fields that do not change results (excluded from the fingerprint)
    non_semantic_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: StageConfig, ctx: StageContext):
        self.config = config
        self.ctx = ctx

    def run(self) -> dict[str, float] | None:
        """Do the work; write every declared output via `ctx.output(name)`; return metrics."""
        raise NotImplementedError

    @classmethod
    def report_section(cls, run_root: Path, manifests: dict[str, dict[str, Any]]) -> str | None:
        """This stage kind's part of `report.html` (HTML), or None. Called once per report with
        every stage's manifest (name -> manifest), whether or not the run used this kind."""
        return None
