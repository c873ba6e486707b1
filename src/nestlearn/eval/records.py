"""JSON Lines data files of the evaluations: one object per line, every field checked.

A wrong file is reported by line and field (``samples.jsonl line 3: field 'answer' must be a
string, got 7``), never by a traceback from deep inside an evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nestlearn.errors import DataError
from nestlearn.utils.io import atomic_write_text

# field -> (accepted Python types, required)
Schema = Mapping[str, tuple[tuple[type, ...], bool]]


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "a bool"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_record(where: str, record: Any, schema: Schema) -> dict[str, Any]:
    """The record if it is an object whose fields match ``schema``; DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, (types, required) in schema.items():
        if name not in record:
            if required:
                needed = ", ".join(k for k, (_, req) in schema.items() if req)
                raise DataError(f"{where}: field '{name}' is missing (required: {needed})")
            continue
        value = record[name]
        # bool is an int in Python; JSON true is never a valid number here.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise DataError(
                f"{where}: field '{name}' must be {_type_name(types)}, got {json.dumps(value)}"
            )
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise DataError(f"{where}: unknown field '{unknown[0]}'; fields: {', '.join(schema)}")
    return record


def read_jsonl(path: Path, schema: Schema) -> list[dict[str, Any]]:
    """Every non-blank line of ``path`` as a checked object."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {path} cannot be read as UTF-8 text ({exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not JSON ({exc.msg}); write one JSON object per line"
            ) from None
        records.append(check_record(where, record, schema))
    if not records:
        raise DataError(f"data file {path} holds no records: write one JSON object per line")
    return records


def write_jsonl(path: Path, records: list[Mapping[str, Any]]) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))
