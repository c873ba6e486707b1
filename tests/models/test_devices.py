"""Every model on every accelerator: forward and backward in float32 and under bfloat16
autocast, against the same model on the CPU in float32; decoding under autocast; the ``fla``
kernels against ours.

Only accelerator devices are parametrized here (the CPU runs these checks in test_autocast.py),
so without CUDA every case is skipped and the suite's CPU time is unchanged. ``pytest -k cuda``
selects them (benchmarks/gpu.sh).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nestlearn.memory.matrix import fla_kernels
from nestlearn.models.registry import available_models, model_config_class
from tests.conftest import device_params
from tests.hf.tiny import VOCAB, tiny_model

ACCELERATORS = pytest.mark.parametrize("device", device_params(cpu=False))
MODELS = pytest.mark.parametrize("name", available_models())
# Relative to the largest float32 entry. float32 on the GPU differs from the CPU by summation
# order and TF32 convolutions (cuDNN's default); bfloat16 as in test_autocast.py.
TOLERANCE = {
    torch.float32: {"loss": 2e-3, "logits": 2e-3, "grads": 5e-3},
    torch.bfloat16: {"loss": 3e-2, "logits": 3e-2, "grads": 5e-2},
}
MATRIX_MODELS = [
    name for name in available_models() if hasattr(model_config_class(name)(), "kernel")
]


def tokens_of(T: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, T), generator=gen).to(device)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.isfinite(actual).all(), f"{what} not finite"
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= rtol, f"{what}: max error {error:.3g} of the largest entry > {rtol}"


def loss_logits_grads(model, tokens: torch.Tensor):
    logits, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    return loss, logits, flat


def autocast(device: str, dtype: torch.dtype):
    """bfloat16 autocast on ``device``; float32: no autocast."""
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


@ACCELERATORS
@MODELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_backward_on_the_device_equal_the_cpu(name, device, dtype):
    model = tiny_model(name).train()
    tokens = tokens_of(17, seed=1)
    loss32, logits32, grads32 = loss_logits_grads(model, tokens)
    moved = copy.deepcopy(model).to(device)
    with autocast(device, dtype):
        loss, logits, grads = loss_logits_grads(moved, tokens.to(device))
    tol = TOLERANCE[dtype]
    assert logits.device.type == device and torch.isfinite(loss)
    assert_near(loss, loss32, tol["loss"], "loss")
    assert_near(logits, logits32, tol["logits"], "logits")
    assert_near(grads, grads32, tol["grads"], "gradients")


@ACCELERATORS
@MODELS
def test_decoding_on_the_device_under_autocast_matches_the_full_forward(name, device):
    model = tiny_model(name).to(device)
    tokens = tokens_of(12, seed=2, device=device)
    with torch.no_grad(), autocast(device, torch.bfloat16):
        full, _ = model(tokens)
        state = model.init_state(2, device=device)
        steps = []
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
            steps.append(logits)
    assert_near(torch.cat(steps, 1), full, TOLERANCE[torch.bfloat16]["logits"], "decoding")
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.device.type == device, key
            assert value.dtype == torch.float32, key  # memory states stay float32


@pytest.mark.skipif(not fla_kernels.fla_installed(), reason="needs flash-linear-attention")
@ACCELERATORS
@pytest.mark.parametrize("name", MATRIX_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_kernels_train_like_ours(name, device, dtype):
    # Head dim 32: fla's Triton kernels want at least 16.
    ours = tiny_model(name, d_model=64, kernel="torch").train().to(device)
    theirs = tiny_model(name, d_model=64, kernel="fla").train().to(device)
    theirs.load_state_dict(ours.state_dict())
    tokens = tokens_of(70, seed=3, device=device)
    with autocast(device, dtype):
        expected = loss_logits_grads(ours, tokens)
        actual = loss_logits_grads(theirs, tokens)
    tol = TOLERANCE[dtype]
    for what, a, e in zip(("loss", "logits", "grads"), actual, expected, strict=True):
        assert_near(a, e, tol[what], what)
