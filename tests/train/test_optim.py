from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nestlearn.config import OptimConfig
from nestlearn.train.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=0, schedule="constant")
    assert lr_factor(77, constant, 100) == 1.0


def test_scheduler_drives_the_optimizer_lr():
    model = nn.Linear(3, 3)
    cfg = OptimConfig(lr=0.5, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:2] == [pytest.approx(0.25), pytest.approx(0.5)]
    assert seen[3] == pytest.approx(0.5 * lr_factor(3, cfg, 10))
    assert not math.isnan(seen[-1])


def test_decay_only_on_linear_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias
