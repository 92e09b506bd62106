"""Experiment tracking: the `report_to` setting and one writer per tracker (tensorboard, wandb, mlflow).

Why one module: training stages, the `evaluate` stage and the arena all report to the same
trackers, so a team sees heedful runs next to its other experiments. The setting (its type,
its validation, the "is the package installed" check) and the writers live here once;
callers only say what to log:

    log_curves       training curves, one dict of scalars per step (ppo replays its loop's)
    log_evaluation   an evaluate summary: every metric's value, n, lo, hi per condition as
                     scalars, and the summary as a table
    log_arena        the arena table (one row per condition/method/seed, metrics with their
                     intervals) and its Pareto plots as images

TensorBoard writes event files under the caller's folder (`runs/<run>/<stage>/tensorboard`,
the arena's under `runs/<run>/arena/tensorboard`), so `tensorboard --logdir runs/<run>` shows
curves and evaluations together; wandb and mlflow use their own environment (`WANDB_PROJECT`,
`MLFLOW_TRACKING_URI`) and name the run `<run>/<stage>`. Their packages are imported only when
chosen; a missing one fails before any work with the `pip install` to run (`installed`).
"""

from __future__ import annotations

import importlib.util
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BeforeValidator, Field

from .models import ModelUnavailable
from .stage import StageConfig

Tracker = Literal["none", "tensorboard", "wandb", "mlflow"]
#: the Python package each tracker needs (tensorboard: either writer works)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
#: `report_to`'s type: a tracker's name or a list of them
Trackers = Annotated[list[Tracker], BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


def report_to_field(where: str = "<stage>/tensorboard") -> Any:
    """The `report_to` field (default none); `where` names the tensorboard folder in its description."""
    return Field(
        default_factory=lambda: list[Tracker](["none"]),
        description=f"experiment trackers: none, tensorboard (logs under {where}), wandb, mlflow (a name or a list)",
    )


def installed(report_to: list[Tracker]) -> list[Tracker]:
    """The trackers chosen (`none` dropped), each checked to be installed: a clear error if not."""
    chosen: list[Tracker] = [t for t in report_to if t != "none"]
    for tracker in chosen:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[tracker]):
            package = TRACKER_PACKAGES[tracker][0]
            raise ModelUnavailable(f"report_to: {tracker} needs the '{package}' package: pip install {package}")
    return chosen


class TrackingSettings(StageConfig):
    """Where a stage also reports what it measured (how to run, not what: not in the fingerprint)."""

    report_to: Trackers = report_to_field()

    def trackers(self) -> list[Tracker]:
        """The configured trackers, each checked to be installed (a clear error if not)."""
        return installed(self.report_to)


# ----------------------------------------------------------------------------- writers


class Writer(Protocol):
    """What every tracker's writer does; `name`s are slash-separated tags (`evaluation/summary`)."""

    def scalars(self, values: dict[str, float], step: int = 0) -> None: ...
    def table(self, name: str, header: list[str], rows: list[list[Any]]) -> None: ...
    def figure(self, name: str, figure: Any) -> None: ...
    def close(self) -> None: ...


