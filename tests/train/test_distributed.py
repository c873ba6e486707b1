"""Data parallelism on CPU: gloo, 2 processes launched by torchrun (docs/distributed.md).

Each multi-process test launches ``torchrun --standalone`` (a free port is picked) with a
timeout, so a hang fails instead of blocking; OMP_NUM_THREADS=1 keeps two ranks on two cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import load_model, read_checkpoint
from nestlearn.train.checkpoint_folders import list_checkpoints
from nestlearn.train.distributed import resolve_parallel
from nestlearn.train.metrics import read_metrics
from tests.conftest import subprocess_env
from tests.train import dist_worker

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

TIMEOUT = 240  # seconds; a hung collective fails the test
WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def close(a: list[dict], b: list[dict], key: str, tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=tol, abs=tol)


def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x 2 rows == 1 process x 4 rows, with gradient accumulation and evaluation."""
    common = ["train.steps=4", "train.grad_accum=2", "train.eval_every=2", "train.ckpt_every=2"]
    ddp_dir = tmp_path / "ddp"
    out = torchrun(
        "-m",
        "nestlearn",
        "train",
        "debug",
        f"train.out_dir={ddp_dir}",
        "train.parallel=ddp",
        *common,
    )
    assert out.stdout.count("done: step 4") == 1  # rank 0 alone reports
    single = Trainer(load_config("debug", [f"train.out_dir={tmp_path / 'one'}", *common]))
    single.fit()
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "loss")):
        close(records(ddp_dir, kind), records(single.run_dir, kind), key, 1e-5)
    # The sharded checkpoint loads in one process (eval/generate path) with the same weights.
    model, loaded = load_model(ddp_dir)
    assert loaded.format == 2 and loaded.step == 4
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_fsdp_trains_saves_sharded_and_resumes_on_one_process(tmp_path):
    """FSDP2 (2 ranks, muon + AdamW) -> checkpoint at step 3 -> resumed by 1 process without
    torchrun: the same step, schedule and optimizer state, so the same losses afterwards."""
    run = tmp_path / "fsdp"
    torchrun(
        "-m",
        "nestlearn",
        "train",
        "debug",
        f"train.out_dir={run}",
        "train.parallel=fsdp",
        "optim.name=muon",
        "train.steps=6",
        "train.ckpt_every=3",
        "train.keep_last=5",
        "train.eval_every=3",
    )
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    # Resume a copy from step 3 in this process (parallel=fsdp falls back to one process).
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    with pytest.warns(UserWarning, match="single process"):
        trainer = Trainer.from_checkpoint(copy)
    assert trainer.dist.mode == "none" and trainer.step == 3
    assert trainer.scheduler.last_epoch == 3
    matrix = trainer.optimizer.parts["matrix"]
    assert all(torch.count_nonzero(s["m"]) > 0 for s in matrix.state.values())
    trainer.fit()
    for kind in ("train", "eval"):
        close(records(copy, kind), records(run, kind), "loss", 2e-4)
    final = read_checkpoint(run).trainer_state
    assert trainer.step == final["step"] == 6


def test_muon_and_m3_under_fsdp_equal_one_process(tmp_path):
    """Newton–Schulz of sharded matrices gathers them: the steps equal the unsharded ones."""
    out = tmp_path / "history.pt"
    torchrun(str(WORKER), str(out))
    sharded = torch.load(out, weights_only=True)
    reference = dist_worker.run(sharded=False)
    assert len(sharded) == len(reference) == dist_worker.STEPS
    for got, want in zip(sharded, reference, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The updates are not no-ops (the comparison above would hold trivially otherwise).
    start = [p.detach() for p in dist_worker.build().parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(sharded[0], start, strict=True))


def test_parallel_modes_resolve_or_fail_clearly():
    assert resolve_parallel("auto", 1) == "none"
    assert resolve_parallel("auto", 2) == "ddp"
    assert resolve_parallel("fsdp", 4) == "fsdp"
    with pytest.warns(UserWarning, match="single process"):
        assert resolve_parallel("ddp", 1) == "none"
    with pytest.raises(ConfigError, match="every rank would train its own copy"):
        resolve_parallel("none", 2)
    with pytest.raises(ConfigError, match="choose one of auto, none, ddp, fsdp"):
        resolve_parallel("zero3", 2)


def test_ddp_without_torchrun_trains_as_one_process(debug_config, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.warns(UserWarning, match="torchrun"):
        trainer = Trainer(debug_config("train.parallel=ddp", "train.steps=2"))
    assert trainer.dist.mode == "none" and trainer.forward_model is trainer.model
    trainer.fit()
    manifest = json.loads((trainer.last_checkpoint / "manifest.json").read_text())
    assert manifest["format"] == 1  # one process keeps the single-file checkpoint


def test_global_batch_must_split_evenly(debug_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="divisible by the 3 ranks"):
        Trainer(debug_config("train.batch_size=4"))


@pytest.mark.slow
def test_checkpoints_reshard_between_modes(tmp_path):
    """One process -> FSDP (2 ranks) -> DDP (2 ranks): each resume continues the same run."""
    settings = ["train.steps=6", "train.ckpt_every=2", "train.keep_last=5", "train.eval_every=2"]
    single = Trainer(load_config("debug", [f"train.out_dir={tmp_path / 'one'}", *settings]))
    single.fit()
    run = tmp_path / "resharded"
    shutil.copytree(single.run_dir, run)
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    torchrun("-m", "nestlearn", "train", "--resume", str(run), "train.parallel=fsdp")
    assert read_checkpoint(run / "checkpoints" / "step_00000004").format == 2
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    torchrun("-m", "nestlearn", "train", "--resume", str(run), "train.parallel=ddp")
    for kind in ("train", "eval"):
        close(records(run, kind), records(single.run_dir, kind), "loss", 1e-4)
