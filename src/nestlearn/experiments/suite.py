"""The whole CPU-scale reproduction in one command (issue 15): every experiment, 3 seeds.

``nestlearn experiment suite [--preset cpu|paper] --out DIR [--only NAME ...] [--skip NAME ...]
[--jobs N] [--threads N] [--seeds N] [--device D] [--no-progress] [--dry-run]``.

Runs perplexity (language modelling at equal tokens), ablations (SPEC §7, Table 6), MQAR, NIAH,
continual and test-time learning, each as ``nestlearn experiment NAME --preset cpu --seeds 3
--threads 1 --no-progress --out DIR/NAME --models M`` in its own process per model (per variant
for the ablations), ``--jobs`` (2) side by side, longest first, then the full command once per
experiment, which finds every (model, seed) unit stored and writes the tables and figures
(:mod:`nestlearn.experiments.suite_plan`). Writes ``DIR/suite.json`` (every number: per
experiment, model and seed), ``DIR/report.md`` (every table as mean ± std over seeds and every
figure, the command, machine, commit and the wall time of each part), the children's output in
``DIR/logs/`` and its progress in ``DIR/suite_state.json``.

Resumable: a part is done once its process exited 0 with the same command; rerunning the suite
skips done parts (and each experiment reuses the units an interrupted part stored), so it can run
in pieces (``--only mqar niah``). A failing part is recorded with the tail of its stderr, the
others go on, and the suite exits 1. Ctrl-C stops the children (SIGINT, then SIGKILL) and keeps
the state of every part that ended. ``--preset paper`` is the GPU-scale protocol: each experiment
whole, one at a time, torch's default threads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nestlearn.errors import ConfigError
from nestlearn.eval.results import RESULT_FILE
from nestlearn.experiments.suite_plan import (
    SUITE_EXPERIMENTS,
    ExperimentSpec,
    Part,
    SuiteOptions,
    default_specs,
    plan_parts,
)
from nestlearn.experiments.suite_report import (
    REPORT_MD,
    SUITE_JSON,
    git_commit,
    machine_info,
    render_report,
    suite_record,
)
from nestlearn.experiments.suite_runner import Outcome, ProcessRunner, Runner, run_parts
from nestlearn.utils.io import atomic_write_text

STATE_FILE = "suite_state.json"
LOG_DIR = "logs"
PRESET_DEFAULTS = {"cpu": {"jobs": 2, "threads": 1}, "paper": {"jobs": 1, "threads": 0}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlearn experiment suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", default="cpu", choices=list(PRESET_DEFAULTS),
        help="cpu: the CPU-scale reproduction (about 150 CPU-minutes); paper: the GPU protocol",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/experiments/suite", help="output folder")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="leave these out")
    parser.add_argument("--jobs", type=int, help="processes side by side (cpu 2, paper 1)")
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (cpu 1, paper 0 = torch's default)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--device", help="passed to every experiment (default: theirs, auto)")
    parser.add_argument("--no-progress", action="store_true", help="no line per part")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the parts, their order and what is done"
    )
    return parser


def options_from_args(args: argparse.Namespace) -> SuiteOptions:
    """Check the suite's arguments and fill the preset's defaults."""
    for flag in ("only", "skip"):
        unknown = [n for n in getattr(args, flag) if n not in SUITE_EXPERIMENTS]
        if unknown:
            raise ConfigError(
                f"--{flag} {' '.join(unknown)}: not a part of the suite; "
                f"choose from {', '.join(SUITE_EXPERIMENTS)}"
            )
    defaults = PRESET_DEFAULTS[args.preset]
    jobs = defaults["jobs"] if args.jobs is None else args.jobs
    threads = defaults["threads"] if args.threads is None else args.threads
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: needs at least 1 process")
    if threads < 0:
        raise ConfigError(f"--threads {threads}: must be >= 0 (0 = torch's default)")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: needs at least 1 seed")
    return SuiteOptions(
        out=Path(args.out), preset=args.preset, seeds=args.seeds, jobs=jobs, threads=threads,
        device=args.device, only=tuple(args.only), skip=tuple(args.skip),
        no_progress=args.no_progress, split=args.preset != "paper",
    )  # fmt: skip


def options_command(options: SuiteOptions) -> str:
    """The command line that runs the suite with ``options``."""
    words = ["nestlearn", "experiment", "suite", "--preset", options.preset]
    words += ["--out", str(options.out), "--seeds", str(options.seeds)]
    words += ["--jobs", str(options.jobs), "--threads", str(options.threads)]
    for flag, values in (("--only", options.only), ("--skip", options.skip)):
        words += [flag, *values] if values else []
    words += ["--device", options.device] if options.device else []
    return shlex.join(words)


def load_state(out: Path) -> dict[str, Any]:
    """``DIR/suite_state.json`` (parts, measured seconds, sessions); empty if absent or torn."""
    try:
        state = json.loads((Path(out) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"parts": {}, "measured": {}, "sessions": []}
    if not isinstance(state, dict):
        state = {}
    for key, empty in (("parts", {}), ("measured", {}), ("sessions", [])):
        if not isinstance(state.get(key), type(empty)):
            state[key] = empty
    return state


def save_state(out: Path, state: Mapping[str, Any]) -> None:
    atomic_write_text(Path(out) / STATE_FILE, json.dumps(state, indent=1) + "\n")


def is_done(part: Part, entry: Mapping[str, Any] | None, out: Path) -> bool:
    """Whether ``part`` ran to exit 0 with the same command and its output is still there."""
    if not entry or entry.get("status") != "done" or tuple(entry.get("args", ())) != part.args:
        return False
    folder = Path(out) / part.experiment
    return folder.is_dir() if part.unit else (folder / RESULT_FILE).is_file()


def done_parts(parts: Sequence[Part], state: Mapping[str, Any], out: Path) -> dict[str, Outcome]:
    """The parts that need not run again; an assembling run only if none of its units must."""
    done = {}
    for part in parts:
        entry = state["parts"].get(part.key)
        if is_done(part, entry, out):
            done[part.key] = Outcome("done", entry.get("seconds", 0.0), 0, "", part.args)
    for part in parts:
        if part.assembles and any(k not in done for k in part.requires):
            done.pop(part.key, None)
    return done


class Progress:
    """One line per part started or ended, with the time since the suite started."""

    def __init__(self, total: int, quiet: bool, emit: Callable[[str], None] = print) -> None:
        self.start = time.monotonic()
        self.total = total
        self.ended = 0
        self.quiet = quiet
        self.emit = emit

    def line(self, text: str) -> None:
        if not self.quiet:
            s = int(time.monotonic() - self.start)
            self.emit(f"[{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}] {text}")

    def __call__(self, kind: str, part: Part, outcome: Outcome | None) -> None:
        if kind == "start":
            self.line(f"start  {part.key} (expected {part.estimate_s / 60:.1f} min)")
            return
        assert outcome is not None
        self.ended += 1
        took = f"{outcome.seconds / 60:.1f} min"
        text = f"{outcome.status:<6} {part.key} after {took} ({self.ended}/{self.total})"
        if outcome.status == "failed":
            last = (outcome.stderr_tail.strip().splitlines() or [""])[-1]
            text += f", exit {outcome.returncode}: {last}"
        self.line(text)


def record_outcome(state: dict[str, Any], part: Part, outcome: Outcome) -> None:
    """Store how ``part`` ended; a complete run (not the resume of an interrupted or failed one,
    which reuses stored units) also becomes the part's measured time."""
    before = state["parts"].get(part.key) or {}
    entry = {k: v for k, v in asdict(outcome).items() if k != "args"}
    entry["args"] = list(outcome.args or part.args)
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if outcome.status == "done" and before.get("status", "done") == "done":
        state["measured"][part.key] = round(outcome.seconds, 1)
    state["parts"][part.key] = entry


