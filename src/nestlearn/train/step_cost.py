"""What one training step of a config costs: its FLOPs (the model's count) and, measured on this
machine, its time (``nestlearn info CONFIG --cost``).

A step is what the trainer does per optimizer step at ``grad_accum = 1``: forward on
``train.batch_size × train.seq_len`` tokens under the run's autocast, float32 cross-entropy,
backward, gradient clipping, the optimizer step. FLOPs are ``model.flops_per_token(T) · B · T``
(forward + backward, matmuls only, PaLM-style; the count ``nestlearn bench train`` reports MFU
against). The timing runs on random tokens (a step's cost does not depend on their values).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nestlearn.config.schema import RunConfig
from nestlearn.models.registry import build_model
from nestlearn.train.optim import build_optimizer
from nestlearn.train.runtime import setup_runtime


@dataclass(frozen=True)
class StepCost:
    """One step's FLOPs and, when measured, its median time (``seconds``; None if not timed)."""

    batch_size: int
    seq_len: int
    flops: float
    seconds: float | None = None
    device: str = ""
    threads: int = 0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def describe(self, steps: int) -> str:
        """Lines for ``nestlearn info``: the FLOPs, and the time of one step and of ``steps``."""
        head = (
            f"training step: {self.batch_size} x {self.seq_len} = {self.tokens:,} tokens, "
            f"{self.flops / 1e9:,.2f} GFLOP forward + backward (the model's count)"
        )
        if self.seconds is None:
            return f"{head}\n(`nestlearn info ... --cost` times one on this machine)"
        rate = self.flops / self.seconds / 1e9
        total = self.seconds * steps
        return (
            f"{head}\nmeasured here ({self.device}, {self.threads} thread(s)): "
            f"{self.seconds:.3f} s per step, {self.tokens / self.seconds:,.0f} tokens/s, "
            f"{rate:.2f} GFLOP/s; train.steps={steps:,} take about {_duration(total)}"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def step_flops(model: torch.nn.Module, cfg: RunConfig) -> StepCost:
    """The step's FLOPs from the model's count (works on the meta device)."""
    B, T = cfg.train.batch_size, cfg.train.seq_len
    return StepCost(B, T, float(model.flops_per_token(T)) * B * T)


def random_token_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Any, cfg: RunConfig
) -> Callable[[], float]:
    """A training step on one fixed batch of random tokens (``train.batch_size ×
    train.seq_len``, ids below ``model.vocab_size``), as the trainer takes it: forward under the
    run's autocast, float32 cross-entropy, backward, gradient clipping (``optim.grad_clip``),
    the optimizer step. Each call returns the loss."""
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=runtime.device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with runtime.autocast():
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def measure_step_cost(cfg: RunConfig, steps: int = 2, warmup: int = 1) -> StepCost:
    """Build ``cfg``'s model and optimizer on the run's device and time ``steps`` training steps
    after ``warmup`` untimed ones; the median step. ``cfg.model.vocab_size`` must be set."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    runtime = setup_runtime(cfg.train)
    device = runtime.device
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    step = random_token_step(model, build_optimizer(model, cfg.optim), runtime, cfg)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    cost = step_flops(model, cfg)
    return StepCost(
        B, T, cost.flops, statistics.median(times), str(device), torch.get_num_threads()
    )
