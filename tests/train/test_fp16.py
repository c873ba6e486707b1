"""train.precision=fp16: float16 autocast with loss scaling (nestlearn.train.loss_scaling)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from nestlearn.errors import ConfigError, NonFiniteLossError
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import STATE_FILE
from nestlearn.train.metrics import read_metrics
from tests.conftest import subprocess_env

LEVELS = "train.level_periods=blocks.0.*=2"


def train_records(trainer: Trainer) -> list[dict]:
    return [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if r["kind"] == "train"]


def fit(debug_config, out: str, *overrides: str) -> Trainer:
    trainer = Trainer(debug_config("train.eval_every=0", "train.ckpt_every=0", *overrides, out=out))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("optim", ["adamw", "momentum"])
def test_fp16_trains_like_fp32(debug_config, optim):
    """Same init and batches: the losses and (unscaled) gradient norms track fp32's. Plain
    momentum is not scale-invariant, so a scaled gradient reaching it (or the level-period
    accumulators) would blow the loss up."""
    args = ("train.steps=6", f"optim.name={optim}", LEVELS)
    ref = train_records(fit(debug_config, "fp32", "train.precision=fp32", *args))
    fp16 = fit(debug_config, "fp16", "train.precision=fp16", *args)
    half = train_records(fp16)
    assert fp16.runtime.precision == "fp16" and fp16.grad_scaler is not None
    assert [r["step"] for r in half] == list(range(1, 7))
    assert all(r["loss_scale"] > 1 for r in half)
    for a, b in zip(ref, half, strict=True):
        assert math.isfinite(b["loss"])
        assert b["loss"] == pytest.approx(a["loss"], abs=0.05)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.05)
    acc16 = torch.cat([a.flatten() for a in fp16.level_steps.accumulators.values()])
    assert acc16.abs().max() < 100  # true gradients (scaled ones would be ~65536x larger)


def test_fp16_resume_is_exact_and_saves_the_scale(debug_config):
    """N steps + resume to 2N == 2N straight, bit for bit; the scale (growing every 2 steps
    here) and its growth count are in the checkpoint."""

    def small_interval(trainer: Trainer) -> Trainer:
        trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        return trainer

    straight = small_interval(
        Trainer(debug_config("train.precision=fp16", "train.steps=6", out="a"))
    )
    straight.fit()
    first = small_interval(Trainer(debug_config("train.precision=fp16", "train.steps=3", out="b")))
    first.fit()
    saved = torch.load(first.last_checkpoint / STATE_FILE, weights_only=True)["grad_scaler"]
    assert saved["scale"] == first.grad_scaler.get_scale() == 2.0**9
    assert saved["_growth_tracker"] == 1 and saved["growth_interval"] == 2
    resumed = Trainer.from_checkpoint(first.run_dir, {"train": {"steps": 6}})
    assert resumed.grad_scaler.get_scale() == 2.0**9
    resumed.fit()
    assert resumed.grad_scaler.get_scale() == straight.grad_scaler.get_scale() == 2.0**11
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(straight)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(resumed)] == losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_overflowing_step_is_skipped_then_retried(debug_config):
    """An inf gradient: no error, parameters, optimizer, schedule and level accumulators
    unchanged, the scale halved, the step not counted; the next call trains that step."""
    trainer = Trainer(debug_config("train.precision=fp16", LEVELS))
    param = next(trainer.model.parameters())
    handle = param.register_hook(lambda g: torch.full_like(g, math.inf))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.grad_scaler.get_scale()
    loss, grad_norm = trainer.train_step()
    handle.remove()
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert trainer.step == 0 and trainer.tokens_seen == 0
    assert trainer.grad_scaler.get_scale() == scale / 2
    assert trainer.scheduler.last_epoch == 0 and not trainer.optimizer.state
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    assert all(not acc.any() for acc in trainer.level_steps.accumulators.values())
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.train_step()
    assert trainer.step == 1 and trainer.scheduler.last_epoch == 1
    assert not torch.equal(before[0], param)


def test_non_finite_gradient_at_scale_one_still_raises(debug_config):
    trainer = Trainer(debug_config("train.precision=fp16"))
    state = trainer.grad_scaler.state_dict()
    trainer.grad_scaler.load_state_dict({**state, "scale": 1.0})
    next(trainer.model.parameters()).register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.raises(NonFiniteLossError, match="gradient norm"):
        trainer.train_step()


def test_fp16_with_fsdp_is_refused(debug_config):
    with pytest.raises(ConfigError, match=r"fp16.*fsdp.*bf16"):
        Trainer(debug_config("train.precision=fp16", "train.parallel=fsdp"))


def test_fit_retries_a_skipped_step(debug_config):
    """An overflow inside fit: the step is redone at half the scale, every step is logged once
    and the run still ends at train.steps."""
    trainer = Trainer(debug_config("train.precision=fp16", "train.steps=4", "train.eval_every=0"))
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow of its own
    calls = []

    def overflow_third_backward(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.full_like(grad, math.inf) if len(calls) == 3 else grad

    next(trainer.model.parameters()).register_hook(overflow_third_backward)
    trainer.fit()
    records = train_records(trainer)
    assert len(calls) == 5 and trainer.step == 4 and trainer.scheduler.last_epoch == 4
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss_scale"] for r in records] == [2.0**8, 2.0**8, 2.0**7, 2.0**7]
    assert all(math.isfinite(r["grad_norm"]) for r in records)


@pytest.mark.slow
def test_fp16_under_ddp_equals_one_process(tmp_path, debug_config):
    """2 gloo ranks x 2 rows == 1 process x 4 rows in fp16 (the same loss scaling path), and the
    sharded checkpoint holds the scale for a resume."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    common = ["train.precision=fp16", "train.steps=4", "train.grad_accum=2", "train.eval_every=0"]
    ddp_dir = tmp_path / "ddp"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["-m", "nestlearn", "train", "debug", f"train.out_dir={ddp_dir}", "train.parallel=ddp"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*run, *args, *common], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = Trainer(debug_config(*common, out="one"))
    single.fit()
    ddp = [r for r in read_metrics(ddp_dir / "metrics.jsonl") if r["kind"] == "train"]
    one = train_records(single)
    for key in ("loss", "grad_norm", "loss_scale"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-4)
    resumed = Trainer.from_checkpoint(ddp_dir, {"train": {"parallel": "none"}})
    assert resumed.grad_scaler.state_dict() == single.grad_scaler.state_dict()
    resumed.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_trains_like_fp32(debug_config):
    """The CUDA scaler (torch.amp.GradScaler("cuda")) and float16 autocast on a GPU."""
    args = ("train.steps=6", "train.device=cuda")
    ref = train_records(fit(debug_config, "fp32", "train.precision=fp32", *args))
    fp16 = fit(debug_config, "fp16", "train.precision=fp16", *args)
    assert fp16.grad_scaler is not None and fp16.runtime.device.type == "cuda"
    for a, b in zip(ref, train_records(fp16), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.05)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.05)
