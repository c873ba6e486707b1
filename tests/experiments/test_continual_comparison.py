"""Continual learning over several models and seeds: default rows, units, spreads, level periods."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.errors import ConfigError, NonFiniteLossError
from nestlearn.experiments import continual, run_experiment
from nestlearn.experiments.continual import LMLearner, Task, build_parser
from nestlearn.experiments.label_scoring import LabelScorer
from nestlearn.experiments.model_comparison import build, model_specs, parameter_count
from nestlearn.experiments.model_source import apply_preset, fresh_model_config
from nestlearn.experiments.seeds import format_spread, spread
from nestlearn.models.registry import build_model

SMALL = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
PROTOCOL = [
    "--tasks=2", "--classes-per-task=2", "--train-per-class=3", "--test-per-class=2",
    "--steps-per-task=1", "--batch-size=2", "--prompt-len=20", "--no-progress",
]  # fmt: skip


def parse(*argv: str):
    return apply_preset(build_parser().parse_intermixed_args(list(argv)), continual.PRESETS)


def run(out, *argv: str) -> dict:
    assert run_experiment("continual", [*SMALL, *argv, *PROTOCOL, f"--out={out}"]) == 0
    return json.loads((out / "result.json").read_text())


def test_the_default_rows_are_hope_with_and_without_level_periods_then_the_baselines():
    specs = model_specs(parse())
    assert [s.label for s in specs] == [
        "hope", "hope (level periods)", "hope_attention", "titans_lmm", "gated_deltanet",
        "transformer",
    ]  # fmt: skip
    assert [s.level_periods for s in specs] == ["", "cms", "", "", "", ""]
    assert (
        model_specs(parse("--level-periods", "blocks.*=2", "--models", "hope+level_periods"))[
            0
        ].level_periods
        == "blocks.*=2"
    )
    # One model keeps working; the level-periods suffix needs a model with a CMS.
    assert [s.label for s in model_specs(parse("--model", "gated_deltanet-tiny"))] == [
        "gated_deltanet-tiny"
    ]
    with pytest.raises(ConfigError, match="one of --models, --model and --checkpoint"):
        model_specs(parse("--model", "hope", "--models", "hope"))
    with pytest.raises(ConfigError, match="no CMS"):
        run_experiment("continual", ["--models", "transformer+level_periods", *SMALL, *PROTOCOL])


def test_the_cpu_preset_models_have_about_the_same_parameter_count():
    args = parse("--preset", "cpu")
    assert args.seeds == [0, 1, 2]
    counts = {s.label: parameter_count(build(s, args, 0)) for s in model_specs(args)}
    assert max(counts.values()) / min(counts.values()) < 1.05, counts
    # Without the per-model widths, HOPE-attention and the Transformer are ~20% smaller.
    bare = parse("--preset", "cpu", *continual.CPU_SHARED)
    sizes = [parameter_count(build(s, bare, 0)) for s in model_specs(bare)]
    assert max(sizes) / min(sizes) > 1.15


def test_one_record_per_model_and_seed_and_spreads_over_seeds(tmp_path):
    written = run(tmp_path, "--models", "gated_deltanet", "transformer", "--seeds", "2")
    records = written["results"]
    assert [(r["model"], r["seed"]) for r in records] == [
        ("gated_deltanet", 0), ("gated_deltanet", 1), ("transformer", 0), ("transformer", 1),
    ]  # fmt: skip
    for label in ("gated_deltanet", "transformer"):
        mine = [r for r in records if r["model"] == label]
        acc = written["summary"][label]["ACC"]
        assert acc["values"] == [r["metrics"]["average_accuracy"] for r in mine]
        assert acc["n"] == 2 and acc["std"] is not None
        assert list(written["summary"][label]) == list(continual.SUMMARY_KEYS)
        cell = spread([r["accuracy_matrix"][1][0] for r in mine])
        assert f"| task 1 | {format_spread(cell)} |" in (tmp_path / "results.md").read_text()
    assert [row[0] for row in written["table"]["rows"]] == ["gated_deltanet", "transformer"]
    assert " ± " in written["table"]["rows"][0][2]
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == [
        "gated_deltanet-seed0.json", "gated_deltanet-seed1.json", "transformer-seed0.json",
        "transformer-seed1.json",
    ]  # fmt: skip
    for figure in continual.FIGURES:
        assert (tmp_path / figure).stat().st_size > 0


def test_models_run_apart_then_the_full_command_only_assembles(tmp_path, monkeypatch):
    first = run(tmp_path, "--models", "transformer")
    run(tmp_path, "--models", "gated_deltanet")

    def refuse(*args, **kwargs):
        raise AssertionError("a stored unit was computed again")

    monkeypatch.setattr(continual, "run_one", refuse)
    full = run(tmp_path, "--models", "gated_deltanet", "transformer")
    assert [r["model"] for r in full["results"]] == ["gated_deltanet", "transformer"]
    assert all(r["reused"] for r in full["results"])
    assert full["results"][1]["accuracy_matrix"] == first["results"][0]["accuracy_matrix"]
    # A changed protocol flag is a different unit: computed, not reused.
    with pytest.raises(AssertionError, match="computed again"):
        run(tmp_path, "--models", "transformer", "--lr", "0.01")


def test_a_diverged_seed_is_missing_not_a_crash(tmp_path, monkeypatch):
    real = continual.run_one

    def diverge_on_seed_1(args, spec, seed):
        if seed == 1:
            raise NonFiniteLossError("the loss became non-finite")
        return real(args, spec, seed)

    monkeypatch.setattr(continual, "run_one", diverge_on_seed_1)
    written = run(tmp_path, "--models", "transformer", "--seed", "0", "1")
    assert "NonFiniteLossError" in written["results"][1]["failed"]
    acc = written["summary"]["transformer"]["ACC"]
    assert (acc["n"], acc["missing"]) == (1, 1)
    assert "(1 failed)" in written["table"]["rows"][0][2]


def hope(periods: tuple[int, int] = (3, 2)):
    sizes = f"model.cms_chunk_sizes=[{periods[0]}, {periods[1]}]"
    cfg = dataclasses.replace(fresh_model_config("hope", [*SMALL, sizes]), vocab_size=257)
    torch.manual_seed(0)
    return build_model(cfg)


def level(model, index: int) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if f"cms.levels.{index}." in n
    }


def changed(before: dict, model) -> bool:
    now = dict(model.named_parameters())
    return any(not torch.equal(v, now[n]) for n, v in before.items())


@pytest.mark.parametrize("periods", ["", "cms"])
def test_level_periods_hold_a_slow_level_until_its_step(periods):
    model = hope((3, 2))
    scorer = LabelScorer(model, ByteTokenizer(), prompt_len=20)
    learner = LMLearner(scorer, 2, 2, 1e-2, level_periods=periods)
    task = Task(0, ["x", "y"], [continual.LabelledText("a b c", "x")] * 2, [])
    slow, mid = level(model, 0), level(model, 1)
    assert slow and mid
    learner.learn(task)  # optimizer steps 0, 1: level 1 (period 2) steps at 1, level 0 not yet
    assert changed(mid, model)
    assert changed(slow, model) is (periods == "")
    learner.learn(Task(1, ["x", "y"], task.train, []))  # steps 2, 3: level 0 steps at 2
    assert changed(slow, model)


def test_a_checkpoint_runs_that_model_only(tmp_path, debug_config):
    from nestlearn.train.checkpoint import save_checkpoint

    cfg = debug_config("model.vocab_size=257", "model.d_model=16", "model.n_layers=1")
    save_checkpoint(
        tmp_path / "run", 1, model=build_model(cfg.model), trainer_state={}, cfg=cfg,
        tokenizer=ByteTokenizer(),
    )  # fmt: skip
    out = tmp_path / "cl"
    argv = [f"--checkpoint={tmp_path / 'run'}", *PROTOCOL, f"--out={out}"]
    assert run_experiment("continual", argv) == 0
    written = json.loads((out / "result.json").read_text())
    [record] = written["results"]
    assert record["model"] == str(tmp_path / "run") and record["seed"] == 0
    assert list(written["summary"]) == [str(tmp_path / "run")]
    assert (out / "units" / "checkpoint-seed0.json").is_file()
