"""``benchmarks/gpu.sh``: its summary (JSON + markdown) from a run's files, its arguments, and
(slow) the whole ``--cpu-dry-run``."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
SUMMARY = runpy.run_path(str(ROOT / "benchmarks" / "_gpu_summary.py"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.models.test_devices" name="test_a[cuda]"/>
<testcase classname="tests.models.test_devices" name="test_b[cuda]">
<failure message="x"/></testcase>
<testcase classname="tests.models.test_devices" name="test_c[cuda]"><skipped/></testcase>
<testcase classname="tests.models.test_devices" name="test_d[cuda]"/>
</testsuite></testsuites>
"""


def test_summary_collects_steps_tests_and_benchmarks(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "setup\t0\t1500\t100\ntests\t1\t2500\t140\nhope\t124\t45000\t45\n"
    )
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "train.json").write_text(json.dumps({"rows": [{"label": "hope"}]}))
    (tmp_path / "train.md").write_text("| model |\n|---|\n| hope |\n")
    (tmp_path / "memory.log").write_text(
        "gla: ...\n| a | b |\n|---|---|\n| 1 | 2 |\n| c |\n|---|\n| 3 |\n"
    )
    (tmp_path / "hope.log").write_text("line 1\nKilled by timeout\n")
    assert SUMMARY["main"]([str(tmp_path), "gpu", "cuda"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["exit"] for s in summary["steps"]] == [0, 1, 124]
    assert summary["total_seconds"] == 49.0
    tests = summary["tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (2, 1, 1)
    assert tests["failed"] == ["tests.models.test_devices::test_b[cuda]"]
    assert summary["train"] == {"rows": [{"label": "hope"}]}
    assert "missing" in summary["memory"] and "missing" in summary["hope"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "2 passed, 1 failed, 1 skipped of 4" in markdown
    assert "- FAILED tests.models.test_devices::test_b[cuda]" in markdown
    # Two tables printed by one benchmark stay two tables; a failed step shows its log's tail.
    assert "| 1 | 2 |\n\n| c |\n|---|" in markdown
    assert "## hope failed (exit 124)" in markdown and "Killed by timeout" in markdown


def test_summary_of_an_empty_folder_says_what_is_missing(tmp_path):
    assert SUMMARY["main"]([str(tmp_path), "cpu-dry-run", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == [] and "missing" in summary["tests"]
    assert "no results" in (tmp_path / "summary.md").read_text()


def test_unknown_argument_is_refused():
    run = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown argument '--gpu'" in run.stderr
    run = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--cpu-dry-run" in run.stdout


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    # 3.5 to 5 minutes on the shared 2-core machine (load average 10-13).
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["setup", "tests", "train", "memory", "hope"]
    assert all(s["exit"] == 0 for s in summary["steps"])
    assert summary["tests"]["tests"] > 0  # collected (and skipped: no CUDA here)
    assert {r["label"] for r in summary["train"]["rows"]} == {"transformer", "hope-small"}
    assert summary["memory"]["device"] == summary["hope"]["device"] == "cpu"
    assert "## nestlearn bench train" in (out / "summary.md").read_text()
