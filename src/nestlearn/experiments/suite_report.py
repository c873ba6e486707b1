"""``DIR/suite.json`` and ``DIR/report.md`` of ``nestlearn experiment suite``.

``suite.json`` holds every number: per experiment its ``result.json``'s ``args``, ``table``,
``figures`` (relative to DIR), ``summary`` (model -> metric -> mean, std, values over seeds),
``per_seed`` (model -> seed -> metric -> value, from the summary's values in seed order) and
``results`` (every seed's full records); and per part its status, exit code, wall time and,
when it failed, the tail of its stderr. ``report.md`` shows, per experiment, its own table, the
headline numbers as mean ± std over seeds, and its figures; then the machine, the command, the
commit and the time of every part.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nestlearn import __version__
from nestlearn.eval.results import RESULT_FILE
from nestlearn.experiments.seeds import format_spread
from nestlearn.train.report import markdown_table

SUITE_JSON = "suite.json"
REPORT_MD = "report.md"
MAX_COLUMNS = 8  # more metrics than this: one row per metric, one column per model


def cpu_model() -> str:
    """The CPU's name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(jobs: int, threads: int) -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jobs": jobs,
        "threads_per_job": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> str | None:
    """``HEAD`` of the checkout nestlearn runs from, ``+ uncommitted changes`` if any; None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" + uncommitted changes" if dirty else "")


def per_seed(summary: Mapping[str, Any], seeds: Sequence[Any] | None) -> dict[str, Any]:
    """``model -> seed -> metric -> value`` from a summary's per-seed ``values`` (in the order of
    ``seeds``); empty where the lengths do not match."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model, metrics in summary.items():
        if not isinstance(metrics, Mapping):
            continue
        for metric, stat in metrics.items():
            values = stat.get("values") if isinstance(stat, Mapping) else None
            if not isinstance(values, list) or not seeds or len(values) != len(seeds):
                continue
            for seed, value in zip(seeds, values, strict=True):
                table.setdefault(model, {}).setdefault(str(seed), {})[metric] = value
    return table


def read_experiment(out: Path, name: str) -> dict[str, Any] | None:
    """``DIR/NAME/result.json`` as the suite shows it (figures relative to DIR), or None."""
    path = Path(out) / name / RESULT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    args = record.get("args") if isinstance(record.get("args"), dict) else {}
    summary = record.get("summary") if isinstance(record.get("summary"), dict) else {}
    figures = [f"{name}/{f}" for f in record.get("figures") or [] if isinstance(f, str)]
    return {
        "created": record.get("created"),
        "args": args,
        "table": record.get("table"),
        "figures": figures,
        "summary": summary,
        "per_seed": per_seed(summary, args.get("seeds")),
        "results": record.get("results"),
    }


def experiment_status(name: str, parts: Mapping[str, Any]) -> str:
    """``done``, ``partial`` (assembled without the units that failed), or the status of its
    assembling run (``failed``, ``interrupted``, ``skipped``; ``not run``)."""
    status = (parts.get(name) or {}).get("status", "not run")
    units = [p for k, p in parts.items() if k.startswith(f"{name}/")]
    if status == "done" and any(p.get("status") != "done" for p in units):
        return "partial"
    return status


