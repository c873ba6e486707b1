"""Side-by-side timing for the benchmarks: the best of several runs, taken in turns."""

from __future__ import annotations

import time
from collections.abc import Callable

# ``wall``: elapsed time; ``cpu``: the process's CPU time, which on a machine shared with other
# jobs does not count the time spent waiting for a core (with one thread; with more it counts
# their spin-waits).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def best_in_turns(
    steps: dict[str, Callable[[], object]], repeats: int, clock: str = "wall"
) -> dict[str, float]:
    """Best time in seconds per entry of ``steps`` over ``repeats`` runs, after one warm-up call
    each. Entries are timed in turns (a, b, a, b, ...) so that a burst of load on a shared
    machine hits all of them alike rather than one."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}; choose one of {sorted(CLOCKS)}")
    now = CLOCKS[clock]
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            start = now()
            step()
            best[name] = min(best[name], now() - start)
    return best
