"""Each optimizer name trains the debug model through the Trainer and resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nestlearn.config import load_config
from nestlearn.config.loader import _CHOICES
from nestlearn.data import prepare_data
from nestlearn.train import Trainer
from nestlearn.train.checkpoint_folders import checkpoint_root
from nestlearn.train.metrics import read_metrics

NAMES = [n for n in _CHOICES[("optim", "name")] if n != "adamw"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_data(load_config("debug").data, progress=False)


def records(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("name", NAMES)
def test_debug_run_resumes_exactly(name, corpus, tmp_path):
    run_dir = tmp_path / name
    cfg = load_config(
        "debug",
        [
            f"optim.name={name}",
            f"train.out_dir={run_dir}",
            "train.steps=4",
            "train.ckpt_every=2",
            "train.eval_every=0",
            "train.threads=1",
            "eval.max_tokens=512",
        ],
    )
    result = Trainer(cfg, corpus=corpus).fit()
    assert result.step == 4 and all(math.isfinite(r[2]) for r in records(run_dir))
    reference = records(run_dir)
    # The optimizer state went through torch.save and torch.load(weights_only=True).
    resumed = Trainer.from_checkpoint(checkpoint_root(run_dir) / "step_00000002", corpus=corpus)
    assert resumed.step == 2
    resumed.fit()
    assert records(run_dir) == reference
