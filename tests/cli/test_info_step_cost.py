"""``nestlearn info`` says what a training step costs: FLOPs always, time with ``--cost``."""

from __future__ import annotations

import re

import pytest

from nestlearn.cli.main import main
from nestlearn.config import load_config
from nestlearn.models.registry import build_model
from nestlearn.train.step_cost import StepCost, measure_step_cost, step_flops

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "train.batch_size=2",
         "train.seq_len=16"]  # fmt: skip


def _cfg(name: str):
    cfg = load_config(name, SMALL)
    cfg.model.vocab_size = 257
    return cfg


@pytest.mark.parametrize("name", ["debug", "hope-tiny"])
def test_the_flops_line_is_the_models_count_times_the_batch(capsys, name):
    assert main(["info", name, *SMALL, "data.tokenizer=byte"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"training step: 2 x 16 = 32 tokens, ([\d,.]+) GFLOP", out)
    assert match, out
    model = build_model(_cfg(name).model)
    expected = model.flops_per_token(16) * 32 / 1e9
    assert float(match.group(1).replace(",", "")) == pytest.approx(expected, abs=0.006)
    assert "--cost" in out and "measured here" not in out


def test_cost_times_steps_and_estimates_the_run(capsys):
    assert main(["info", "debug", *SMALL, "train.steps=1000", "--cost"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("measured here"))
    seconds = float(re.search(r"([\d.]+) s per step", line).group(1))
    assert seconds > 0 and "train.steps=1,000 take about" in line


def test_measured_cost_keeps_the_flops_and_the_shape():
    cfg = _cfg("debug")
    cost = measure_step_cost(cfg, steps=1, warmup=0)
    assert cost.seconds is not None and cost.seconds > 0
    assert cost.flops == step_flops(build_model(cfg.model), cfg).flops
    assert (cost.batch_size, cost.seq_len, cost.tokens) == (2, 16, 32)
    with pytest.raises(ValueError, match="steps=0"):
        measure_step_cost(cfg, steps=0)


def test_the_run_estimate_reads_in_units_a_person_uses():
    cost = StepCost(1, 1, 1e9, seconds=5.5, device="cpu", threads=1)
    assert "about 55 min" in cost.describe(600)
    assert "about 15.3 h" in cost.describe(10_000)
    assert "about 55 s" in cost.describe(10)
