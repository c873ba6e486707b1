"""Summary of a ``benchmarks/gpu.sh`` run: ``OUT/summary.json`` and ``OUT/summary.md``.

    python benchmarks/_gpu_summary.py OUT MODE DEVICE

Reads ``OUT/steps.tsv`` (name, exit status, wall ms, limit s per step), ``OUT/tests.xml`` (the
GPU tests, JUnit), the benchmarks' JSON files (``train.json``, ``memory.json``, ``hope.json``)
and ``OUT/train.md``; a missing file is reported as missing, never fatal.
"""

from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

BENCHES = ("train", "memory", "hope")


def read_steps(out: Path) -> list[dict[str, Any]]:
    steps = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, ms, limit = line.split("\t")
        steps.append({"step": name, "exit": int(rc), "seconds": int(ms) / 1e3, "limit": int(limit)})
    return steps


def read_tests(out: Path) -> dict[str, Any]:
    """Counts from the JUnit file, and the failing tests' ids."""
    path = out / "tests.xml"
    if not path.is_file():
        return {"missing": str(path)}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
    }


def environment() -> dict[str, Any]:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import fla  # noqa: F401

        env["fla"] = "installed"
    except ImportError:
        env["fla"] = "not installed"
    return env


def log_tables(out: Path, name: str) -> str:
    """The markdown tables a benchmark printed (lines starting with ``|``), a blank line
    between two tables."""
    path = out / f"{name}.log"
    if not path.is_file():
        return ""
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            if lines and lines[-1] and line.startswith("|---"):
                # A separator row: the line before it is a new table's header.
                header = lines.pop()
                lines += ["", header] if lines else [header]
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out, mode, device = Path(argv[0]), argv[1], argv[2]
    steps = read_steps(out)
    summary: dict[str, Any] = {
        "mode": mode,
        "device": device,
        "environment": environment(),
        "steps": steps,
        "total_seconds": round(sum(s["seconds"] for s in steps), 1),
        "tests": read_tests(out),
    }
    for name in BENCHES:
        path = out / f"{name}.json"
        summary[name] = json.loads(path.read_text()) if path.is_file() else {"missing": str(path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"# benchmarks/gpu.sh ({mode}, device {device})", ""]
    lines += [f"- {key}: {value}" for key, value in summary["environment"].items()]
    lines += [f"- total: {summary['total_seconds']} s", "", "| step | exit | seconds | limit |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']:.1f} | {s['limit']} |" for s in steps]
    tests = summary["tests"]
    lines += ["", "## GPU tests", ""]
    if "missing" in tests:
        lines.append(f"no results ({tests['missing']})")
    else:
        lines.append(
            f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped of {tests['tests']}"
        )
        lines += [f"- FAILED {name}" for name in tests["failed"]]
    train_md = out / "train.md"
    lines += ["", "## nestlearn bench train", ""]
    lines.append(train_md.read_text().strip() if train_md.is_file() else "no results")
    for name in ("memory", "hope"):
        lines += ["", f"## nestlearn bench {name}", "", log_tables(out, name) or "no results"]
    failed = [s for s in steps if s["exit"] != 0]
    for s in failed:
        log = out / f"{s['step']}.log"
        tail = log.read_text().splitlines()[-15:] if log.is_file() else []
        lines += ["", f"## {s['step']} failed (exit {s['exit']})", "", "```", *tail, "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
