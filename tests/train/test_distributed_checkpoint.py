"""Sharded (DCP, format 2) checkpoints in one process: exact resume, verification, safety.

The data-parallel code paths run here with one rank and no process group (DCP then saves and
loads in a single process), so resume is checked to the bit; tests/train/test_distributed.py
runs the same code on 2 gloo ranks.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import nestlearn.train.trainer as trainer_module
from nestlearn.errors import CheckpointError
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import load_model, read_checkpoint, resolve_checkpoint
from nestlearn.train.distributed import DistEnv
from nestlearn.train.distributed_checkpoint import dcp_load, join_tensors, split_tensors
from nestlearn.train.metrics import read_metrics
from nestlearn.train.runtime import setup_runtime

pytest.importorskip("torch.distributed.checkpoint")

# Muon + AdamW (a hybrid optimizer) and a level-step accumulator: every kind of saved state.
SETTINGS = (
    "train.steps=6",
    "train.ckpt_every=3",
    "train.keep_last=5",
    "train.eval_every=3",
    "optim.name=muon",
    "train.level_periods=blocks.1.*=2",
)


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


@contextlib.contextmanager
def one_rank() -> Iterator[None]:
    """Trainers built inside take the data-parallel paths (sharded checkpoints) with one rank."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            trainer_module, "setup_parallel", lambda tc: (DistEnv(mode="ddp"), setup_runtime(tc))
        )
        patch.setattr(trainer_module, "wrap_model", lambda model, env, runtime: model)
        yield


@pytest.fixture
def reference(debug_config) -> list:
    cfg = debug_config(*SETTINGS, out="reference")
    Trainer(cfg).fit()
    return losses(Path(cfg.train.out_dir))


def test_sharded_checkpoint_resumes_exactly(reference, debug_config):
    cfg = debug_config(*SETTINGS, out="sharded")
    with one_rank():
        trainer = Trainer(cfg)
    trainer.fit()
    run = Path(cfg.train.out_dir)
    assert losses(run) == reference  # the data-parallel paths with one rank change nothing
    loaded = read_checkpoint(run / "checkpoints" / "step_00000003")
    assert loaded.format == 2 and (loaded.path / "dcp" / ".metadata").is_file()
    assert "level_steps" not in loaded.trainer_state  # its accumulators are in DCP
    # Resume from step 3 in a plain single process: the rest of the run is bit-exact.
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    resumed = Trainer.from_checkpoint(run)
    assert resumed.dist.mode == "none" and resumed.step == 3
    resumed.fit()
    assert losses(run) == reference
    # The final checkpoint (format 1 now) and the sharded one load for eval/generate.
    model, _ = load_model(run / "checkpoints" / "step_00000003")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_file_checkpoint_resumes_through_the_sharded_path(reference, debug_config):
    """Format 1 (written by one process) into a data-parallel layout: each tensor is copied."""
    cfg = debug_config(*SETTINGS, out="single")
    Trainer(cfg).fit()
    run = Path(cfg.train.out_dir)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    with one_rank():
        resumed = Trainer.from_checkpoint(run)
    assert resumed.step == 3
    resumed.fit()
    assert losses(run) == reference


def test_a_corrupt_shard_is_named(debug_config):
    cfg = debug_config("train.steps=2", "train.ckpt_every=1", "train.keep_last=3")
    with one_rank():
        trainer = Trainer(cfg)
    trainer.fit()
    newest = resolve_checkpoint(Path(cfg.train.out_dir))
    shard = next((newest / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"dcp/__0_0\.distcp is corrupt"):
        read_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert resolve_checkpoint(Path(cfg.train.out_dir)).name == "step_00000001"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_dcp_metadata_cannot_run_code(tmp_path):
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="does not unpickle"):
        dcp_load({"model": {"w": torch.zeros(2)}}, tmp_path)


def test_split_and_join_tensors_round_trip():
    state = {
        "parts": {
            "adamw": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}}},
            "matrix": {"state": {1: {"m": torch.zeros(4, 4), "step": 7}}, "param_groups": []},
        },
        "betas": (0.9, 0.95),
    }
    skeleton, tensors = split_tensors(state, "optimizer")
    assert set(tensors) == {
        "optimizer.parts.adamw.state.0.step",
        "optimizer.parts.adamw.state.0.exp_avg",
        "optimizer.parts.matrix.state.1.m",
    }
    assert skeleton["parts"]["matrix"]["state"][1]["step"] == 7
    assert skeleton["betas"] == (0.9, 0.95)
    joined = join_tensors(skeleton, tensors)
    assert (
        joined["parts"]["adamw"]["state"][0]["exp_avg"]
        is tensors["optimizer.parts.adamw.state.0.exp_avg"]
    )
    # A skeleton holds plain values only: it goes through torch.load(weights_only=True).
    assert not any(isinstance(v, torch.Tensor) for v in _leaves(skeleton))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree
