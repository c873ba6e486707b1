"""DGD as an outer optimizer: NL-29 for one token, the batched K-FAC-style form, hooks, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nestlearn.memory.core.rules import dgd_projection
from nestlearn.optim import DeltaGD
from tests.optim.cases import DT, mse, regression


def linear(d_in: int = 5, d_out: int = 4, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False).to(DT)


def reference(weight, grad, inputs, lr):
    """``(W − lr G)(I + lr C)^{-1}`` with ``C = mean x̂ x̂ᵀ``, by an explicit inverse."""
    x = inputs / inputs.norm(dim=-1, keepdim=True)
    gram = x.T @ x / len(x)
    eye = torch.eye(len(gram), dtype=DT)
    return (weight - lr * grad) @ torch.linalg.inv(eye + lr * gram)


def test_one_unit_token_is_nl29_with_the_rules_projection():
    layer = linear()
    opt = DeltaGD(layer.parameters(), model=layer, lr=0.7)
    x = torch.randn(1, 5, dtype=DT)
    x = x / x.norm()
    delta = torch.randn(1, 4, dtype=DT)
    w0 = layer.weight.detach().clone()
    # ⟨W x, δ⟩ has gradient δ xᵀ: the surprise δ at the output (NL-25/26).
    (layer(x) * delta).sum().backward()
    opt.step()
    eta = 0.7 / 1.7  # η' = η / (1 + η)
    expected = dgd_projection(w0, x[0], eta) - eta * torch.outer(delta[0], x[0])
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-14)


def test_batched_form_and_weight_decay():
    layer = linear()
    opt = DeltaGD(layer.parameters(), model=layer, lr=0.3, weight_decay=0.5)
    x = 3.0 * torch.randn(2, 7, 5, dtype=DT)
    w0 = layer.weight.detach().clone()
    layer(x).pow(2).mean().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    expected = reference((1 - 0.15) * w0, grad, x.reshape(-1, 5), 0.3)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-13)


def test_projection_alone_never_grows_the_weight():
    layer = linear(d_in=6, d_out=6)
    opt = DeltaGD(layer.parameters(), model=layer, lr=50.0)
    for _ in range(3):
        before = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        layer(torch.randn(9, 6, dtype=DT)).sum().mul(0).backward()  # G = 0, inputs captured
        opt.step()
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) <= before + 1e-12


def test_gradient_accumulation_equals_the_whole_batch():
    x = torch.randn(6, 3, 5, dtype=DT)
    target = torch.randn(6, 3, 4, dtype=DT)
    whole, parts = linear(), linear()
    opt_whole = DeltaGD(whole.parameters(), model=whole, lr=0.4)
    opt_parts = DeltaGD(parts.parameters(), model=parts, lr=0.4)
    for _ in range(2):
        opt_whole.zero_grad()
        (whole(x) - target).pow(2).mean().backward()
        opt_whole.step()
        opt_parts.zero_grad()
        for chunk, goal in zip(x.chunk(3), target.chunk(3), strict=True):
            ((parts(chunk) - goal).pow(2).mean() / 3).backward()
        opt_parts.step()
    torch.testing.assert_close(parts.weight, whole.weight, rtol=0, atol=1e-13)


def test_only_training_forwards_with_grad_are_captured():
    x = torch.randn(8, 5, dtype=DT)
    plain, noisy = linear(), linear()
    opt_plain = DeltaGD(plain.parameters(), model=plain, lr=0.4)
    opt_noisy = DeltaGD(noisy.parameters(), model=noisy, lr=0.4)
    plain(x).sum().backward()
    opt_plain.step()
    noisy(x).sum().backward()
    with torch.no_grad():
        noisy(torch.randn(3, 5, dtype=DT))
    noisy.eval()
    noisy(torch.randn(3, 5, dtype=DT))
    noisy.train()
    opt_noisy.step()
    torch.testing.assert_close(noisy.weight, plain.weight, rtol=0, atol=0)


def test_a_layer_used_twice_counts_both_inputs():
    layer = linear(d_in=4, d_out=4)
    opt = DeltaGD(layer.parameters(), model=layer, lr=0.2)
    x = torch.randn(5, 4, dtype=DT)
    hidden = layer(x)
    w0 = layer.weight.detach().clone()
    layer(hidden).sum().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    inputs = torch.cat([x, hidden.detach()])
    torch.testing.assert_close(
        layer.weight.detach(), reference(w0, grad, inputs, 0.2), rtol=0, atol=1e-13
    )


def test_converges_to_the_minimizer_of_loss_plus_its_erase_penalty():
    """The fixed point solves G(W) + W C = 0: DGD minimizes ½E‖Wx − y‖² + ½E‖W x̂‖²."""
    model, x, y = regression(bias=False)
    opt = DeltaGD(model.parameters(), model=model, lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        mse(model, x, y).backward()
        opt.step()
    unit = x / x.norm(dim=-1, keepdim=True)
    second = x.T @ x / len(x) + unit.T @ unit / len(x)
    expected = (y.T @ x / len(x)) @ torch.linalg.inv(second)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-8)


def test_clear_errors():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).to(DT)
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        DeltaGD(model.parameters(), model=model, vector_rule="adam")
    with pytest.raises(ValueError, match=r"nn\.Module"):
        DeltaGD(model[1].parameters(), model=None)
    layer = linear()
    opt = DeltaGD(layer.parameters(), model=layer)
    layer.weight.grad = torch.ones_like(layer.weight)
    with pytest.raises(ValueError, match="no inputs were captured"):
        opt.step()
    layer(torch.randn(2, 5, dtype=DT)).sum().backward()
    opt.zero_grad(set_to_none=False)  # clears the captured inputs as well as the grads
    with pytest.raises(ValueError, match="no inputs were captured"):
        opt.step()
    opt.remove_hooks()
    layer(torch.randn(2, 5, dtype=DT)).sum().backward()
    with pytest.raises(ValueError, match="no inputs were captured"):
        opt.step()
    with pytest.raises(ValueError, match="missing_inputs"):
        DeltaGD(layer.parameters(), model=layer, missing_inputs="skip")


def test_bypassed_layer_takes_plain_gradient_steps_when_asked():
    layer = linear()
    opt = DeltaGD(layer.parameters(), model=layer, lr=0.1, missing_inputs="gradient")
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 5, dtype=DT)
    nn.functional.linear(x, layer.weight).sum().backward()
    with pytest.warns(UserWarning, match="plain gradient"):
        opt.step()
    expected = w0 - 0.1 * layer.weight.grad
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-15)
