"""`heedful trace COMPLETION_ID`: the adapter version that wrote a reply, the run that trained
it, and the feedback records (ids, kinds, when) that shaped it.

Why it works without a registry: a version id is content-addressed (`adp-` + SHA-256 of the
adapter's config and weights, `serving.versions.adapter_version_id`), so the folder that
produced a completion is found again by hashing the adapter folders under the runs and
exports folders. An export carries its lineage in `heedful.json` (`pipeline.export`); a run's
adapter that was deployed directly gets its lineage from the run's manifests
(`pipeline.lineage`). The server is asked only which version wrote the completion
(`GET /v1/admin/completions/{id}`); `--version adp-...` skips the server.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .artifacts import MANIFEST, read_json
from .errors import HeedfulError

VERSION_ID = re.compile(r"^adp-[0-9a-f]{12}$")
#: output kinds that are adapter folders a server can load
ADAPTER_KINDS = ("adapter", "export")
#: folders never searched: staging/trash (dot folders), trainer checkpoints, merged full models
SKIP_DIRS = {"checkpoints", "merged", "__pycache__", "node_modules"}

console = Console(highlight=False)


@dataclass
class Trace:
    """Where a version came from: the folder whose content hashes to it and that folder's lineage."""

    version: str
    folder: Path
    lineage: dict[str, Any]
    export: Path | None
    run_dir: Path | None
    also: list[Path] = field(default_factory=list)
    completion: dict[str, Any] | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.lineage.get("feedback_records") or [])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.lineage.get("feedback_record_counts") or {})

    def as_dict(self) -> dict[str, Any]:
        artifact = self.lineage.get("artifact") or {}
        return {
            "completion": self.completion,
            "version": self.version,
            "folder": str(self.folder),
            "export": str(self.export) if self.export else None,
            "run": self.lineage.get("run_name"),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "stage": artifact.get("stage"),
            "method": artifact.get("uses"),
            "also": [str(p) for p in self.also],
            "feedback_record_counts": self.counts,
            "feedback_sources": self.lineage.get("feedback_sources") or [],
            "feedback_records": self.records,
        }


def check_version_id(version: str) -> str:
    version = version.strip()
    if version != "base" and not VERSION_ID.match(version):
        raise HeedfulError(f"'{version}' is not an adapter version id (expected adp- and 12 hex digits, e.g. adp-0123456789ab)")
    return version


def adapter_folders(root: Path) -> Iterator[Path]:
    """Adapter folders under `root`: run stages' adapter/export outputs (read from their manifests),
    exports copied elsewhere (heedful.json) and bare PEFT folders; never staging or checkpoints."""
    root = Path(root)
    if (root / "adapter_config.json").is_file():
        yield root
        return
    for here, dirs, files in os.walk(root):
        folder = Path(here)
        if MANIFEST in files:
            dirs[:] = []
            yield from _manifest_adapters(folder)
        elif "adapter_config.json" in files:
            dirs[:] = []
            yield folder
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)


def _manifest_adapters(stage_dir: Path) -> Iterator[Path]:
    try:
        manifest = read_json(stage_dir / MANIFEST)
    except (OSError, ValueError):
        return
    for out in (manifest.get("outputs") or {}).values():
        path = stage_dir / str(out.get("path", ""))
        if out.get("kind") in ADAPTER_KINDS and (path / "adapter_config.json").is_file():
            yield path


def trace_version(version_id: str, search_dirs: Iterable[Path]) -> Trace:
    """The export or run adapter under `search_dirs` whose content hashes to `version_id`, with its lineage.

    An export (a folder with heedful.json) is preferred over the run's adapter it was copied
    from; every other folder with the same content is listed in `also`.
    """
    from serving.versions import adapter_version_id

    version_id = check_version_id(version_id)
    if version_id == "base":
        raise HeedfulError("version 'base' is the base model without an adapter: no feedback was trained into it")
    dirs = [Path(d).expanduser() for d in search_dirs]
    existing = [d for d in dirs if d.exists()]
    if not existing:
        raise HeedfulError("none of the folders to search exists: " + ", ".join(str(d) for d in dirs))
    seen: set[Path] = set()
    matches: list[Path] = []
    for root in existing:
        for folder in adapter_folders(root):
            folder = folder.resolve()
            if folder in seen:
                continue
            seen.add(folder)
            if adapter_version_id(folder) == version_id:
                matches.append(folder)
    if not matches:
        raise HeedfulError(
            f"version {version_id} matches none of the {len(seen)} adapter folder(s) under "
            + ", ".join(str(d) for d in existing)
            + " (its export or run is elsewhere: give --runs-dir / --exports-dir, or its adapter files changed since)"
        )
    matches.sort(key=lambda p: not (p / "heedful.json").is_file())  # exports first, stable otherwise
    folder = matches[0]
    lineage = folder_lineage(folder)
    export = folder if (folder / "heedful.json").is_file() else None
    return Trace(version_id, folder, lineage, export, _run_dir(folder, lineage), also=matches[1:])


def folder_lineage(folder: Path) -> dict[str, Any]:
    """An export's heedful.json (its feedback records computed if it predates them), else the
    lineage of a run's adapter from the run's manifests."""
    from .lineage import build_lineage, feedback_lineage

    if (folder / "heedful.json").is_file():
        try:
            lineage = read_json(folder / "heedful.json")
        except (OSError, ValueError) as exc:
            raise HeedfulError(f"{folder / 'heedful.json'}: unreadable ({exc})") from None
        if "feedback_records" not in lineage:
            source = Path(str((lineage.get("artifact") or {}).get("path") or ""))
            if source.is_dir():
                lineage.update(feedback_lineage(source))
        return lineage
    return build_lineage(folder)


