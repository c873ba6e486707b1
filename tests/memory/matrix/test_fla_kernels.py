"""The optional flash-linear-attention dispatch of the matrix memories.

On the CPU a stand-in ``fla`` package (our reference behind fla's time-major signatures) checks
the dispatch itself: which kernel each variant calls, the layouts and gates it passes and how the
results come back. On a GPU with fla installed, fla's kernels are checked against our chunk form.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.layers.matrix_memory import VARIANTS, MatrixMemoryMixer
from nestlearn.memory.matrix import fla_kernels
from nestlearn.memory.matrix.forms import matrix_memory_reference
from nestlearn.models.registry import build_model


def _head_first(x):
    return None if x is None else x.transpose(1, 2)


def _fake_kernel(objective: str, calls: list, *, gated: bool, with_beta: bool):
    def kernel(*, q, k, v, scale, initial_state, output_final_state, g=None, beta=None):
        B, T, H, _ = q.shape
        for gate in (g, beta):
            assert gate is None or gate.shape == (B, T, H)
        assert initial_state is None or initial_state.dtype == torch.float32
        assert (g is not None) == gated and (beta is not None) == with_beta
        calls.append(objective)
        o, state = matrix_memory_reference(
            _head_first(q),
            _head_first(k),
            _head_first(v),
            log_alpha=_head_first(g),
            beta=_head_first(beta),
            objective=objective,
            scale=scale,
            initial_state=initial_state,
            output_final_state=True,
        )
        return o.transpose(1, 2), state if output_final_state else None

    return kernel


@pytest.fixture
def fake_fla(monkeypatch):
    """Installs a stand-in ``fla`` and pretends CPU tensors are on CUDA; yields the call log."""
    calls: list[str] = []
    modules = {
        "fla": types.ModuleType("fla"),
        "fla.ops": types.ModuleType("fla.ops"),
        "fla.ops.simple_gla": types.ModuleType("fla.ops.simple_gla"),
        "fla.ops.delta_rule": types.ModuleType("fla.ops.delta_rule"),
        "fla.ops.gated_delta_rule": types.ModuleType("fla.ops.gated_delta_rule"),
    }

    def simple_gla(*, g=None, **kw):  # g may be None (linear attention)
        return _fake_kernel("dot", calls, gated=g is not None, with_beta=False)(g=g, **kw)

    modules["fla.ops.simple_gla"].chunk_simple_gla = simple_gla
    modules["fla.ops.delta_rule"].chunk_delta_rule = _fake_kernel(
        "l2", calls, gated=False, with_beta=True
    )
    modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = _fake_kernel(
        "l2", calls, gated=True, with_beta=True
    )
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fla_kernels, "fla_installed", lambda: True)
    monkeypatch.setattr(fla_kernels, "on_cuda", lambda x: True)
    return calls


def _mixers(variant: str, kernel: str) -> tuple[MatrixMemoryMixer, MatrixMemoryMixer]:
    torch.manual_seed(0)
    ours = MatrixMemoryMixer(variant, 24, 2, 12, chunk_size=8)
    theirs = MatrixMemoryMixer(variant, 24, 2, 12, chunk_size=8, kernel=kernel)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_state", [False, True])
def test_dispatch_maps_each_variant_to_its_kernel(fake_fla, variant, with_state):
    ours, theirs = _mixers(variant, "fla")
    x = torch.randn(2, 19, 24, requires_grad=True)
    state = ours.init_state(2) if with_state else None
    if with_state:
        state["memory"] = torch.randn_like(state["memory"]) * 0.1
    y_ours, s_ours = ours(x, state)
    y_fla, s_fla = theirs(x, state)
    assert fake_fla, "the fla path was not taken"
    torch.testing.assert_close(y_fla, y_ours, atol=1e-5, rtol=1e-5)
    if with_state:
        torch.testing.assert_close(s_fla["memory"], s_ours["memory"], atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *ours.parameters()])
    g_fla = torch.autograd.grad(y_fla.square().sum(), [x, *theirs.parameters()])
    for a, b in zip(g_fla, g_ours, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decoding_one_token_stays_on_the_recurrent_step(fake_fla):
    _, mixer = _mixers("gated_deltanet", "fla")
    mixer(torch.randn(1, 1, 24), mixer.init_state(1))
    assert fake_fla == []


def test_auto_falls_back_where_fla_cannot_run():
    ours, auto = _mixers("deltanet", "auto")
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    ours.double(), auto.double()
    assert torch.equal(auto(x)[0], ours(x)[0])  # CPU and float64: our chunk form, bit for bit


def test_explicit_fla_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(fla_kernels, "fla_installed", lambda: True)
    mixer = MatrixMemoryMixer("gla", 24, 2, 12, kernel="fla")
    with pytest.raises(RuntimeError, match=r"CUDA only.*model.kernel=auto"):
        mixer(torch.randn(1, 10, 24))


def test_unknown_or_missing_kernel_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="torch, fla, auto"):
        fla_kernels.check_kernel("triton")
    monkeypatch.setattr(fla_kernels, "fla_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install"):
        MatrixMemoryMixer("gla", 24, 2, 12, kernel="fla")
    cfg = load_config("debug", ["model.name=deltanet", "model.kernel=fla", "model.vocab_size=64"])
    with pytest.raises(ConfigError, match=r"model.kernel.*pip install"):
        build_model(cfg.model)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_kernels.fla_installed()),
    reason="needs a CUDA GPU and flash-linear-attention (pip install 'nestlearn[fla]')",
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fla_kernels_equal_our_chunk_form_on_the_gpu(variant):
    ours, theirs = _mixers(variant, "fla")
    ours.cuda(), theirs.cuda()
    x = torch.randn(2, 200, 24, device="cuda", requires_grad=True)
    state = ours.init_state(2, device="cuda")
    y_ours, s_ours = ours(x, state)
    y_fla, s_fla = theirs(x, state)
    torch.testing.assert_close(y_fla, y_ours, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s_fla["memory"], s_ours["memory"], atol=2e-3, rtol=2e-3)
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *ours.parameters()])
    g_fla = torch.autograd.grad(y_fla.square().sum(), [x, *theirs.parameters()])
    for a, b in zip(g_fla, g_ours, strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
