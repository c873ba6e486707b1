"""DMGD's two forms: ``form="paper"`` is SPEC §3 as printed (value 𝟏, read ``m(g)``, retention on
every map), checked against SPEC's equations written out by hand in float64; ``form="ours"`` stays
the default (its own tests are in test_equivalence.py)."""

from __future__ import annotations

import pytest
import torch

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.optim import DeepMomentum
from nestlearn.train.optim import build_optimizer

DT = torch.float64


def paper_reference(w0, grads, maps, *, alpha, eta, wd):
    """SPEC §3 with a depth-2 tanh memory ``m(x) = A2 tanh(A1 x)``, gradients by hand:
    ``L = Σ_j 𝟏ᵀ A2 tanh(A1 g_j)``, ``∇A2 = 𝟏 Σ_j tanh(A1 g_j)ᵀ``,
    ``∇A1 = Σ_j ((A2ᵀ 𝟏) ⊙ tanh'(A1 g_j)) g_jᵀ``; ``A ← α A − η ∇A``;
    ``W ← (1 − η λ) W + m(g)`` (rows ``m(g_j)``)."""
    a1, a2 = maps
    w = w0.clone()
    for g in grads:
        pre = g @ a1.T  # [n, h]: row j is A1 g_j
        ones = torch.ones(a2.shape[0], dtype=DT)
        grad_a2 = torch.outer(ones, torch.tanh(pre).sum(0))
        grad_a1 = ((a2.T @ ones) * (1 - torch.tanh(pre) ** 2)).T @ g
        a1, a2 = alpha * a1 - eta * grad_a1, alpha * a2 - eta * grad_a2
        w = (1 - eta * wd) * w + torch.tanh(g @ a1.T) @ a2.T
    return w, (a1, a2)


def test_paper_form_is_spec_written_by_hand():
    gen = torch.Generator().manual_seed(0)
    n, d, h = 5, 4, 3
    w = torch.randn(n, d, generator=gen, dtype=DT).requires_grad_(True)
    opt = DeepMomentum([w], lr=0.1, momentum=0.8, depth=2, hidden=h, form="paper", weight_decay=0.3)
    start_maps = opt.init_memory(w, opt.param_groups[0])
    assert [m.shape for m in start_maps] == [(h, d), (d, h)]  # m: R^d -> R^d
    grads = [torch.randn(n, d, generator=gen, dtype=DT) for _ in range(6)]
    expected, maps = paper_reference(w.detach(), grads, start_maps, alpha=0.8, eta=0.1, wd=0.3)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-13)
    for i, m in enumerate(maps):
        torch.testing.assert_close(opt.state[w][f"w.{i}"], m, rtol=0, atol=1e-13)


def test_paper_form_with_a_linear_memory_moves_each_row_by_a_constant():
    """Depth 1: ``M_{i+1} = α M_i − η 𝟏 (g_iᵀ𝟏)ᵀ = 𝟏 c_{i+1}ᵀ`` and ``W_{i+1} = W_i + (g_i
    c_{i+1}) 𝟏ᵀ``: not momentum (module docstring), a rank-one row-constant update."""
    gen = torch.Generator().manual_seed(1)
    n, d, alpha, eta = 4, 6, 0.9, 0.1
    w = torch.randn(n, d, generator=gen, dtype=DT).requires_grad_(True)
    opt = DeepMomentum([w], lr=eta, momentum=alpha, depth=1, form="paper")
    expected, c = w.detach().clone(), torch.zeros(d, dtype=DT)
    for _ in range(5):
        g = torch.randn(n, d, generator=gen, dtype=DT)
        c = alpha * c - eta * g.sum(0)
        expected = expected + torch.outer(g @ c, torch.ones(d, dtype=DT))
        w.grad = g
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        opt.state[w]["w.0"], torch.outer(torch.ones(d, dtype=DT), c), rtol=0, atol=1e-13
    )


def test_paper_form_retains_every_map_and_ours_only_the_output_map():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, generator=gen, dtype=DT).requires_grad_(True)
    g = torch.randn(5, 4, generator=gen, dtype=DT)
    results = {}
    for form in ("paper", "ours"):
        for alpha in (0.8, 0.4):
            p = w.detach().clone().requires_grad_(True)
            opt = DeepMomentum([p], lr=0.0, momentum=alpha, form=form)
            maps = [m + 1.0 for m in opt.init_memory(p, opt.param_groups[0])]  # nonzero maps
            opt.state[p].update({f"w.{i}": m for i, m in enumerate(maps)})
            p.grad = g
            opt.step()
            results[form, alpha] = [opt.state[p][f"w.{i}"] for i in range(2)]
    for i in range(2):  # η = 0: the write is the retention alone
        torch.testing.assert_close(results["paper", 0.4][i], 0.5 * results["paper", 0.8][i])
    torch.testing.assert_close(results["ours", 0.4][0], results["ours", 0.8][0])
    torch.testing.assert_close(results["ours", 0.4][1], 0.5 * results["ours", 0.8][1])


def test_default_form_is_ours_and_the_forms_differ():
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5, 4, generator=gen, dtype=DT)
    grads = [torch.randn(5, 4, generator=gen, dtype=DT) for _ in range(3)]
    out = {}
    for form in (None, "ours", "paper"):
        p = start.clone().requires_grad_(True)
        opt = DeepMomentum([p], lr=0.1) if form is None else DeepMomentum([p], lr=0.1, form=form)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[form] = p.detach()
    assert torch.equal(out[None], out["ours"])
    assert not torch.allclose(out["paper"], out["ours"])


def test_paper_form_state_dict_round_trip_and_bad_options():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(5, 4, generator=gen, dtype=DT).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    opt_a = DeepMomentum([a], lr=0.1, form="paper")
    g = torch.randn(5, 4, generator=gen, dtype=DT)
    a.grad = g.clone()
    opt_a.step()
    opt_b = DeepMomentum([b], lr=0.1, form="paper")
    opt_b.load_state_dict(opt_a.state_dict())
    with torch.no_grad():
        b.copy_(a)
    for p in (a, b):
        p.grad = 2 * g
    opt_a.step()
    opt_b.step()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="form='bad'"):
        DeepMomentum([a], form="bad")
    with pytest.raises(ValueError, match="objective='dot'"):
        DeepMomentum([a], form="paper", objective="l2")


def test_config_key_selects_the_paper_form():
    cfg = load_config("debug", ["optim.name=dmgd", "optim.dmgd_form=paper"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    optimizer = build_optimizer(model, cfg.optim)
    groups = [g for part in optimizer.parts.values() for g in part.param_groups if "form" in g]
    assert groups and all(g["form"] == "paper" for g in groups)
    with pytest.raises(ConfigError, match="dmgd_form"):
        load_config("debug", ["optim.dmgd_form=printed"])
    with pytest.raises(ConfigError, match="dmgd_objective=dot"):
        load_config("debug", ["optim.dmgd_form=paper", "optim.dmgd_objective=l2"])
