"""The experiment registry: lazy import by name, clear error for unknown names."""

from __future__ import annotations

import sys
import types

import pytest

from nestlearn.cli.main import main
from nestlearn.errors import ConfigError
from nestlearn.experiments import EXPERIMENTS, run_experiment


@pytest.fixture
def fake_experiment(monkeypatch):
    module = types.ModuleType("fake_nestlearn_experiment")
    seen = []
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(EXPERIMENTS, "fake", (module.__name__, "a test double"))
    return seen


def test_an_experiment_runs_with_its_arguments(fake_experiment):
    assert run_experiment("fake", ["--steps", "3"]) == 0
    assert main(["experiment", "fake", "--steps", "3"]) == 0
    assert fake_experiment == [["--steps", "3"], ["--steps", "3"]]


def test_list_prints_every_experiment(fake_experiment, capsys):
    assert main(["experiment", "list"]) == 0
    assert "fake" in capsys.readouterr().out


def test_unknown_experiment_names_the_available_ones(fake_experiment, capsys):
    with pytest.raises(ConfigError, match=r"no experiment 'nope'; available: .*fake"):
        run_experiment("nope")
    assert main(["experiment", "nope"]) == 2
    assert "available" in capsys.readouterr().err
