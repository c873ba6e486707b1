"""The hybrid optimizer (matrices to a deep optimizer, the rest to AdamW) and build_optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nestlearn.config import OptimConfig, load_config
from nestlearn.config.loader import _CHOICES
from nestlearn.errors import ConfigError
from nestlearn.optim import (
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaGD,
    DeltaMomentum,
    HybridOptimizer,
    MomentumMemory,
    Muon,
    PreconditionedMomentum,
    hybrid,
    split_parameters,
)
from nestlearn.train.optim import MATRIX_LR, build_optimizer, build_scheduler

DT = torch.float64


class Tiny(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(tokens))))


def loss_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.roll(1).reshape(-1))


def tiny(tied: bool = False) -> Tiny:
    torch.manual_seed(0)
    return Tiny(tied).to(DT)


@pytest.mark.parametrize("tied", [False, True])
def test_split_sends_only_hidden_matrices_to_the_matrix_side(tied):
    model = tiny(tied)
    matrices, others = split_parameters(model)
    assert [p.shape for p in matrices] == [(8, 6), (6, 8)]
    assert {id(p) for p in others} == {id(p) for p in model.parameters()} - {
        id(p) for p in matrices
    }
    assert len(others) == (5 if tied else 6)  # embed, 2 biases, 2 norm (+ untied head)


def test_hybrid_steps_like_its_parts():
    model, twin = tiny(), tiny()
    opt = hybrid(model, lambda ps: Muon(ps, lr=0.02), lr=1e-2, weight_decay=0.1)
    matrices, others = split_parameters(twin)
    muon = Muon(matrices, lr=0.02)
    decay = [twin.head.weight]
    rest = [p for p in others if p is not twin.head.weight]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        for o in (muon, adamw):
            o.zero_grad()
        loss_of(twin, step).backward()
        muon.step()
        adamw.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert list(opt.parts) == ["adamw", "matrix"]


def test_hybrid_scheduler_state_dict_and_closure():
    model = tiny()
    opt = hybrid(model, lambda ps: DeltaMomentum(ps, lr=0.05), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for _ in range(2):
        calls = []

        def closure(calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            return loss

        assert torch.isfinite(opt.step(closure)) and calls == [1]
        sched.step()
    lrs = [g["lr"] for part in opt.parts.values() for g in part.param_groups]
    assert lrs == pytest.approx([1e-2 / 4] * (len(lrs) - 1) + [0.05 / 4])
    # Round trip through torch.save / torch.load(weights_only=True), then identical steps.
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    twin_opt = hybrid(twin, lambda ps: DeltaMomentum(ps, lr=0.05), lr=1e-2)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda t: 0.5**t)
    twin_opt.load_state_dict(saved["opt"])
    twin_sched.load_state_dict(saved["sched"])
    for m, o, s in ((model, opt, sched), (twin, twin_opt, twin_sched)):
        for step in range(2):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
            s.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_hybrid_errors():
    model = tiny()
    with pytest.raises(ValueError, match="two parts"):
        HybridOptimizer(
            {"a": torch.optim.SGD(model.parameters()), "b": torch.optim.SGD(model.parameters())}
        )
    opt = hybrid(model, lambda ps: Muon(ps))
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    other = hybrid(nn.Linear(3, 3), lambda ps: Muon(ps))
    with pytest.raises(ValueError, match="parts"):
        opt.load_state_dict({"parts": {"matrix": other.parts["matrix"].state_dict()}})


EXPECTED = {
    "adam_memory": AdamMemory,
    "momentum": MomentumMemory,
    "preconditioned": PreconditionedMomentum,
    "delta_momentum": DeltaMomentum,
    "dmgd": DeepMomentum,
    "muon": Muon,
    "dgd": DeltaGD,
    "m3": M3,
}


def test_config_names_are_the_built_optimizers():
    assert set(_CHOICES[("optim", "name")]) == {"adamw", *MATRIX_LR} == {"adamw", *EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_build_optimizer_routes_matrices_to_the_named_optimizer(name):
    model = tiny()
    cfg = OptimConfig(name=name, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, HybridOptimizer)
    assert isinstance(opt.parts["matrix"], EXPECTED[name])
    assert isinstance(opt.parts["adamw"], torch.optim.AdamW)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(2):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        sched.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    peak = opt.parts["matrix"].param_groups[0]["initial_lr"]
    assert peak == (MATRIX_LR[name] or cfg.lr)


def test_adamw_is_unchanged_and_matrix_lr_overrides():
    model = tiny()
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW
    opt = build_optimizer(model, OptimConfig(name="muon", matrix_lr=0.123))
    assert opt.parts["matrix"].param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize(
    "override",
    [
        "optim.name=sgd",
        "optim.momentum=1.0",
        "optim.matrix_lr=-1",
        "optim.delta_gamma=1.5",
        "optim.dmgd_objective=huber",
        "optim.preconditioner=full",
        "optim.m3_beta1=0",
        "optim.ns_steps=0",
    ],
)
def test_bad_optim_config_is_refused(override):
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(ConfigError, match=key):
        load_config("debug", [override])


def test_dgd_config_sends_non_linear_matrices_to_adamw():
    model = tiny()
    model.conv = nn.Conv1d(6, 6, 3).to(DT)
    opt = build_optimizer(model, OptimConfig(name="dgd"))
    dgd = {id(p) for g in opt.parts["matrix"].param_groups for p in g["params"]}
    assert dgd == {id(model.block[0].weight), id(model.block[2].weight)}
    assert any(p is model.conv.weight for g in opt.parts["adamw"].param_groups for p in g["params"])