def suite_record(
    out: Path,
    names: Sequence[str],
    state: Mapping[str, Any],
    header: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything of ``suite.json``: ``header`` (command, machine, ...), the parts' state and
    every experiment's numbers."""
    parts = state.get("parts", {})
    experiments = {}
    for name in names:
        entry: dict[str, Any] = {"status": experiment_status(name, parts)}
        found = read_experiment(out, name)
        if found is not None:
            mine = [p for k, p in parts.items() if k == name or k.startswith(f"{name}/")]
            args = (parts.get(name) or {}).get("args")
            entry["command"] = shlex.join(["nestlearn", "experiment", *args]) if args else None
            entry["seconds"] = round(sum(p.get("seconds") or 0 for p in mine), 1)
            entry.update(found)
        experiments[name] = entry
    return {
        **header,
        "nestlearn": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": state.get("parts", {}),
        "sessions": state.get("sessions", []),
        "experiments": experiments,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def summary_table(summary: Mapping[str, Any]) -> str:
    """Models × metrics as ``mean ± std`` (metrics × models when there are many metrics)."""
    models = [m for m, v in summary.items() if isinstance(v, Mapping)]
    metrics: list[str] = []
    for model in models:
        metrics += [k for k in summary[model] if k not in metrics]
    if not models or not metrics:
        return ""

    def cell(model: str, metric: str) -> str:
        return format_spread(summary[model].get(metric), digits=4)

    if len(metrics) <= MAX_COLUMNS:
        rows = [[m, *(cell(m, k) for k in metrics)] for m in models]
        return markdown_table(["model", *metrics], rows)
    rows = [[k, *(cell(m, k) for m in models)] for k in metrics]
    return markdown_table(["metric", *models], rows)


def _experiment_section(name: str, entry: Mapping[str, Any]) -> str:
    parts = [f"## {name}\n"]
    if "args" not in entry:
        parts.append(f"No result ({entry.get('status', 'not run')}).\n")
        return "\n".join(parts)
    if entry.get("command"):
        parts.append(f"`{entry['command']}` ({entry['status']}; its processes took "
                     f"{_duration(entry.get('seconds'))})\n")  # fmt: skip
    table = entry.get("table")
    if isinstance(table, Mapping) and table.get("headers"):
        rows = [["—" if v is None else v for v in row] for row in table.get("rows", [])]
        parts.append(markdown_table(list(table["headers"]), rows))
    over_seeds = summary_table(entry.get("summary") or {})
    if over_seeds:
        seeds = entry["args"].get("seeds")
        label = f"seeds {', '.join(map(str, seeds))}" if seeds else "seeds"
        parts.append(f"Mean ± sample std over {label}:\n\n{over_seeds}")
    parts += [f"![{Path(f).stem}]({f})\n" for f in entry.get("figures", [])]
    return "\n".join(parts)


def _parts_table(parts: Mapping[str, Any]) -> str:
    rows = []
    for key, part in sorted(parts.items()):
        rc = part.get("returncode")
        rows.append([key, part.get("status", "?"), _duration(part.get("seconds")),
                     "—" if rc is None else rc])  # fmt: skip
    return markdown_table(["part", "status", "wall time", "exit"], rows)


def render_report(record: Mapping[str, Any]) -> str:
    """``report.md`` of a :func:`suite_record`."""
    machine = record.get("machine", {})
    sessions = record.get("sessions", [])
    lines = [
        f"# nestlearn experiment suite ({record.get('preset', '?')})\n",
        f"- command: `{record.get('command', '')}`",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('platform')}"
        f"; Python {machine.get('python')}, torch {machine.get('torch')}; "
        f"{machine.get('jobs')} jobs side by side, {machine.get('threads_per_job')} thread(s) each"
        f"; load average at start {machine.get('load_average')}",
        f"- nestlearn {record.get('nestlearn')}, commit {record.get('commit') or 'unknown'}",
        f"- wall time: {_duration(record.get('wall_seconds'))} this run, "
        f"{_duration(sum(s.get('seconds', 0) for s in sessions))} over {len(sessions)} run(s); "
        f"the parts took {_duration(sum(p.get('seconds') or 0 for p in record['parts'].values()))}"
        " in all (one thread each)",
        f"- written {record.get('written')}\n",
    ]
    text = "\n".join(lines) + "\n"
    for name, entry in record.get("experiments", {}).items():
        text += _experiment_section(name, entry) + "\n"
    text += "## Parts\n\n" + _parts_table(record.get("parts", {})) + "\n"
    failed = {k: p for k, p in record.get("parts", {}).items() if p.get("status") == "failed"}
    for key, part in sorted(failed.items()):
        text += f"### {key} failed (exit {part.get('returncode')})\n\n"
        text += f"`nestlearn experiment {' '.join(part.get('args', []))}`\n\n"
        text += "```\n" + (part.get("stderr_tail") or "(no stderr)") + "\n```\n\n"
    return text