def _run_dir(folder: Path, lineage: dict[str, Any]) -> Path | None:
    """The run folder: the one holding `folder` (runs/<run>/<stage>/<output>), else the one the
    export's adapter was trained in, if it is on this machine."""
    for candidate in (folder, Path(str((lineage.get("artifact") or {}).get("path") or ""))):
        stage_dir = candidate.parent
        if (stage_dir / MANIFEST).is_file() and (stage_dir.parent / "pipeline.json").is_file():
            return stage_dir.parent
    return None


# ----------------------------------------------------------------------------- the server


def fetch_completion(url: str, completion_id: str, token: str | None) -> dict[str, Any]:
    """`GET /v1/admin/completions/{id}` (serving.deploy_cli): which version wrote it; refusals are
    HeedfulErrors with the server's words (an unknown id is a 404 that says so)."""
    from serving.deploy_cli import completion

    data = completion(url, token, completion_id)
    if not isinstance(data, dict) or not data.get("version"):
        raise HeedfulError(f"{url}: the server names no version for completion {completion_id} ({str(data)[:200]})")
    return data


# ----------------------------------------------------------------------------- the command


def trace(
    completion_id: str | None = typer.Argument(None, help="a completion id the server returned (chatcmpl-...)"),
    server: str | None = typer.Option(None, "--server", help="the server that wrote it, e.g. http://127.0.0.1:8000"),
    token_file: Path | None = typer.Option(None, "--token-file", help="admin token file, mode 0600 (else $HEEDFUL_TOKEN)"),
    version: str | None = typer.Option(None, "--version", help="trace this version id (adp-...) instead; no server needed"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where runs are searched"),
    exports_dir: list[Path] = typer.Option([], "--exports-dir", help="more folders with exports (repeatable)"),
    limit: int = typer.Option(20, "--limit", "-n", help="feedback records shown"),
    show_all: bool = typer.Option(False, "--all", help="show every feedback record"),
    as_json: bool = typer.Option(False, "--json", help="print the whole trace as JSON"),
):
    """Completion -> adapter version -> export, run and stage -> the feedback records that shaped it."""
    if (completion_id is None) == (version is None):
        raise HeedfulError("give a completion id (with --server) or --version adp-..., not both")
    completion = None
    dirs = [runs_dir, *exports_dir]
    if completion_id is not None:
        if not server:
            raise HeedfulError("a completion id is looked up on the server that wrote it: give --server URL")
        from serving.deploy_cli import read_token

        completion = fetch_completion(server, completion_id, read_token(token_file))
        version = str(completion["version"])
        served = Path(str(completion.get("adapter") or ""))
        if completion.get("adapter") and served.is_dir():  # the server's own folder, when it is on this machine
            dirs.insert(0, served)
    assert version is not None
    if check_version_id(version) == "base":
        _print_base(completion, as_json)
        return
    found = trace_version(version, dirs)
    found.completion = completion
    if as_json:
        typer.echo(json.dumps(found.as_dict(), indent=2, default=str))
        return
    print_trace(found, None if show_all else limit)


def _print_base(completion: dict[str, Any] | None, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"completion": completion, "version": "base", "feedback_records": []}, indent=2))
    else:
        console.print("version [bold]base[/]: the base model without an adapter wrote it; no feedback was trained into it")


def print_trace(found: Trace, limit: int | None) -> None:
    from .lineage import record_time

    info = found.as_dict()
    table = Table(title="trace", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    if found.completion:
        c = found.completion
        when = record_time({"created": c.get("created")})
        table.add_row("completion", f"{c.get('id')} (conversation {c.get('conversation_id')}, {when})")
        table.add_row("served from", str(c.get("adapter") or "base model"))
    table.add_row("version", found.version)
    table.add_row("export", info["export"] or "none (a run's adapter, deployed directly)")
    table.add_row("run", f"{info['run']} ({info['run_dir'] or 'run folder not on this machine'})")
    table.add_row("stage", f"{info['stage']} ({info['method']})")
    for other in info["also"]:
        table.add_row("same files", other)
    console.print(table)

    counts = Table(title="feedback that shaped it", title_justify="left")
    for col in ("kind", "records", "from"):
        counts.add_column(col)
    for kind, n in found.counts.items():
        origins = sorted(
            {
                s.get("source_stage") or s.get("inherited_from") or Path(str(s.get("path"))).name
                for s in info["feedback_sources"]
                if (s.get("counts") or {}).get(kind)
            }
        )
        counts.add_row(kind, str(n), ", ".join(origins))
    if not found.counts:
        counts.add_row("none", "0", "no feedback records upstream of this adapter")
    console.print(counts)

    records = found.records
    if not records:
        return
    shown = records if limit is None else records[:limit]
    rows = Table(title=f"feedback records ({len(shown)} of {len(records)})", title_justify="left")
    for col in ("id", "kind", "created", "source stage"):
        rows.add_column(col, overflow="fold")
    for r in shown:
        rows.add_row(str(r.get("id")), str(r.get("kind")), str(r.get("created") or ""), str(r.get("source_stage") or "file"))
    console.print(rows)
    if len(shown) < len(records):
        console.print(f"{len(records) - len(shown)} more: --all shows every record, --json prints them all")
