"""Exact resume: N steps + (SIGKILL | crash mid-checkpoint) + resume == 2N steps in one go."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nestlearn.train import Trainer
from nestlearn.train.checkpoint import resolve_checkpoint
from nestlearn.train.checkpoint_folders import LATEST_FILE, checkpoint_root
from nestlearn.train.metrics import read_metrics
from tests.conftest import subprocess_env

STEPS = 12


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def run_args(run_dir: Path, ckpt_every: int) -> list[str]:
    """The reference run's settings; checkpoint frequency does not change the numbers."""
    return [
        "debug",
        f"train.out_dir={run_dir}",
        f"train.steps={STEPS}",
        f"train.ckpt_every={ckpt_every}",
        "train.eval_every=4",
    ]


def train_cli(run_dir: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = subprocess_env(NESTLEARN_FAULT=fault) if fault else subprocess_env()
    cmd = [sys.executable, "-m", "nestlearn", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[str, int, float]]:
    """Losses of an uninterrupted 2N-step run (in process)."""
    from nestlearn.config import load_config

    out = tmp_path_factory.mktemp("reference")
    name, *overrides = run_args(out, ckpt_every=6)
    cfg = load_config(name, overrides)
    Trainer(cfg).fit()
    return losses(out)


def test_ctrl_c_then_resume_in_process_is_exact(reference, debug_config, monkeypatch):
    cfg = debug_config(f"train.steps={STEPS}", "train.ckpt_every=6", "train.eval_every=4")
    original = Trainer.train_step

    def interrupt_at_5(self):
        out = original(self)
        if self.step == 5:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_5)
    result = Trainer(cfg).fit()
    assert result.interrupted and result.step == 5
    assert result.checkpoint.name == "step_00000005"
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer.from_checkpoint(Path(cfg.train.out_dir)).fit()
    assert not resumed.interrupted and resumed.step == STEPS
    assert losses(Path(cfg.train.out_dir)) == reference


def test_sigkill_after_checkpoint_then_resume_is_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = train_cli(run_dir, *run_args(run_dir, ckpt_every=6), fault="after_checkpoint@6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert resolve_checkpoint(run_dir).name == "step_00000006"
    resumed = train_cli(run_dir, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run_dir) == reference


def test_crash_during_checkpoint_write_keeps_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = train_cli(run_dir, *run_args(run_dir, ckpt_every=4), fault="during_checkpoint@8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    root = checkpoint_root(run_dir)
    # The half-written step 8 exists only as a hidden temp folder; `latest` still says 4.
    assert (root / LATEST_FILE).read_text().strip() == "step_00000004"
    assert any(p.name.startswith(".step_00000008.tmp") for p in root.iterdir())
    assert resolve_checkpoint(run_dir).name == "step_00000004"
    resumed = train_cli(run_dir, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".step_") for p in root.iterdir())
    # Checkpoint frequency does not change the numbers: same losses as the reference run.
    assert losses(run_dir) == reference
