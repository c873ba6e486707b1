"""Titans' memory stays bounded on streams far longer than its training windows.

A ``titans_lmm`` trained on 32-token windows with ``chunk_size`` 64 diverged after ~320 tokens
(docs/titans-stability.md): chunked GD summed up to ``C · η/(1 − μ)`` of step over a chunk whose
keys were nearly aligned. Here the gates are pinned at their bounds (step at its maximum,
momentum at 0 / 0.5 / 0.95, no forgetting) and the keys aligned (a constant input) or random,
over 960 tokens = 30 training windows of 32.
"""

from __future__ import annotations

import pytest
import torch

from nestlearn.layers.neural_memory import NeuralMemoryMixer

T = 960  # 30 x a 32-token training window


def pinned(chunk: int, mu_bias: float, depth: int = 2, **options) -> NeuralMemoryMixer:
    """A memory whose gates sit at their bounds: ``η`` maximal, ``α = 1``, ``μ = σ(mu_bias)``."""
    torch.manual_seed(0)
    layer = NeuralMemoryMixer(16, 2, 8, depth=depth, chunk_size=chunk, **options)
    with torch.no_grad():
        for proj, bias in (
            (layer.eta_proj, 30.0),
            (layer.mu_proj, mu_bias),
            (layer.forget_proj, -30.0),
        ):
            proj.weight.zero_()
            proj.bias.fill_(bias)
    return layer


def stream(layer: NeuralMemoryMixer, inputs: str) -> tuple[torch.Tensor, float]:
    """Output over ``T`` tokens and the largest memory-weight norm at the end."""
    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(1))
    if inputs == "aligned":  # one input repeated: every key equal after the conv's warm-up
        x = x[:, :1].expand(1, T, 16).contiguous()
    with torch.no_grad():
        y, state = layer(x, layer.init_state(1))
    depth = len(layer.memory_weights)
    return y, max(state[f"memory.w.{i}"].norm().item() for i in range(depth))


@pytest.mark.parametrize("inputs", ["aligned", "random"])
@pytest.mark.parametrize("mu_bias", [-30.0, 0.0, 3.0])
@pytest.mark.parametrize("chunk", [1, 16])
def test_gates_at_their_bounds_keep_the_memory_bounded(chunk, mu_bias, inputs):
    layer = pinned(chunk, mu_bias)
    start = max(w.norm().item() for w in layer.memory_weights)
    y, norm = stream(layer, inputs)
    assert torch.isfinite(y).all()
    # Observed <= 1.5x the initial norm; a diverging memory is at 1e3+ or inf long before T.
    assert norm < 4 * start, (norm, start)


@pytest.mark.parametrize("depth", [1, 3])
def test_other_depths_stay_bounded(depth):
    layer = pinned(16, 0.0, depth=depth)
    start = max(w.norm().item() for w in layer.memory_weights)
    y, norm = stream(layer, "aligned")
    assert torch.isfinite(y).all() and norm < 4 * start


@pytest.mark.parametrize(
    "options", [{"step_scale": "token"}, {"ema_momentum": False}], ids=["token", "heavy_ball"]
)
def test_without_either_bound_the_same_stream_diverges(options):
    """The stress above is real: dropping either default (the unscaled per-token step, or
    momentum with gain ``1/(1 − μ)``) lets the same pinned memory blow up."""
    layer = pinned(16, 3.0, **options)
    y, norm = stream(layer, "aligned")
    assert not torch.isfinite(y).all() or norm > 1e3


def test_gate_parameterization():
    """``η = (1 − μ) · max_lr · σ(x W_η) / C`` by default; ``step_scale="token"`` drops ``1/C``
    and ``ema_momentum=False`` drops ``1 − μ`` (the earlier parameterization)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    layer = NeuralMemoryMixer(16, 2, 8, chunk_size=4, max_lr=0.5).double()
    for proj in (layer.eta_proj, layer.mu_proj, layer.forget_proj):
        torch.nn.init.normal_(proj.weight, std=3.0)
    step = 0.5 * torch.sigmoid(layer.eta_proj(x)).transpose(1, 2)
    mu = torch.sigmoid(layer.mu_proj(x)).transpose(1, 2)
    alpha = 1 - torch.sigmoid(layer.forget_proj(x)).transpose(1, 2)
    for scale, ema, eta in [
        ("chunk", True, (1 - mu) * step / 4),
        ("chunk", False, step / 4),
        ("token", True, (1 - mu) * step),
        ("token", False, step),
    ]:
        layer.step_scale, layer.ema_momentum = scale, ema
        gates = layer._gates(x)
        torch.testing.assert_close(gates["eta"], eta)
        torch.testing.assert_close(gates["mu"], mu)
        torch.testing.assert_close(gates["alpha"], alpha)
    no_momentum = NeuralMemoryMixer(16, 2, 8, chunk_size=4, momentum=False).double()
    assert no_momentum._gates(x)["mu"] is None


def test_unknown_step_scale_is_refused():
    with pytest.raises(ValueError, match="step_scale"):
        NeuralMemoryMixer(16, 2, 8, step_scale="sum")


def test_chunk_equals_reference_with_the_bounded_gates():
    """SPEC S-1 / §2.3 at the layer: chunk form == sequential reference (float64, forward and
    gradients), a stream crossing several chunk boundaries."""
    torch.manual_seed(0)
    chunk = NeuralMemoryMixer(16, 2, 8, chunk_size=4).double()
    reference = NeuralMemoryMixer(16, 2, 8, chunk_size=4, mode="reference").double()
    reference.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    outputs, grads = [], []
    for layer in (chunk, reference):
        y, _ = layer(x)
        y.square().sum().backward()
        outputs.append(y)
        grads.append([p.grad for p in layer.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
