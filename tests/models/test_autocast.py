"""Every model trains and decodes in bfloat16 and float16: under CPU autocast and with 16-bit
parameters, close to float32.

The memories compute in float32 inside (``nestlearn.memory.core.precision``): their states,
gates' log-space sums, triangular solves and inner updates; the states stay float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.memory.matrix.forms import matrix_memory
from nestlearn.models.registry import available_models
from tests.hf.tiny import VOCAB, tiny_model

# Relative tolerances, from the largest float32 entry (measured at most 0.0065 for the logits and
# 0.009 for the gradients in bfloat16, 0.0009 and 0.0011 in float16).
TOLERANCE = {
    torch.bfloat16: {"loss": 3e-2, "logits": 3e-2, "grads": 5e-2},
    torch.float16: {"loss": 5e-3, "logits": 5e-3, "grads": 1e-2},
}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp16"])
MODELS = pytest.mark.parametrize("name", available_models())


def tokens_of(T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    actual, expected = actual.detach().float(), expected.detach().float()
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


def decode(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One token at a time from the initial state: the logits ``[B, T, V]`` and the last state."""
    state = model.init_state(tokens.shape[0])
    outputs = []
    for t in range(tokens.shape[1]):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
    return torch.cat(outputs, 1), state


def check_training(model, dtype: torch.dtype) -> None:
    tokens = tokens_of(17, seed=1)
    loss32, logits32, grads32 = loss_logits_grads(model, tokens)
    # The backward runs inside autocast too, as in a training step under ``with autocast``.
    with torch.autocast("cpu", dtype=dtype):
        loss, logits, grads = loss_logits_grads(model, tokens)
    tol = TOLERANCE[dtype]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss32, rtol=tol["loss"], atol=0)
    assert_near(logits, logits32, tol["logits"], "logits")
    assert_near(grads, grads32, tol["grads"], "gradients")


def check_decoding(model, dtype: torch.dtype) -> None:
    tokens = tokens_of(12, seed=2)
    with torch.no_grad():
        full32, _ = model(tokens)
        with torch.autocast("cpu", dtype=dtype):
            full, _ = model(tokens)
            steps, state = decode(model, tokens)
    assert_near(full, full32, TOLERANCE[dtype]["logits"], "full forward")
    assert_near(steps, full, TOLERANCE[dtype]["logits"], "decoding")
    # Memory states (and short-conv caches) stay float32 from one token to the next.
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype == torch.float32, key


@DTYPES
@MODELS
def test_training_under_autocast_is_close_to_float32(name, dtype):
    check_training(tiny_model(name).train(), dtype)


@DTYPES
@MODELS
def test_decoding_under_autocast_matches_the_full_forward(name, dtype):
    check_decoding(tiny_model(name), dtype)


CMS_VARIANTS = [
    {"cms_variant": "nested"},
    {"cms_variant": "independent"},
    {"cms_objective": "local", "cms_optimizer": "momentum"},
    {"cms_optimizer": "dgd"},
]


@pytest.mark.parametrize("fields", CMS_VARIANTS, ids=lambda f: "-".join(map(str, f.values())))
def test_hope_cms_variants_train_and_decode_under_autocast(fields):
    check_training(tiny_model("hope", **fields).train(), torch.bfloat16)
    check_decoding(tiny_model("hope", **fields), torch.bfloat16)


@DTYPES
@MODELS
def test_a_model_with_16_bit_parameters_runs_and_decodes(name, dtype):
    model = tiny_model(name)
    tokens = tokens_of(12, seed=3)
    with torch.no_grad():
        full32, _ = model(tokens)
        model.to(dtype)
        full, _ = model(tokens)
        steps, _ = decode(model, tokens)
    assert full.dtype == dtype and steps.dtype == dtype
    assert_near(full, full32, TOLERANCE[dtype]["logits"], "full forward")
    assert_near(steps, full, TOLERANCE[dtype]["logits"], "decoding")


def test_memory_ops_are_untouched_in_float32_and_float64_and_keep_float32_states():
    g = torch.Generator().manual_seed(4)
    q, v = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 2, 9, 3, generator=g)
    k = F.normalize(torch.randn(2, 2, 9, 4, generator=g), dim=-1)
    gates = {"log_alpha": -torch.rand(2, 2, 9, generator=g), "beta": torch.rand(2, 2, 9)}
    run = dict(**gates, output_final_state=True, chunk_size=4)
    for cast in (torch.float32, torch.float64):
        args = [x.to(cast) for x in (q, k, v)]
        kwargs = {**run, **{key: x.to(cast) for key, x in gates.items()}}
        o, state = matrix_memory(*args, **kwargs)
        o_raw, state_raw = matrix_memory.__wrapped__(*args, **kwargs)
        assert torch.equal(o, o_raw) and torch.equal(state, state_raw)
    exact, exact_state = matrix_memory(q, k, v, **run)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, state = matrix_memory(q.bfloat16(), k.bfloat16(), v.bfloat16(), **run)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    # Only the inputs are rounded to bfloat16 (8 bits of mantissa); the rest is float32.
    torch.testing.assert_close(o.float(), exact, rtol=0, atol=2e-2)
    torch.testing.assert_close(state, exact_state, rtol=0, atol=2e-2)


def test_an_exported_hope_loads_in_bfloat16_and_generates(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from nestlearn.hf import to_hf

    model = tiny_model("hope")
    to_hf(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    tokens = tokens_of(9, seed=5)
    with torch.no_grad():
        logits = loaded(tokens).logits
        expected, _ = model(tokens)
    assert logits.dtype == torch.bfloat16
    assert_near(logits, expected, TOLERANCE[torch.bfloat16]["logits"], "bfloat16 HOPE")
    generated = loaded.generate(tokens, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 12)
