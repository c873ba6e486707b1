"""--seed / --seeds parsing and the statistics over seeds (experiments/seeds.py)."""

from __future__ import annotations

import argparse
import math

import pytest

from nestlearn.errors import ConfigError
from nestlearn.eval.figures import plot_bars, plot_curves
from nestlearn.experiments.model_source import add_run_args, apply_preset
from nestlearn.experiments.seeds import format_spread, resolve_seeds, spread


def _parse(argv: list[str], preset: dict | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_args(parser, "out")
    parser.add_argument("--preset", default="p")
    args = parser.parse_args(argv)
    if preset is not None:
        return apply_preset(args, {"p": preset})
    resolve_seeds(args)
    return args


@pytest.mark.parametrize(
    ("argv", "seeds"),
    [
        ([], [0]),
        (["--seed", "5"], [5]),
        (["--seed", "3", "1"], [3, 1]),
        (["--seeds", "3"], [0, 1, 2]),
    ],
)
def test_seed_flags_give_the_seed_list_and_the_first_seed(argv, seeds):
    args = _parse(argv)
    assert args.seeds == seeds
    assert args.seed == seeds[0]
    assert resolve_seeds(args) == seeds  # idempotent


def test_a_preset_seed_count_yields_to_explicit_seeds():
    assert _parse([], {"n_seeds": 3}).seeds == [0, 1, 2]
    assert _parse(["--seed", "7"], {"n_seeds": 3}).seeds == [7]
    assert _parse(["--seeds", "2"], {"n_seeds": 3}).seeds == [0, 1]


def test_seed_and_seeds_together_are_refused():
    with pytest.raises(SystemExit):
        _parse(["--seed", "1", "--seeds", "2"])


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--seed", "1", "1"], ["--seed", "-1"]])
def test_bad_seed_lists_name_the_problem(argv):
    with pytest.raises(ConfigError, match="seed"):
        _parse(argv)


def test_spread_is_mean_and_sample_std_over_finite_values():
    stat = spread([1.0, 2.0, 4.0, None, math.nan])
    assert stat["n"] == 3 and stat["missing"] == 2
    assert stat["mean"] == pytest.approx(7 / 3)
    assert stat["std"] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert spread([2.5])["std"] is None
    assert spread([None])["mean"] is None


def test_format_spread():
    assert format_spread(spread([1.0, 3.0]), digits=1) == "2.0 ± 1.4"
    assert format_spread(spread([0.5]), digits=1, scale=100) == "50.0"
    assert format_spread(spread([1.0, 3.0, None]), digits=0) == "2 ± 1 (1 failed)"
    assert format_spread(spread([]), digits=1) == "—"


def test_figures_draw_spreads(tmp_path):
    plot_curves(
        {"T = 8": {"a": ([1, 2], [0.5, 0.7]), "b": ([1, 2], [0.4, None])}},
        tmp_path / "c.png", xlabel="x", ylabel="y",
        errors={"T = 8": {"a": [0.1, 0.05], "b": [None, None]}},
    )  # fmt: skip
    plot_bars(
        {"m1": {"x": 1.0, "y": 2.0}, "m2": {"x": 1.5, "y": None}}, tmp_path / "b.png",
        ylabel="v", errors={"m1": {"x": 0.1, "y": None}},
    )  # fmt: skip
    plot_bars({"a": {"d": 25.0}, "b": {"d": -0.1}}, tmp_path / "s.png", ylabel="d", symlog=1.0)
    assert (tmp_path / "s.png").stat().st_size > 0
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_units_are_computed_once_per_settings(tmp_path):
    from nestlearn.experiments.units import run_unit, unit_path, unit_settings

    calls = []

    def compute():
        calls.append(1)
        return {"accuracy": 0.5}

    args = argparse.Namespace(out=str(tmp_path), threads=1, steps=10, seed=0)
    settings = unit_settings(args, model="hope", seed=0)
    assert "out" not in settings and settings["steps"] == 10
    assert run_unit(tmp_path, "hope-seed0", settings, compute) == {"accuracy": 0.5}
    assert run_unit(tmp_path, "hope-seed0", settings, compute)["reused"] is True
    assert len(calls) == 1
    changed = unit_settings(argparse.Namespace(steps=11), model="hope", seed=0)
    run_unit(tmp_path, "hope-seed0", changed, compute)  # other settings: recomputed
    assert len(calls) == 2
    unit_path(tmp_path, "hope-seed0").write_text("{torn")
    run_unit(tmp_path, "hope-seed0", changed, compute)  # unreadable: recomputed
    assert len(calls) == 3
    run_unit(tmp_path, "hope-seed0", changed, compute, fresh=True)
    assert len(calls) == 4
