"""Reading and writing row data: HF datasets on disk, JSONL, JSON, CSV/TSV.

Bad input is reported with file, line and field; outputs are written to a temporary
folder and renamed when complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError


def load_rows(path: Path, required: Iterable[str] = (), what: str = "records") -> list[dict[str, Any]]:
    """Rows from a dataset folder or a .jsonl/.json/.csv/.tsv file; checks required fields."""
    path = Path(path)
    required = list(required)
    if not path.exists():
        raise DataError(f"{path}: not found ({what})")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            rows = load_from_disk(str(path)).to_list()
        except Exception as exc:
            raise DataError(f"{path}: not a saved dataset ({exc})") from None
        _check_fields(path, rows, required, first_line=None)
        return rows
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                for field in required:
                    if field not in row:
                        raise DataError(f"{path}:{lineno}: field '{field}' is missing (required for {what})")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        _check_fields(path, data, required, first_line=None)
        return data
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        _check_fields(path, rows, required, first_line=2)
        return rows
    raise DataError(f"{path}: unsupported format '{suffix}' (use a dataset folder, .jsonl, .json, .csv or .tsv)")


def _check_fields(path: Path, rows: list, required: list[str], first_line: int | None) -> None:
    for i, row in enumerate(rows):
        where = f"{path}:{first_line + i}" if first_line else f"{path} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        for field in required:
            if field not in row or row[field] is None:
                raise DataError(f"{where}: field '{field}' is missing")


def save_rows(rows: list[dict[str, Any]], path: Path, empty_like: dict[str, Any] | None = None) -> None:
    """Save as an HF dataset folder, atomically (temp folder + rename).

    An empty result keeps the columns of `empty_like` (one example row); without one it has
    a single `id` column.
    """
    from datasets import Dataset

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        Dataset.from_list(rows).save_to_disk(str(tmp))
    else:  # an empty dataset needs a schema and a single shard to load back
        empty = Dataset.from_list([empty_like or {"id": ""}]).select([]).flatten_indices()
        empty.save_to_disk(str(tmp), num_shards=1)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
