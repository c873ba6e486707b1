"""Test-time learning over several models and seeds: default models, units, spreads, sizes."""

from __future__ import annotations

import json

import pytest

from nestlearn.errors import ConfigError
from nestlearn.experiments import run_experiment, test_time
from nestlearn.experiments.model_comparison import build, model_specs, parameter_count
from nestlearn.experiments.model_source import apply_preset

SMALL = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
PROTOCOL = [
    "--docs=2", "--facts-per-doc=2", "--episodes=2", "--train-steps=2", "--batch-size=2",
    "--no-progress",
]  # fmt: skip


def parse(*argv: str):
    return apply_preset(
        test_time.build_parser().parse_intermixed_args(list(argv)), test_time.PRESETS
    )


def run(out, *argv: str) -> dict:
    assert run_experiment("test_time", [*SMALL, *argv, *PROTOCOL, f"--out={out}"]) == 0
    return json.loads((out / "result.json").read_text())


def test_the_default_models_and_no_level_periods():
    labels = [s.label for s in model_specs(parse())]
    assert labels == ["hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer"]
    with pytest.raises(ConfigError, match="takes no level periods"):
        model_specs(parse("--models", "hope+level_periods"))
    with pytest.raises(ConfigError, match="none of the models transformer has this field"):
        model_specs(parse("--models", "transformer", "model.cms_hidden=8"))


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_the_preset_models_have_about_the_same_parameter_count(preset):
    args = parse("--preset", preset)
    counts = {s.label: parameter_count(build(s, args, 0)) for s in model_specs(args)}
    assert max(counts.values()) / min(counts.values()) < 1.05, counts


def test_records_per_model_and_seed_spreads_and_reuse(tmp_path, monkeypatch):
    written = run(tmp_path, "--models", "transformer", "gated_deltanet", "--seeds", "2")
    records = written["results"]
    assert [(r["model"], r["seed"]) for r in records] == [
        ("transformer", 0), ("transformer", 1), ("gated_deltanet", 0), ("gated_deltanet", 1),
    ]  # fmt: skip
    carry = written["summary"]["transformer"]["carry_final_accuracy"]
    assert carry["values"] == [r["conditions"]["carry"]["final_accuracy"] for r in records[:2]]
    gain = written["summary"]["gated_deltanet"]["carry_minus_reset"]
    assert gain["n"] == 2 and gain["values"] == [
        r["conditions"]["carry"]["final_accuracy"] - r["conditions"]["reset"]["final_accuracy"]
        for r in records[2:]
    ]
    assert [row[:3] for row in written["table"]["rows"]][:2] == [
        ["transformer", records[0]["parameters"], "carry"],
        ["transformer", records[0]["parameters"], "reset"],
    ]
    for figure in test_time.FIGURES:
        assert (tmp_path / figure).stat().st_size > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a stored unit was computed again")

    monkeypatch.setattr(test_time, "run_one", refuse)
    again = run(tmp_path, "--models", "gated_deltanet", "transformer", "--seeds", "2")
    assert all(r["reused"] for r in again["results"])
    assert again["summary"]["transformer"] == written["summary"]["transformer"]
