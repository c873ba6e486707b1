"""Running the suite's parts: ``--jobs`` processes side by side, longest first, stoppable.

A *runner* runs one part's command and returns its :class:`Outcome`; the scheduler
(:func:`run_parts`) calls it from ``jobs`` worker threads. :class:`ProcessRunner` runs
``python -m nestlearn experiment ARGS`` with stdout and stderr in ``DIR/logs/`` and one torch
thread (``OMP_NUM_THREADS``); tests pass a function instead. On Ctrl-C the scheduler sets
``stop``: a running child gets SIGINT (it stops like a Ctrl-C at its terminal: finished units
are stored), then SIGKILL if it has not exited after :data:`GRACE_S` seconds or on a second
Ctrl-C; interrupted parts are reported as such and count as not done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from nestlearn.experiments.suite_plan import Part, assemble_args

GRACE_S = 30.0
TAIL_LINES = 30
EXPERIMENT_PREFIX = (sys.executable, "-m", "nestlearn", "experiment")


@dataclass(frozen=True)
class Outcome:
    """How a part ended: ``status`` is ``done`` (exit 0), ``failed``, ``interrupted`` or
    ``skipped`` (an assembling run whose units all failed)."""

    status: str
    seconds: float = 0.0
    returncode: int | None = None
    stderr_tail: str = ""
    args: tuple[str, ...] = ()


class Stop:
    """Stop requests from the scheduler to its runners: ``soft`` (SIGINT), then ``hard``."""

    def __init__(self) -> None:
        self.soft = threading.Event()
        self.hard = threading.Event()


Runner = Callable[[Part, Sequence[str], Stop], Outcome]


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class ProcessRunner:
    """Runs ``prefix + args`` with stdout/stderr in ``log_dir/KEY.out``/``.err``."""

    def __init__(
        self,
        log_dir: Path,
        threads: int = 1,
        prefix: Sequence[str] = EXPERIMENT_PREFIX,
        grace_s: float = GRACE_S,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.prefix = list(prefix)
        self.grace_s = grace_s

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[name] = str(self.threads)
        return env

    def __call__(self, part: Part, args: Sequence[str], stop: Stop) -> Outcome:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem = part.key.replace("/", ".")
        out_path, err_path = self.log_dir / f"{stem}.out", self.log_dir / f"{stem}.err"
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Its own session: a Ctrl-C at the terminal reaches the suite, which stops it.
            child = subprocess.Popen(
                [*self.prefix, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=self.env(), start_new_session=True,
            )  # fmt: skip
            rc = self._wait(child, stop)
        seconds = time.monotonic() - start
        text = err_path.read_text(encoding="utf-8", errors="replace")
        if stop.soft.is_set() and rc != 0:
            return Outcome("interrupted", seconds, rc, tail(text), tuple(args))
        return Outcome("done" if rc == 0 else "failed", seconds, rc, tail(text), tuple(args))

    def _wait(self, child: subprocess.Popen, stop: Stop) -> int:
        signalled_at = None
        while True:
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if stop.soft.is_set() and signalled_at is None:
                _signal_group(child, signal.SIGINT)
                signalled_at = time.monotonic()
            late = signalled_at is not None and time.monotonic() - signalled_at > self.grace_s
            if stop.hard.is_set() or late:
                _signal_group(child, signal.SIGKILL)
                return child.wait()


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    """Signal the child's process group (the child and whatever it started), if still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


Event = Callable[[str, Part, Outcome | None], None]


def run_parts(
    parts: Sequence[Part],
    runner: Runner,
    jobs: int,
    done: Mapping[str, Outcome],
    on_event: Event = lambda kind, part, outcome: None,
) -> dict[str, Outcome]:
    """Run ``parts`` not in ``done`` on ``jobs`` workers; return every part's outcome.

    Ready parts start longest first (their ``estimate_s``); an assembling run starts once its
    units have ended (before any unit still waiting: it is short and completes an experiment)
    with :func:`assemble_args`. ``on_event("start"|"end", part, outcome)`` is called from this
    thread after each change; on KeyboardInterrupt the running parts are stopped, their
    outcomes recorded as ``interrupted`` in the returned mapping's place, and the interrupt is
    raised again with ``.outcomes`` set on it."""
    outcomes: dict[str, Outcome] = dict(done)
    waiting = [p for p in parts if p.key not in done]
    running: dict[Future, Part] = {}
    stop = Stop()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="suite")
    try:
        while waiting or running:
            for part in _ready(waiting, outcomes, max(1, jobs) - len(running)):
                waiting.remove(part)
                args = part.args
                if part.assembles:
                    succeeded = [k for k in part.requires if outcomes[k].status == "done"]
                    args = assemble_args(part, succeeded)
                    if args is None:
                        outcomes[part.key] = Outcome("skipped", stderr_tail="every unit failed")
                        on_event("end", part, outcomes[part.key])
                        continue
                on_event("start", part, None)
                running[pool.submit(runner, part, args, stop)] = part
            if not running:
                if waiting and not _ready(waiting, outcomes, 1):  # requires a part not given
                    for part in waiting:
                        outcomes[part.key] = Outcome("skipped", stderr_tail="its units did not run")
                        on_event("end", part, outcomes[part.key])
                    waiting.clear()
                continue
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                part = running.pop(future)
                outcomes[part.key] = _result(future, part)
                on_event("end", part, outcomes[part.key])
    except KeyboardInterrupt as exc:
        stop.soft.set()
        _drain(running, outcomes, stop, on_event)
        exc.outcomes = outcomes  # type: ignore[attr-defined]
        raise
    except BaseException:  # the scheduler itself broke: leave no child running
        stop.soft.set()
        stop.hard.set()
        raise
    finally:
        pool.shutdown(wait=True)
    return outcomes


def _ready(waiting: list[Part], outcomes: Mapping[str, Outcome], free: int) -> list[Part]:
    ready = [p for p in waiting if all(k in outcomes for k in (*p.requires, *p.after))]
    ready.sort(key=lambda p: (not p.assembles, -p.estimate_s))
    return ready[: max(0, free)]


def _result(future: Future, part: Part) -> Outcome:
    try:
        return future.result()
    except Exception as exc:  # a runner that raised: the part failed, the suite goes on
        return Outcome("failed", stderr_tail=f"{type(exc).__name__}: {exc}", args=part.args)


def _drain(running: dict[Future, Part], outcomes: dict[str, Outcome], stop: Stop, on_event):
    """Wait for the stopped parts (a second Ctrl-C kills them at once)."""
    while running:
        try:
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            stop.hard.set()
            continue
        for future in finished:
            part = running.pop(future)
            outcome = _result(future, part)
            if outcome.status != "done":
                outcome = Outcome("interrupted", outcome.seconds, outcome.returncode,
                                  outcome.stderr_tail, outcome.args)  # fmt: skip
            outcomes[part.key] = outcome
            on_event("end", part, outcome)
