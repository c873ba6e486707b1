"""Re-writing a step never loses it; a step already checkpointed is not written again; resuming a
finished run adds no rows and writes no checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nestlearn.cli.main import main
from nestlearn.train import Trainer
from nestlearn.train import trainer as trainer_module
from nestlearn.train.checkpoint import (
    MODEL_FILE,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from nestlearn.train.checkpoint_folders import checkpoint_root, checkpoint_step, list_checkpoints
from nestlearn.train.metrics import read_metrics
from tests.conftest import subprocess_env

STEP4 = "step_00000004"


def config(debug_config, *extra: str):
    return debug_config(
        "train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.keep_last=1", *extra
    )


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(checkpoint / MODEL_FILE))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # same code, same inputs, same thread count: bit for bit
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def saves(monkeypatch) -> list[int]:
    """The steps the trainer writes checkpoints of."""
    written: list[int] = []
    real = trainer_module.save_checkpoint

    def spy(run_dir, step, **kwargs):
        written.append(step)
        return real(run_dir, step, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", spy)
    return written


class Crash(BaseException):
    """Stands for the process dying at this instant."""


def test_a_crash_while_replacing_a_step_keeps_that_step(debug_config, monkeypatch):
    trainer = Trainer(config(debug_config))
    trainer.fit()
    final = checkpoint_root(trainer.run_dir) / STEP4
    before = weights(final)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name and Path(dst).name.startswith("step_"):
            raise Crash  # the new folder never makes it into place
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        save_checkpoint(
            trainer.run_dir,
            4,
            model=trainer.model,
            trainer_state=trainer.trainer_state(),
            cfg=trainer.cfg,
            tokenizer=trainer.corpus.tokenizer,
            keep_last=1,
        )
    monkeypatch.undo()
    # keep_last=1: step 4 is the only checkpoint, and it is still there, intact.
    assert resolve_checkpoint(trainer.run_dir) == final
    verify_checkpoint(final)
    assert_same_weights(weights(final), before)


def test_sigkill_between_the_renames_of_a_replacement_keeps_the_step(debug_config):
    cfg = config(debug_config, "train.keep_last=2")
    run = Path(cfg.train.out_dir)
    Trainer(cfg).fit()
    root = checkpoint_root(run)
    original = weights(root / STEP4)
    # Resume from step 2 past the existing step 4: step 4 is re-written, and killed mid-way.
    cmd = [sys.executable, "-m", "nestlearn", "train", "--resume", str(root / "step_00000002")]
    env = subprocess_env(NESTLEARN_FAULT="replacing_checkpoint@4")
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (root / STEP4).exists()
    # The old step 4, renamed aside, is what readers see in its place.
    newest = resolve_checkpoint(run)
    assert newest.name.startswith(f".{STEP4}.old-") and checkpoint_step(newest) == 4
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [2, 4]
    # Resuming puts it back under its name (nothing to train: step 4 is train.steps).
    result = Trainer.from_checkpoint(run).fit()
    assert result.checkpoint == root / STEP4 and result.extra["already_finished"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", STEP4]
    assert_same_weights(weights(root / STEP4), original)


def test_ctrl_c_right_after_a_periodic_save_does_not_write_it_again(debug_config, saves):
    cfg = config(debug_config)
    original = Trainer.train_step

    def interrupt_at_2(self):
        out = original(self)
        if self.step == 2:  # a checkpoint step
            signal.raise_signal(signal.SIGINT)
        return out

    trainer = Trainer(cfg)
    trainer.train_step = interrupt_at_2.__get__(trainer)
    result = trainer.fit()
    assert result.interrupted and result.step == 2
    assert saves == [2] and result.checkpoint.name == "step_00000002"


def test_resuming_a_finished_run_adds_no_rows_and_writes_nothing(debug_config, saves, capsys):
    cfg = config(debug_config)
    run = Path(cfg.train.out_dir)
    first = Trainer(cfg).fit()
    metrics = (run / "metrics.jsonl").read_bytes()
    manifest = (checkpoint_root(run) / STEP4 / "manifest.json").read_bytes()
    saves.clear()
    for _ in range(2):
        again = Trainer.from_checkpoint(run).fit()
        assert again.extra["already_finished"] and not first.extra["already_finished"]
        assert again.final_eval["loss"] == first.final_eval["loss"]
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished (train.steps=4): nothing to train" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (checkpoint_root(run) / STEP4 / "manifest.json").read_bytes() == manifest
    assert saves == []


def test_a_run_stopped_at_its_last_step_gets_its_final_evaluation_once(debug_config):
    cfg = config(debug_config)
    run = Path(cfg.train.out_dir)
    original = Trainer.train_step

    def interrupt_at_4(self):
        out = original(self)
        if self.step == 4:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer = Trainer(cfg)
    trainer.train_step = interrupt_at_4.__get__(trainer)
    assert trainer.fit().interrupted

    def final_evals() -> int:
        rows = read_metrics(run / "metrics.jsonl")
        return sum(r["kind"] == "eval" and r["step"] == 4 for r in rows)

    assert final_evals() == 0  # Ctrl-C skips it: the resume does it
    for _ in range(2):
        result = Trainer.from_checkpoint(run).fit()
        assert result.final_eval and final_evals() == 1
