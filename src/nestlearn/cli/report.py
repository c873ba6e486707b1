"""``nestlearn report RUN_DIRS... [--out FILE]``: one markdown table per experiment, with figures.

Every ``result.json`` in or below the given folders (written by ``nestlearn experiment NAME``)
is read and grouped by its ``experiment`` field. Results that carry a ``table`` (``headers`` and
``rows``) are merged into one table per experiment with a leading ``run`` column (results whose
headers differ get a table each); other results contribute their ``table.md``/``results.md``,
or else their top-level numbers as one row. The figures of each run (its ``figures`` list, or
the PNG files beside it) are linked below the tables, relative to the output file. Without
``--out`` the report is printed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from nestlearn.errors import DataError
from nestlearn.train.report import markdown_table
from nestlearn.utils.io import atomic_write_text

RESULT_FILE = "result.json"
TABLE_FILES = ("results.md", "table.md")


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name, help="gather experiment results into markdown tables", description=__doc__
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="experiment output folders")
    parser.add_argument("--out", metavar="FILE", help="write the report here (default: print it)")


def find_results(run_dirs: list[str]) -> list[tuple[str, Path]]:
    """``(run, path)`` of every ``result.json`` in or below ``run_dirs``, each once, in order;
    ``run`` names the result's folder by the given folder's name and the path below it."""
    found: dict[Path, str] = {}
    for name in run_dirs:
        folder = Path(name)
        if folder.is_file() and folder.name == RESULT_FILE:
            found.setdefault(folder.resolve(), folder.parent.resolve().name)
            continue
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder: give experiment output folders (--out DIR)")
        hits = sorted(folder.rglob(RESULT_FILE))
        if not hits:
            raise DataError(
                f"no {RESULT_FILE} in or below {folder}: run an experiment there first "
                "(nestlearn experiment NAME --out DIR)"
            )
        top = folder.resolve()
        for hit in hits:
            below = hit.resolve().parent.relative_to(top).as_posix()
            found.setdefault(hit.resolve(), top.name + ("" if below == "." else f"/{below}"))
    return [(run, path) for path, run in found.items()]


def read_result(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not JSON (line {exc.lineno}: {exc.msg}); rerun it") from None
    if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
        raise DataError(f"{path}: field 'experiment' (the experiment's name) is missing")
    table = record.get("table")
    if table is not None and not (
        isinstance(table, dict)
        and isinstance(table.get("headers"), list)
        and isinstance(table.get("rows"), list)
        and all(isinstance(r, list) and len(r) == len(table["headers"]) for r in table["rows"])
    ):
        raise DataError(f"{path}: field 'table' needs 'headers' and 'rows' of the same width")
    return record


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    """Top-level numbers and strings (and those of a ``metrics`` mapping) as one row."""
    skip = {"experiment", "nestlearn", "created", "figures"}
    row = {k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float, str))}
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    return row


def _figures(path: Path, record: dict[str, Any]) -> list[Path]:
    listed = record.get("figures")
    if isinstance(listed, list):
        return [path.parent / f for f in listed if isinstance(f, str)]
    return sorted(path.parent.glob("*.png"))


def _section(experiment: str, entries: list[tuple[str, Path, dict]], base: Path) -> str:
    parts = [f"## {experiment}\n"]
    tables: dict[tuple[str, ...], list[list[Any]]] = {}
    for run, _, record in entries:
        if "table" in record:
            headers = tuple(record["table"]["headers"])
            tables.setdefault(headers, []).extend([run, *r] for r in record["table"]["rows"])
    for headers, rows in tables.items():
        shown = [["—" if v is None else v for v in row] for row in rows]
        parts.append(markdown_table(["run", *headers], shown))
    plain = [(run, path, record) for run, path, record in entries if "table" not in record]
    for run, path, record in plain:
        table_file = next(
            (path.parent / f for f in TABLE_FILES if (path.parent / f).is_file()), None
        )
        if table_file is not None:
            text = table_file.read_text(encoding="utf-8").strip()
            # Demote the file's own headings below this section's.
            text = "\n".join(
                "##" + line if line.startswith("#") else line for line in text.split("\n")
            )
            parts.append(f"### {run}\n\n{text}\n")
        else:
            row = _scalars(record)
            parts.append(f"### {run}\n\n" + markdown_table(list(row), [list(row.values())]))
    for run, path, record in entries:
        for figure in _figures(path, record):
            if figure.is_file():
                link = Path(os.path.relpath(figure, base)).as_posix()
                parts.append(f"![{run} · {figure.stem}]({link})\n")
    return "\n".join(parts)


def build_report(run_dirs: list[str], out: Path | None = None) -> str:
    """The markdown report of every result under ``run_dirs`` (links relative to ``out``)."""
    base = (out.parent if out else Path.cwd()).resolve()
    groups: dict[str, list[tuple[str, Path, dict]]] = {}
    for run, path in find_results(run_dirs):
        record = read_result(path)
        groups.setdefault(record["experiment"], []).append((run, path, record))
    runs = sum(len(v) for v in groups.values())
    text = f"# Results\n\n{runs} run(s) of {len(groups)} experiment(s).\n\n"
    return text + "\n".join(_section(name, groups[name], base) for name in sorted(groups))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    text = build_report(args.run_dirs, out)
    if out is None:
        print(text, end="")
    else:
        atomic_write_text(out, text)
        print(f"wrote {out}")
    return 0
