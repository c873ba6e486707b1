"""The functional core against autograd and its closed forms."""

from __future__ import annotations

import pytest
import torch

from nestlearn.errors import ConfigError
from nestlearn.memory.core.rules import (
    OBJECTIVES,
    dgd_projection,
    get_objective,
    linear_gradient,
    momentum,
    retain,
)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_error_is_the_gradient_of_the_objective(name):
    objective = get_objective(name)
    pred = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(objective.value(pred, target).sum(), pred)
    torch.testing.assert_close(objective.error(pred, target), grad)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_linear_gradient_is_the_weight_gradient(name):
    objective = get_objective(name)
    W = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)  # [heads, out, in]
    x = torch.randn(2, 3, dtype=torch.float64)
    target = torch.randn(2, 4, dtype=torch.float64)
    pred = (W @ x.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(objective.value(pred, target).sum(), W)
    torch.testing.assert_close(linear_gradient(objective.error(pred, target), x), grad)


def test_delta_rule_is_gd_on_l2():
    # W − η (W k − v) kᵀ = W (I − η k kᵀ) + η v kᵀ.
    W, k, v = torch.randn(4, 3), torch.randn(3), torch.randn(4)
    eta = 0.3
    step = W - eta * linear_gradient(get_objective("l2").error(W @ k, v), k)
    closed = W @ (torch.eye(3) - eta * torch.outer(k, k)) + eta * torch.outer(v, k)
    torch.testing.assert_close(step, closed)
    torch.testing.assert_close(
        dgd_projection(W, k, eta), W @ (torch.eye(3) - eta * torch.outer(k, k))
    )


def test_momentum_and_retention_broadcast_per_token_gates():
    S, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mu, eta = torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])
    expected = mu[:, None, None] * S - eta[:, None, None] * g
    torch.testing.assert_close(momentum(S, g, mu, eta), expected)
    torch.testing.assert_close(momentum(None, g, mu, eta), -eta[:, None, None] * g)
    torch.testing.assert_close(retain(S, mu), mu[:, None, None] * S)
    assert retain(S, None) is S


def test_dgd_projection_is_non_expansive_for_unit_inputs():
    torch.manual_seed(0)
    for _ in range(20):
        W = torch.randn(5, 6, dtype=torch.float64)
        x = torch.nn.functional.normalize(torch.randn(6, dtype=torch.float64), dim=0)
        eta = float(torch.rand(())) * 2
        assert torch.linalg.matrix_norm(dgd_projection(W, x, eta), ord=2) <= (
            torch.linalg.matrix_norm(W, ord=2) + 1e-12
        )


def test_unknown_objective_lists_the_choices():
    with pytest.raises(ConfigError, match="dot, l2, huber"):
        get_objective("cosine")