def run_suite(
    options: SuiteOptions,
    *,
    specs: Sequence[ExperimentSpec] | None = None,
    runner: Runner | None = None,
    command: str = "",
    dry_run: bool = False,
    emit: Callable[[str], None] = print,
) -> int:
    """Run the suite's parts not yet done, then write ``suite.json`` and ``report.md``.

    Returns 0 when every selected part is done, 1 when one failed (or an experiment could not be
    assembled); a KeyboardInterrupt stops the running parts, saves the state and is re-raised."""
    out = Path(options.out)
    command = command or options_command(options)
    specs = list(default_specs() if specs is None else specs)
    state = load_state(out)
    parts = plan_parts(specs, options, state["measured"])
    done = done_parts(parts, state, out)
    todo = [p for p in parts if p.key not in done]
    if dry_run:
        for part in parts:
            mark = "done" if part.key in done else f"~{part.estimate_s / 60:.1f} min"
            emit(f"{mark:>12s}  {part.key}: nestlearn experiment {shlex.join(part.args)}")
        return 0
    runner = runner or ProcessRunner(out / LOG_DIR, options.threads)
    progress = Progress(len(todo), options.no_progress, emit)
    progress.line(
        f"suite ({options.preset}): {len(todo)} part(s) to run, {len(done)} done earlier, "
        f"~{sum(p.estimate_s for p in todo) / 60 / options.jobs:.0f} min on {options.jobs} jobs"
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    clock = time.monotonic()
    ran = {p.key for p in todo}
    header = {
        "preset": options.preset,
        "command": command,
        "options": {**asdict(options), "out": str(out)},
        "machine": machine_info(options.jobs, options.threads),
        "commit": git_commit(),
    }
    state["preset"] = options.preset
    out.mkdir(parents=True, exist_ok=True)

    def on_event(kind: str, part: Part, outcome: Outcome | None) -> None:
        progress(kind, part, outcome)
        if outcome is not None:  # saved as each part ends: a killed suite loses no finished part
            record_outcome(state, part, outcome)
            save_state(out, state)

    try:
        outcomes = run_parts(parts, runner, options.jobs, done, on_event)
    except KeyboardInterrupt as exc:
        ended = getattr(exc, "outcomes", {})
        _session(state, started, clock, command, ran & set(ended), interrupted=True)
        save_state(out, state)
        progress.line("interrupted: finished parts are kept; rerun the command to resume")
        raise
    _session(state, started, clock, command, ran & set(outcomes))
    save_state(out, state)
    header["wall_seconds"] = round(time.monotonic() - clock, 1)
    record = suite_record(out, [s.name for s in specs], state, header)
    atomic_write_text(out / SUITE_JSON, json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / REPORT_MD, render_report(record))
    bad = sorted(k for k, o in outcomes.items() if o.status != "done")
    if not options.no_progress or bad:
        emit(f"wrote {out / REPORT_MD} and {out / SUITE_JSON}")
    if bad:
        emit(f"not done: {', '.join(bad)} (see {out / REPORT_MD}; rerun to retry them)")
        return 1
    return 0


def _session(state, started, clock, command, ran, interrupted=False) -> None:
    state["sessions"].append({
        "started": started, "seconds": round(time.monotonic() - clock, 1), "command": command,
        "parts_ended": len(ran), "interrupted": interrupted,
    })  # fmt: skip


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    command = shlex.join(["nestlearn", "experiment", "suite", *argv])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGINT and SIGTERM stop the children (also where SIGINT came in ignored, as it does
        # for a job started with '&' by a script: the children would inherit that).
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        return run_suite(options, command=command, dry_run=args.dry_run)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
