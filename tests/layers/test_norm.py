"""RMSNorm through ``torch.nn.functional.rms_norm``: the formula, its gradients, mixed dtypes."""

from __future__ import annotations

import warnings

import torch

from nestlearn.layers.norm import RMSNorm


def formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_values_and_gradients_equal_the_formula_in_float64():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    got = norm(x)
    want = formula(x, norm.weight, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, norm.weight), up)
    want_grads = torch.autograd.grad(want, (x, norm.weight), up)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_low_precision_input_with_a_float32_gain_is_normalised_in_float32():
    # bf16 activations (autocast) and a float32 gain: the result is x_hat rounded to bf16 times
    # the float32 gain, in float32, as before the switch to F.rms_norm.
    torch.manual_seed(0)
    norm = RMSNorm(16)
    torch.nn.init.normal_(norm.weight)
    x = (3 * torch.randn(4, 16)).to(torch.bfloat16)
    got = norm(x)
    assert got.dtype == torch.float32
    x_hat = formula(x.double(), torch.ones(16, dtype=torch.float64), 1e-6).to(torch.bfloat16)
    want = x_hat.double() * norm.weight.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_float16_squares_do_not_overflow():
    norm = RMSNorm(16).half()
    x = torch.full((2, 16), 300.0, dtype=torch.float16)  # 300² > float16's max 65504
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.ones(2, 16), rtol=1e-3, atol=1e-3)


def test_a_float64_input_with_a_float32_gain_gives_no_dtype_warning():
    norm = RMSNorm(8)
    x = torch.randn(2, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, formula(x, norm.weight.double(), 1e-6))
