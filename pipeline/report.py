"""`runs/<run>/report.html`: the stage table and each stage's curves as plots.

Stages contribute by writing `curves.json` (one dict per logged step) and metrics, and a
stage kind adds its own section by overriding `Stage.report_section` (called for every
registered stage kind, in name order, with all of the run's manifests).

The report is rebuilt after every `heedful run` and `heedful arena`, also when every stage was
up to date, and drawing its plots was most of that: a rerun of the arena test's run (4 methods,
5 evaluations) spent 9.5 of its 10 s in matplotlib. A plot drawn through `cached_figure` is kept in
`runs/<run>/.report_figures/`, keyed by the data it shows (in order), heedful's source and
matplotlib's version, and reused while all are the same; the plots a build did not use are removed
after it.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import hashlib
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import RunDir, atomic_write_text, read_json

#: where a run's drawn plots are kept between builds of its report (not a stage name: those
#: cannot start with a dot)
FIGURE_CACHE = ".report_figures"
_cache_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("heedful_report_figures", default=None)
_used: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("heedful_report_figures_used", default=None)
#: the packages whose code draws a plot or decides what it shows (labels, which rows are plotted)
PLOTTING_PACKAGES = ("pipeline", "stages", "reward_models", "trainers", "feedback", "serving")

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ddd;padding:.35rem .6rem;text-align:left;font-size:.9rem}
th{background:#f4f4f4}.done{color:#137333}.skipped{color:#555}.failed,.blocked{color:#b3261e}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}code{background:#f4f4f4;padding:0 .2rem}
"""


def _stage_order(run: RunDir) -> list[str]:
    meta = run.root / "pipeline.json"
    if meta.is_file():
        return read_json(meta)["order"]
    return sorted(p.name for p in run.root.iterdir() if (p / "manifest.json").is_file())


def build_report(run_root: Path) -> Path:
    """Write `runs/<run>/report.html`; plots whose data did not change since the last build are reused."""
    folder = Path(run_root) / FIGURE_CACHE
    used: set[str] = set()
    tokens = (_cache_dir.set(folder), _used.set(used))
    try:
        out = _build_report(run_root)
    finally:
        _cache_dir.reset(tokens[0])
        _used.reset(tokens[1])
    _prune_figures(folder, used)
    return out


def _build_report(run_root: Path) -> Path:
    from . import registry

    run = RunDir(run_root)
    order = _stage_order(run)
    last = run.last_invocation() or {"stages": []}
    status = {s["name"]: s for s in last.get("stages", [])}
    manifests = {name: m for name in order if (m := run.manifest(name))}
    parts = [
        f"<!doctype html><meta charset=utf-8><title>heedful run {html.escape(run.root.name)}</title>",
        f"<style>{_CSS}</style><h1>Run <code>{html.escape(run.root.name)}</code></h1>",
    ]
    parts.append(
        "<h2>Stages</h2><table><tr><th>stage</th><th>uses</th><th>status</th><th>seconds</th>"
        "<th>fingerprint</th><th>metrics</th></tr>"
    )
    for name in order:
        manifest = manifests.get(name, {})
        st = status.get(name, {})
        state = st.get("status", "done" if manifest else "not run")
        seconds = manifest.get("timings", {}).get("seconds", st.get("seconds", ""))
        metrics = st.get("metrics") or manifest.get("metrics", {})
        shown = ", ".join(f"{k}={format_cell(v)}" for k, v in list(metrics.items())[:8])
        if st.get("error"):
            shown = html.escape(st["error"][:300])
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(manifest.get('uses', st.get('uses', '')))}</td>"
            f"<td class={state}>{state}</td><td>{format_cell(seconds)}</td>"
            f"<td><code>{manifest.get('fingerprint', st.get('fingerprint', ''))[:12]}</code></td><td>{shown}</td></tr>"
        )
    parts.append("</table>")
    for name in order:
        curves_path = run.stage_dir(name) / "curves.json"
        if curves_path.is_file():
            figure = plot_curves(json.loads(curves_path.read_text()), f"{name} ({manifests.get(name, {}).get('uses', '')})")
            if figure:
                parts.append(f"<h2>{html.escape(name)}: training curves</h2>{figure}")
    for name in registry.names():
        stage = registry.get(name)
        fragment = stage.report_section(run.root, manifests) if stage is not None else None
        if fragment:
            parts.append(fragment)
    out = run.root / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out


