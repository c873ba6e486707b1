"""Every optimizer through the same checks: convergence, exact resume, groups, closures, errors."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from tests.optim.cases import CASES, CONVERGE_STEPS, DT, closure_for, mse, regression

NAMES = list(CASES)


def run(name: str, steps: int, seed: int = 0):
    model, x, y = regression(seed)
    opt = CASES[name].make(model)
    closure = closure_for(model, opt, x, y)
    for _ in range(steps):
        opt.step(closure)
    return model, opt, closure


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_convex_quadratic(name):
    model, x, y = regression()
    opt = CASES[name].make(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / CONVERGE_STEPS)
    closure = closure_for(model, opt, x, y)
    with torch.no_grad():
        start = float(mse(model, x, y))
    for _ in range(CONVERGE_STEPS):
        opt.step(closure)
        sched.step()
    with torch.no_grad():
        end = float(mse(model, x, y))
    assert end < CASES[name].converge_ratio * start, (start, end)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    """k steps, save (weights_only load), fresh optimizer on a copy, load: identical next steps."""
    model, opt, closure = run(name, steps=5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin, x, y = regression()
    twin.load_state_dict(model.state_dict())
    twin_opt = CASES[name].make(twin)
    twin_opt.load_state_dict(saved)
    twin_closure = closure_for(twin, twin_opt, x, y)
    for _ in range(4):
        opt.step(closure)
        twin_opt.step(twin_closure)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_none_grads_are_skipped_and_groups_keep_their_lr(name):
    model, x, y = regression()
    opt = CASES[name].make(model)
    weight, bias = model.weight, model.bias
    # Two groups: the weight moves, the bias (lr = 0) must not; then a step without its grad.
    opt.param_groups[0]["params"] = [weight]
    opt.add_param_group({"params": [bias], "lr": 0.0})
    before = bias.detach().clone()
    w0 = weight.detach().clone()
    closure_for(model, opt, x, y)()
    opt.step()
    assert torch.equal(bias, before)
    assert not torch.equal(weight, w0)
    w1 = weight.detach().clone()
    weight.grad = None
    opt.step()
    assert torch.equal(weight, w1)


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_evaluated_once_with_grad_enabled(name):
    model, x, y = regression()
    opt = CASES[name].make(model)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return closure_for(model, opt, x, y)()

    loss = opt.step(closure)
    assert calls == [True]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_float32_stays_float32(name):
    model, x, y = regression()
    model = model.float()
    opt = CASES[name].make(model)
    closure_for(model, opt, x.float(), y.float())()
    opt.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyper_parameters_are_refused_at_construction(name):
    model, _, _ = regression()
    opt = CASES[name].make(model)
    defaults = dict(opt.defaults)
    cls = type(opt)
    extra = {"model": model} if name == "dgd" else {}
    for key, bad in [("lr", -1e-3), *[(k, 1.0) for k in CASES[name].unit_keys]]:
        args = {k: v for k, v in defaults.items() if k in _init_args(cls)}
        args[key] = bad
        with pytest.raises(ValueError, match=key):
            cls(model.parameters(), **args, **extra)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name):
    model, _, _ = regression()
    opt = CASES[name].make(model)
    model.weight.grad = torch.zeros_like(model.weight).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].matrix_only and n != "dgd"])
def test_matrix_rules_refuse_vectors_unless_told_and_read_tensors_as_matrices(name):
    model, _, _ = regression()
    opt = CASES[name].make(model)
    cls = type(opt)
    args = {k: v for k, v in opt.defaults.items() if k in _init_args(cls)}
    args["vector_rule"] = None
    if hasattr(opt, "preconditioner"):
        args["preconditioner"] = opt.preconditioner
    with pytest.raises(ValueError, match="vector_rule"):
        cls([torch.zeros(3, dtype=DT, requires_grad=True)], **args)
    # A rank-3 parameter (a conv kernel) is updated as its [shape[0], -1] matrix.
    kernel = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)
    opt = cls([kernel], **args)
    kernel.grad = torch.randn_like(kernel)
    before = kernel.detach().clone()
    opt.step()
    assert kernel.shape == (4, 3, 2) and not torch.equal(kernel, before)


def _init_args(cls) -> set[str]:
    """Keyword arguments of ``cls``, following ``**kwargs`` to the parent's (Muon)."""
    params = inspect.signature(cls.__init__).parameters
    names = set(params)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names |= _init_args(cls.__mro__[1])
    return names


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dgd"])
def test_degenerate_shapes_stay_finite(name):
    """Row and column vectors as matrices, a 1×1 matrix, a scalar (via the 1-D fallback)."""
    model, _, _ = regression()
    cls = type(CASES[name].make(model))
    opt = CASES[name].make(model)
    args = {k: v for k, v in opt.defaults.items() if k in _init_args(cls)}
    if hasattr(opt, "preconditioner"):
        args["preconditioner"] = opt.preconditioner
    ps = [torch.randn(s, dtype=DT, requires_grad=True) for s in [(1, 4), (4, 1), (1, 1), ()]]
    opt = cls(ps, **args)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=DT)
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
