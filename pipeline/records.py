"""Reading and writing row data: HF datasets on disk, JSONL, JSON, CSV/TSV.

Bad input is reported with file, line and field; outputs are written to a temporary
folder and renamed when complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError


def iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream `(where, row)` from a dataset folder or a .jsonl/.json/.csv/.tsv file.

    `where` is `file:line` (JSONL, CSV/TSV, JSON lists) or `folder row i` (datasets), so
    every message can point at the record. Rows are read one at a time (JSONL, CSV,
    datasets); a JSON file is read whole but decoded one element at a time.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a saved dataset ({exc})") from None
        i = 0
        for batch in dataset.iter(batch_size=1000):
            for values in zip(*batch.values()):
                yield f"{path} row {i}", dict(zip(batch, values))
                i += 1
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {_json_type(row)}")
                yield f"{path}:{lineno}", row
        return
    if suffix == ".json":
        yield from _iter_json(path)
        return
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        return
    raise DataError(f"{path}: unsupported format '{suffix}' (use a dataset folder, .jsonl, .json, .csv or .tsv)")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON list (or {"data": [...]}) decoded element by element, each with the line it starts on."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if text.startswith("{", pos):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(data.get("data"), list):
            raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        for i, row in enumerate(data["data"]):
            if not isinstance(row, dict):
                raise DataError(f"{path} row {i}: expected an object, got {_json_type(row)}")
            yield f"{path} row {i}", row
        return
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON list of objects")
    pos, line, counted = _skip_ws(text, pos + 1), 1, 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        if text.startswith("]", pos):
            return
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected an object, got {_json_type(row)}")
        yield f"{path}:{line}", row
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif not text.startswith("]", pos):
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{lineno}: invalid JSON: expected ',' or ']' after a list element")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def load_rows(
    path: Path, required: Iterable[str] = (), what: str = "records", kind: str | None = None, **field_names: str
) -> list[dict[str, Any]]:
    """Rows from a dataset folder or a .jsonl/.json/.csv/.tsv file; checks required fields.

    With `kind` (an artifact kind such as "preferences") every row is validated against
    that kind's schema (pipeline/record_schemas.py) and an empty file is an error, with the
    same file:line:field messages as `heedful validate`.
    """
    return [row for _, row in load_located_rows(path, required, what, kind, **field_names)]


def load_located_rows(
    path: Path, required: Iterable[str] = (), what: str = "records", kind: str | None = None, **field_names: str
) -> list[tuple[str, dict[str, Any]]]:
    """`load_rows` with each row's place (`file:line`, `folder row i`, as `iter_rows` names it),
    for a stage that checks rows itself and must say which one is wrong."""
    path = Path(path)
    required = list(required)
    if not path.exists():
        raise DataError(f"{path}: not found ({what})")
    if kind is not None:
        from .record_schemas import validated_rows

        stream = validated_rows(path, [kind], **field_names)
    else:
        stream = iter_rows(path)
    rows = []
    for where, row in stream:
        for field in required:
            if field not in row or row[field] is None:
                raise DataError(f"{where}: field '{field}' is missing (required for {what})")
        rows.append((where, row))
    return rows


def save_rows(rows: list[dict[str, Any]], path: Path, empty_like: dict[str, Any] | None = None) -> None:
    """Save as an HF dataset folder, atomically (temp folder + rename).

    The columns are every row's keys, in first-seen order; a row without one gets None
    there (what Arrow stores for a missing value). `Dataset.from_list` would take the first
    row's keys only and silently drop a column that row lacks (e.g. `persona` or `keywords`
    set on some needs only). A column whose values Arrow cannot hold together (text in one
    row, a list in another) is a DataError naming the column, not a pyarrow traceback.

    An empty result keeps the columns of `empty_like` (one example row); without one it has
    a single `id` column.
    """
    import pyarrow as pa  # type: ignore[import-untyped]  # datasets' own storage
    from datasets import Dataset

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
        try:
            dataset = Dataset.from_dict(columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(_mixed_column(path, columns, exc)) from None
        dataset.save_to_disk(str(tmp))
    else:  # an empty dataset needs a schema and a single shard to load back
        empty = Dataset.from_list([empty_like or {"id": ""}]).select([]).flatten_indices()
        empty.save_to_disk(str(tmp), num_shards=1)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _mixed_column(path: Path, columns: dict[str, list[Any]], exc: Exception) -> str:
    """Which column Arrow refused (tried one at a time: the error path only) and, when the
    values' JSON types differ, the first row whose type is not the first value's."""
    import pyarrow as pa
    from datasets import Dataset

    for key, values in columns.items():
        try:
            Dataset.from_dict({key: values})
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            typed = ((i, _json_type(v)) for i, v in enumerate(values) if v is not None)
            first = next(typed)
            other = next((t for t in typed if t[1] != first[1]), None)
            detail = f": row {first[0]} has {first[1]}, row {other[0]} has {other[1]}" if other else f" ({exc})"
            return f"{path}: cannot save column '{key}': its values mix types a dataset column cannot hold{detail}"
    return f"{path}: cannot save the rows as a dataset: {exc}"


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
