"""best_in_turns: every entry warmed up once, then timed in turns; a bad clock is named."""

from __future__ import annotations

import pytest

from nestlearn.utils.timing import CLOCKS, best_in_turns


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_each_entry_runs_once_to_warm_up_then_in_turns(clock):
    order: list[str] = []
    steps = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    best = best_in_turns(steps, repeats=3, clock=clock)
    assert order == ["a", "b"] * 4
    assert set(best) == {"a", "b"}
    assert all(0.0 <= t < float("inf") for t in best.values())


def test_unknown_clock_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"clock='gpu'.*\['cpu', 'wall'\]"):
        best_in_turns({"a": lambda: None}, repeats=1, clock="gpu")