def curve_groups(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Group numeric series by prefix ('rewards/chosen' -> 'rewards'); needs 2+ points."""
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        for key, value in row.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith(("train_", "total_flos")):
                continue
            series.setdefault(key, []).append((step, float(value)))
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in series.items():
        if len(points) >= 2:
            groups.setdefault(key.split("/")[0], {})[key] = points
    return groups


def plot_curves(rows: list[dict[str, Any]], title: str) -> str:
    groups = curve_groups(rows)
    if not groups:
        return ""
    return cached_figure(curves_figure, groups, title)


def curves_figure(groups: dict[str, dict[str, list[tuple[float, float]]]], title: str):
    """Up to 6 panels, the loss first; one line per series of a group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups, key=lambda g: (g != "loss", g))[:6]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, group in zip(axes[0], names):
        for key, points in groups[group].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 30 else None)
        ax.set_title(group)
        ax.set_xlabel("step")
        if len(groups[group]) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cached_figure(draw: Callable[..., Any], *args: Any) -> str:
    """`figure_html(draw(*args))` ("" when `draw` returns None), reused from an earlier build of this
    run's report when `args` (everything the plot shows; dict order counts, as it does for the bars
    and lines drawn), `draw` itself, heedful's source and matplotlib's version are the same.
    Outside `build_report`, or when `args` are not plain JSON (an object's repr, a numpy array's
    shortened str: no key that stays the same yet tells two plots apart), it just draws."""
    folder, used = _cache_dir.get(), _used.get()
    blob = None
    if folder is not None and used is not None:
        name = f"{draw.__module__}.{draw.__qualname__}"
        try:
            blob = json.dumps([_source_digest(), _matplotlib_version(), name, args], separators=(",", ":"))
        except (TypeError, ValueError):
            pass
    if folder is None or used is None or blob is None:
        figure = draw(*args)
        return figure_html(figure) if figure is not None else ""
    digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
    used.add(digest)
    path = folder / f"{digest}.html"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    figure = draw(*args)
    out = figure_html(figure) if figure is not None else ""
    atomic_write_text(path, out)
    return out


def _prune_figures(folder: Path, used: set[str]) -> None:
    """Remove the plots a build did not use, and the half-written ones a crashed build left (an hour
    old: a report of the same run being built beside this one may be writing a newer one now)."""
    if not folder.is_dir():
        return
    for stale in folder.glob("*.html"):
        if stale.stem not in used:
            stale.unlink(missing_ok=True)
    for partial in folder.glob(".*.tmp"):
        try:
            if time.time() - partial.stat().st_mtime > 3600:
                partial.unlink(missing_ok=True)
        except OSError:
            continue


@functools.cache
def _source_digest() -> str:
    """One digest of every module of heedful's packages: a plot's look can depend on code in another
    file than its drawing function's (tick labels, which rows are plotted, `figure_html`'s dpi), so
    any edit or upgrade draws every plot again. Read once per process (about 200 files)."""
    from importlib.util import find_spec

    digest = hashlib.sha256()
    for package in PLOTTING_PACKAGES:
        spec = find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(folder).rglob("*.py")):
                if path.name.startswith("."):  # an editor's lock file (a dangling link), not a module
                    continue
                digest.update(f"{package}/{path.relative_to(folder)}".encode())
                try:
                    digest.update(path.read_bytes())
                except OSError:  # unreadable: a report is still written (that plot is keyed without it)
                    continue
    return digest.hexdigest()


@functools.cache
def _matplotlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matplotlib")
    except PackageNotFoundError:
        return ""


def figure_html(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def format_cell(value: Any) -> str:
    """A value as an HTML table cell: floats to 4 significant digits, the rest escaped."""
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
