"""Kill training at many points (SIGKILL: no cleanup runs), resume, and check two promises:

- once a checkpoint has been written, a valid one exists after every kill, and it is never older
  than the one ``checkpoints/latest`` announced;
- resuming (as often as it takes) ends with the same weights, bit for bit, and the same metrics
  rows as a run that was never interrupted.

The fast test walks one chain of kills through the checkpoint's fault points
(:mod:`nestlearn.train.faults`: mid-write before any checkpoint, before pruning, mid-write of the
final save, after it). The slow one kills at reproducible random points of any kind
(``NESTLEARN_FAULT=count@k``: mid-step too) and at random wall-clock moments from outside, several
times per run. Every process uses one thread, so every run does the same arithmetic.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nestlearn.train.checkpoint import MODEL_FILE, resolve_checkpoint, verify_checkpoint
from nestlearn.train.checkpoint_folders import (
    LATEST_FILE,
    checkpoint_root,
    checkpoint_step,
    list_checkpoints,
)
from nestlearn.train.metrics import read_metrics
from nestlearn.train.run_lock import LOCK_FILE
from tests.conftest import subprocess_env

KILLED = -signal.SIGKILL


def train_args(run: Path, steps: int) -> list[str]:
    return [
        "debug",
        f"train.out_dir={run}",
        f"train.steps={steps}",
        "train.ckpt_every=2",
        "train.eval_every=3",
        "train.keep_last=1",  # the hardest case: one checkpoint at a time
        "train.threads=1",
    ]


def command(run: Path, steps: int) -> list[str]:
    """A fresh run, or ``--resume`` once the folder holds a checkpoint."""
    args = ["--resume", str(run)] if list_checkpoints(run) else train_args(run, steps)
    return [sys.executable, "-m", "nestlearn", "train", *args]


def environment(fault: str = "") -> dict[str, str]:
    extra = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess_env(**extra, NESTLEARN_FAULT=fault) if fault else subprocess_env(**extra)


def train(run: Path, steps: int, fault: str = "") -> int:
    done = subprocess.run(
        command(run, steps), env=environment(fault), capture_output=True, text=True, timeout=300
    )
    assert done.returncode in (0, KILLED), done.stderr[-3000:]
    return done.returncode


def final_state(run: Path) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    newest = resolve_checkpoint(run)
    weights = safetensors.torch.load_file(str(newest / MODEL_FILE))
    rows = [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]
    return weights, rows


def assert_a_valid_checkpoint_survives(run: Path, ever_checkpointed: bool) -> bool:
    """The promise after a kill; returns whether a checkpoint exists now or did before."""
    announced = checkpoint_root(run) / LATEST_FILE
    if announced.exists():
        ever_checkpointed = True
    if not (ever_checkpointed or list_checkpoints(run)):
        return False  # killed before the first checkpoint: nothing to keep yet
    newest = resolve_checkpoint(run)  # raises if none is valid
    verify_checkpoint(newest)
    if announced.exists():
        assert checkpoint_step(newest) >= checkpoint_step(Path(announced.read_text().strip()))
    return True


def assert_same_as(reference, run: Path) -> None:
    weights, rows = final_state(run)
    want_weights, want_rows = reference
    assert weights.keys() == want_weights.keys()
    for key in weights:  # same code, same inputs, one thread: bit for bit
        assert torch.equal(weights[key], want_weights[key]), key
    assert rows == want_rows


def uninterrupted(run: Path, steps: int):
    """The reference, in this process (one thread, like the subprocesses)."""
    from nestlearn.config import load_config
    from nestlearn.train import Trainer

    name, *overrides = train_args(run, steps)
    Trainer(load_config(name, overrides)).fit()
    return final_state(run)


def test_a_kill_at_each_fault_point_then_resume_is_exact(tmp_path, one_thread):
    reference = uninterrupted(tmp_path / "reference", 6)
    run = tmp_path / "run"
    # In the order the run reaches them; each resumes from what the previous kill left.
    chain = [
        "during_checkpoint@2",  # half-written temp folder, no checkpoint yet: start again
        "before_prune@4",  # steps 2 and 4 complete, `latest` says 4, step 2 not pruned yet
        "during_checkpoint@6",  # the final save, half-written: step 4 must still be there
        "after_checkpoint@6",  # saved and pruned, no report yet: the resume only reports
    ]
    ever = False
    for fault in chain:
        assert train(run, 6, fault) == KILLED, fault
        ever = assert_a_valid_checkpoint_survives(run, ever)
        assert ever == (fault != chain[0]), fault
    assert train(run, 6) == 0
    assert_same_as(reference, run)
    assert not [p.name for p in checkpoint_root(run).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_kills_at_random_points_then_resume_is_exact(tmp_path, one_thread, seed):
    steps = 10
    reference = uninterrupted(tmp_path / "reference", steps)
    rng = random.Random(seed)
    run = tmp_path / "run"
    ever, kills, outcome = False, 0, KILLED
    for _ in range(8):  # a run reaches ~4 fault points per step: most attempts are killed
        if rng.random() < 0.5:
            outcome = train(run, steps, fault=f"count@{rng.randint(1, 12)}")
        else:
            outcome = _kill_after(run, steps, rng.uniform(0.0, 2.0))
        if outcome == 0:
            break
        kills += 1
        ever = assert_a_valid_checkpoint_survives(run, ever)
    if outcome != 0:
        outcome = train(run, steps)
    assert outcome == 0 and kills >= 3
    assert_same_as(reference, run)


def _kill_after(run: Path, steps: int, seconds: float) -> int:
    """Start training and SIGKILL it from outside ``seconds`` after it locked the run folder
    (past the imports: data, model, steps, checkpoints; any instruction at all)."""
    proc = subprocess.Popen(
        command(run, steps), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while proc.poll() is None and not _locked_by(run, proc.pid):
        time.sleep(0.005)
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, KILLED), err.decode()[-3000:]
    return proc.returncode


def _locked_by(run: Path, pid: int) -> bool:
    try:  # a killed run leaves its (unlocked) file behind: wait for this process's record
        return json.loads((run / LOCK_FILE).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False
