"""Continual learning from the perplexity experiment's trained models (``--pretrained``)."""

from __future__ import annotations

import json

import pytest

from nestlearn.errors import RunLockedError
from nestlearn.experiments import lm_runs, perplexity, run_experiment
from nestlearn.experiments.continual import PRESETS, build_parser, pretrained_folder
from nestlearn.experiments.model_source import apply_preset
from nestlearn.train.checkpoint_folders import checkpoint_step, list_checkpoints

PROTOCOL = [
    "--tasks=2", "--classes-per-task=2", "--train-per-class=3", "--test-per-class=2",
    "--steps-per-task=1", "--batch-size=2", "--prompt-len=20", "--no-progress",
]  # fmt: skip
# The perplexity experiment's cpu preset, shrunk to a few seconds.
SMALL_CPU = dict(
    base="debug", steps=3, max_tokens=200, eval_points=1,
    preset_sets=("model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                 "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=2",
                 "data.max_bytes=200000", "eval.max_tokens=64"),
)  # fmt: skip


@pytest.fixture
def small_perplexity(monkeypatch):
    monkeypatch.setitem(perplexity.PRESETS, "cpu", SMALL_CPU)
    monkeypatch.setattr(perplexity, "LOCK_POLL_SECONDS", 0.0)


def test_each_model_starts_from_its_perplexity_run(tmp_path, small_perplexity):
    ppl = tmp_path / "perplexity"
    out = tmp_path / "continual"
    argv = ["--models", "transformer", "--pretrained", str(ppl), "--out", str(out), *PROTOCOL]
    assert run_experiment("continual", argv) == 0
    run_dir = ppl / "runs" / "transformer" / "seed0"
    assert checkpoint_step(list_checkpoints(run_dir)[-1]) == SMALL_CPU["steps"]
    record = json.loads((out / "result.json").read_text())["results"][0]
    assert record["pretrained"] is True
    assert str(run_dir) in record["source"]


def test_fresh_models_with_pretrained_none(tmp_path, small_perplexity):
    out = tmp_path / "continual"
    argv = ["--models", "transformer", "--pretrained", "none", "--out", str(out), *PROTOCOL]
    assert (
        run_experiment(
            "continual", ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", *argv]
        )
        == 0
    )
    record = json.loads((out / "result.json").read_text())["results"][0]
    assert record["pretrained"] is False and "fresh" in record["source"]
    assert not (tmp_path / "perplexity").exists()


def test_auto_is_the_perplexity_folder_beside_out_and_the_cpu_default():
    def folder(*argv: str):
        return pretrained_folder(apply_preset(build_parser().parse_intermixed_args(argv), PRESETS))

    assert (
        folder("--preset", "cpu", "--out", "x/suite/continual").as_posix() == "x/suite/perplexity"
    )
    assert folder("--out", "y") is None  # tiny: fresh models


def test_a_finished_run_is_reused_without_training_or_its_lock(
    tmp_path, small_perplexity, monkeypatch
):
    run_dir = perplexity.pretrained_run(tmp_path, "gated_deltanet", 1)
    assert checkpoint_step(list_checkpoints(run_dir)[-1]) == SMALL_CPU["steps"]

    def refuse(cfg):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(lm_runs, "train_run", refuse)
    assert perplexity.pretrained_run(tmp_path, "gated_deltanet", 1) == run_dir


def test_a_run_another_process_trains_is_waited_for(tmp_path, small_perplexity, monkeypatch):
    calls = []
    train = lm_runs.train_run

    def busy_once(cfg):
        calls.append(cfg.train.out_dir)
        if len(calls) == 1:
            raise RunLockedError(f"{cfg.train.out_dir} is in use by pid 1")
        return train(cfg)

    monkeypatch.setattr(lm_runs, "train_run", busy_once)
    run_dir = perplexity.pretrained_run(tmp_path, "transformer", 0)
    assert len(calls) == 2 and list_checkpoints(run_dir)


def test_an_architecture_the_perplexity_experiment_lacks_is_refused(tmp_path, small_perplexity):
    with pytest.raises(Exception, match="--pretrained none"):
        perplexity.pretrained_run(tmp_path, "deltanet", 0)