class TensorBoardWriter:
    """Event files in `log_dir`: scalars, a table as a markdown text, a figure as an image."""

    def __init__(self, log_dir: Path, run_name: str):
        try:  # tensorboardX (a core dependency) first: it does not load torch
            from tensorboardX import SummaryWriter
        except ImportError:
            from torch.utils.tensorboard import SummaryWriter
        # tensorboardX names a file by the second it opened (events.out.tfevents.<time>.<host>): a second
        # writer in the same folder within that second would replace the first one's file, losing its
        # points; a suffix of its own keeps each writer's file, and its nanoseconds keep the names in the
        # order the files were written (what readers that take the last file as the newest assume)
        suffix = f".{time.time_ns()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.writer = SummaryWriter(str(log_dir), filename_suffix=suffix)

    def scalars(self, values: dict[str, float], step: int = 0) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def table(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        self.writer.add_text(name, markdown_table(header, rows), 0)

    def figure(self, name: str, figure: Any) -> None:
        self.writer.add_figure(name, figure, 0, close=False)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A W&B run named `run_name`: scalars via log, a wandb.Table, a wandb.Image."""

    def __init__(self, log_dir: Path, run_name: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(name=run_name, reinit=True)

    def scalars(self, values: dict[str, float], step: int = 0) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self.wandb.Table(columns=header, data=rows)})

    def figure(self, name: str, figure: Any) -> None:
        self.run.log({name: self.wandb.Image(figure)})

    def close(self) -> None:
        self.run.finish()


class MlflowWriter:
    """An MLflow run named `run_name`: metrics, a table artifact `<name>.json`, a figure `<name>.png`."""

    def __init__(self, log_dir: Path, run_name: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)

    def scalars(self, values: dict[str, float], step: int = 0) -> None:
        self.mlflow.log_metrics(values, step=step)

    def table(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        columns = {h: [row[i] for row in rows] for i, h in enumerate(header)}
        if hasattr(self.mlflow, "log_table"):  # mlflow >= 2.3
            self.mlflow.log_table(data=columns, artifact_file=f"{name}.json")
        else:
            self.mlflow.log_dict(columns, f"{name}.json")

    def figure(self, name: str, figure: Any) -> None:
        self.mlflow.log_figure(figure, f"{name}.png")

    def close(self) -> None:
        self.mlflow.end_run()


WRITERS: dict[str, type] = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter, "mlflow": MlflowWriter}


@contextmanager
def writers(trackers: Sequence[str], log_dir: Path, run_name: str) -> Iterator[list[Writer]]:
    """One open writer per tracker (tensorboard into `log_dir`), closed when the block ends."""
    opened: list[Writer] = []
    try:
        for tracker in trackers:
            opened.append(WRITERS[tracker](Path(log_dir), run_name))
        yield opened
    finally:
        for writer in opened:
            writer.close()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (TensorBoard's text tab renders it); floats to 4 significant digits."""

    def cell(value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what is logged


def log_curves(trackers: Sequence[str], log_dir: Path, run_name: str, series: list[tuple[int, dict[str, float]]]) -> None:
    """Training curves: each (step, scalars) in order."""
    if not trackers:
        return
    with writers(trackers, log_dir, run_name) as out:
        for writer in out:
            for step, values in series:
                writer.scalars(values, step)


def log_evaluation(trackers: Sequence[str], log_dir: Path, run_name: str, summary: dict[str, Any]) -> None:
    """An evaluate summary: `<metric>/<condition>` and its `/lo`, `/hi`, `/n` as scalars (the
    manifest's metric names), `evaluation/summary`, one row per condition and metric, and
    `evaluation/rates`, the report's bars of every rate with its interval."""
    if not trackers:
        return
    import matplotlib.pyplot as plt

    from .evaluation.report import bars_plot
    from .evaluation.summary import flat_metrics, summary_table

    values = {k: float(v) for k, v in flat_metrics(summary).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    header, rows = summary_table(summary)
    figure = bars_plot(run_name, summary["conditions"])
    try:
        with writers(trackers, log_dir, run_name) as out:
            for writer in out:
                writer.scalars(values)
                writer.table("evaluation/summary", header, rows)
                if figure is not None:
                    writer.figure("evaluation/rates", figure)
    finally:
        if figure is not None:
            plt.close(figure)


def log_arena(trackers: Sequence[str], log_dir: Path, run_name: str, table: dict[str, Any]) -> None:
    """The arena table as `arena/table` (arena.csv's rows), the trained rows' pairs as
    `arena/head_to_head` (head_to_head.csv's) and each Pareto plot as an image, `arena/<y>_vs_<x>`
    (e.g. arena/adherence_vs_overgen_out)."""
    if not trackers:
        return
    import matplotlib.pyplot as plt

    from .arena_head_to_head import table_rows as pair_rows
    from .arena_report import pareto_figures
    from .arena_table import table_rows

    header, rows = table_rows(table)
    pair_header, pairs = pair_rows(table)
    figures = pareto_figures(table)
    try:
        with writers(trackers, log_dir, run_name) as out:
            for writer in out:
                writer.table("arena/table", header, rows)
                if pairs:
                    writer.table("arena/head_to_head", pair_header, pairs)
                for name, figure in figures:
                    writer.figure(f"arena/{name}", figure)
    finally:
        for _, figure in figures:
            plt.close(figure)
