"""The Continuum Memory System layer: variants, error sources, decoding, level stacking, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from nestlearn.layers import RMSNorm, SwiGLU
from nestlearn.layers.cms import ContinuumMemory, Teacher

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 7


def toy_teacher(tokens: torch.Tensor) -> Teacher:
    """A fixed "head": ``∂ ½‖h − E[target]‖² / ∂h`` with a random table ``E``."""
    table = torch.randn(VOCAB, 6, generator=torch.Generator().manual_seed(0), dtype=DT)

    def error(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (h - table[targets]).detach()

    return Teacher(error, tokens)


def make_cms(
    variant: str = "sequential",
    objective: str = "local",
    optimizer: str = "gd",
    chunk_sizes=(3, 2),
    lrs=(0.05, 0.08),
    **kwargs,
) -> ContinuumMemory:
    torch.manual_seed(0)
    cms = ContinuumMemory(
        6,
        5,
        list(chunk_sizes),
        list(lrs),
        variant=variant,
        objective=objective,
        optimizer=optimizer,
        momentum=0.6,
        **kwargs,
    ).double()
    # Larger than the LM init, so that the in-context updates change the outputs visibly.
    cms.reset_parameters(std=0.4)
    if variant == "independent":
        with torch.no_grad():
            cms.agg_logits.copy_(torch.tensor([0.3, -0.2]))
    return cms


def inputs(B: int = 2, T: int = 9, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 6, generator=gen, dtype=DT)
    tokens = torch.randint(0, VOCAB, (B, T), generator=gen)
    return x, tokens


VARIANTS = ["sequential", "nested", "independent"]
CASES = [
    *itertools.product(VARIANTS, ["local", "teach"], ["gd", "dgd"]),
    ("sequential", "local", "momentum"),
    ("nested", "teach", "momentum"),
]


@pytest.mark.parametrize(("variant", "objective", "optimizer"), CASES)
def test_chunk_mode_equals_reference_mode_with_gradients(variant, objective, optimizer):
    chunk = make_cms(variant, objective, optimizer)
    reference = make_cms(variant, objective, optimizer, mode="reference")
    reference.load_state_dict(chunk.state_dict())
    x, tokens = inputs()
    teacher = toy_teacher(tokens) if objective == "teach" else None
    grads = []
    for module in (chunk, reference):
        xi = x.clone().requires_grad_()
        y, _ = module(xi, None, teacher)
        (y.pow(2).sum() + y.sum()).backward()
        grads.append((y, xi.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-11)
    for (name, _), a, b in zip(chunk.named_parameters(), grads[0][2], grads[1][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(("variant", "objective", "optimizer"), CASES)
def test_decoding_token_by_token_equals_the_full_pass(variant, objective, optimizer):
    cms = make_cms(variant, objective, optimizer)
    x, tokens = inputs(B=1, T=10)

    def teacher(t0: int, t1: int):
        return toy_teacher(tokens[:, t0:t1]) if objective == "teach" else None

    with torch.no_grad():
        full, _ = cms(x, None, teacher(0, 10))
        y, state = cms(x[:, :4], cms.init_state(1, dtype=DT), teacher(0, 4))
        outputs = [y]
        for t in range(4, 10):
            y, state = cms(x[:, t : t + 1], state, teacher(t, t + 1))
            outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-12, atol=1e-12)
    assert int(state["0.pos"]) == 10


@pytest.mark.parametrize("objective", ["local", "teach"])
def test_in_context_updates_change_the_outputs_after_the_first_chunk(objective):
    x, tokens = inputs()
    teacher = toy_teacher(tokens) if objective == "teach" else None
    learning = make_cms(objective=objective)
    frozen = make_cms(objective=objective, lrs=(0.0, 0.0))
    with torch.no_grad():
        y, _ = learning(x, None, teacher)
        y0, _ = frozen(x, None, teacher)
    # The faster level (C = 2) updates first, after token 1: tokens 0 and 1 are untouched.
    torch.testing.assert_close(y[:, :2], y0[:, :2], rtol=0, atol=1e-12)
    assert (y[:, 2:] - y0[:, 2:]).abs().max() > 1e-3


def test_nested_levels_restart_from_the_slower_level():
    # C = (4, 2): R(1) = 2·⌈4/2⌉ = 4; at tokens 0, 4, 8 level 1 takes level 0's weights.
    cms = make_cms("nested", chunk_sizes=(4, 2), lrs=(0.05, 0.1))
    x, _ = inputs(B=1, T=9)
    state = cms.init_state(1, dtype=DT)
    with torch.no_grad():
        for t in range(9):
            _, state = cms(x[:, t : t + 1], state)
            if (t + 1) % 4 == 0:
                # Level 0 just stepped; level 1 has not restarted yet (it does at token t + 1).
                assert not torch.equal(state["0.w1"], state["1.w1"])
                _, after = cms(x[:, t + 1 : t + 2], state)
                torch.testing.assert_close(after["1.w1"], state["0.w1"], rtol=0, atol=0)
    # Only level 0 owns meta-learned weights.
    names = [name for name, _ in cms.named_parameters()]
    assert "levels.0.w1" in names and "levels.1.w1" not in names


def test_nested_needs_chunk_sizes_slowest_first():
    with pytest.raises(ValueError, match=r"non-increasing chunk sizes, e.g. \[8, 2\]"):
        make_cms("nested", chunk_sizes=(2, 8))


def test_one_level_at_zero_lr_is_the_transformer_mlp():
    torch.manual_seed(3)
    mlp, norm = SwiGLU(6, 5).double(), RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    cms = make_cms(chunk_sizes=(2,), lrs=(0.0,))
    cms.init_level_from(0, mlp, norm)
    x, _ = inputs()
    torch.testing.assert_close(cms(x)[0], mlp(norm(x)), rtol=1e-12, atol=1e-12)
    # Independent copies of the same MLP with weights summing to 1 recover it too (SPEC §4).
    independent = make_cms("independent", chunk_sizes=(2, 4), lrs=(0.0, 0.0))
    for level in range(2):
        independent.init_level_from(level, mlp, norm)
    torch.testing.assert_close(independent(x)[0], mlp(norm(x)), rtol=1e-12, atol=1e-12)


# GPT-2's block (ungated tanh-GELU, biases, LayerNorm) and SwiGLU with biases.
BLOCKS = [
    {"mlp": "gelu_tanh", "bias": True, "norm": "layer"},
    {"mlp": "swiglu", "bias": True, "norm": "rms"},
]


def make_block_cms(variant: str, optimizer: str, block: dict, **kwargs) -> ContinuumMemory:
    cms = make_cms(variant, "teach", optimizer, **block, **kwargs)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in cms.named_parameters():
            if name.split(".")[-1] in ("b1", "b3", "b2", "bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=DT))
    return cms


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize(("variant", "optimizer"), [("sequential", "dgd"), ("independent", "gd")])
def test_other_blocks_chunk_equals_reference_and_decoding(block, variant, optimizer):
    chunk = make_block_cms(variant, optimizer, block)
    reference = make_block_cms(variant, optimizer, block, mode="reference")
    reference.load_state_dict(chunk.state_dict())
    x, tokens = inputs()
    grads = []
    for module in (chunk, reference):
        xi = x.clone().requires_grad_()
        y, _ = module(xi, None, toy_teacher(tokens))
        (y.pow(2).sum() + y.sum()).backward()
        grads.append((y, xi.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-11)
    for (name, _), a, b in zip(chunk.named_parameters(), grads[0][2], grads[1][2], strict=True):
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    with torch.no_grad():
        full, _ = chunk(x[:1], None, toy_teacher(tokens[:1]))
        state = chunk.init_state(1, dtype=DT)
        outputs = []
        for t in range(x.shape[1]):
            y, state = chunk(x[:1, t : t + 1], state, toy_teacher(tokens[:1, t : t + 1]))
            outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-12, atol=1e-12)
    # The biases learn in context too.
    assert not torch.equal(state["0.b1"][0], chunk.levels[0].b1)


def test_gpt2_mlp_and_zero_residual_levels_recover_the_mlp():
    torch.manual_seed(4)
    fc, proj, norm = torch.nn.Linear(6, 5), torch.nn.Linear(5, 6), torch.nn.LayerNorm(6, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    fc, proj, norm = fc.double(), proj.double(), norm.double()
    weights = {"w1": fc.weight, "b1": fc.bias, "w2": proj.weight, "b2": proj.bias}
    block = {"mlp": "gelu_tanh", "bias": True, "norm": "layer"}
    cms = make_cms(chunk_sizes=(2, 4), lrs=(0.0, 0.0), **block)
    cms.init_level_from(0, weights, norm)
    cms.init_level_from(1, weights, norm, zero_output=True)
    assert cms.levels[1].w2.abs().sum() == 0 and cms.levels[1].w1.abs().sum() > 0
    x, _ = inputs()
    expected = proj(torch.nn.functional.gelu(fc(norm(x)), approximate="tanh"))
    torch.testing.assert_close(cms(x)[0], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"has weights \['w1', 'w2', 'b1', 'b2'\]"):
        cms.init_level_from(0, {"w1": fc.weight, "w2": proj.weight}, norm)
    with pytest.raises(ValueError, match="'w1' of level 0 has shape"):
        cms.init_level_from(0, {**weights, "w1": torch.zeros(4, 6, dtype=DT)}, norm)
    with pytest.raises(ValueError, match=r"the norm \(LayerNorm, eps 1e-05\) differs"):
        cms.init_level_from(0, weights, torch.nn.LayerNorm(6).double())
    with pytest.raises(ValueError, match="mlp: unknown 'relu'; choose one of swiglu, gelu_tanh"):
        make_cms(mlp="relu")
    with pytest.raises(ValueError, match="norm: unknown 'batch'; choose one of rms, layer"):
        make_cms(norm="batch")


def test_inner_levels_and_outer_periods():
    cms = make_cms(optimizer="momentum", chunk_sizes=(8, 2))
    levels = cms.inner_levels()
    assert [lv.component for lv in levels] == ["levels.0", "levels.1"]
    assert [lv.update_every for lv in levels] == [8, 2]
    assert "momentum" in levels[0].optimizer and "l2" in levels[0].objective
    periods = cms.outer_periods()
    assert periods["levels.0.w1"] == 8 and periods["levels.1.norm.weight"] == 2
    assert cms.flops_per_token(16) > cms.flops_per_token(1) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_sizes": (0, 2)}, "chunk_sizes: every entry must be an int >= 1"),
        ({"chunk_sizes": (4,)}, r"chunk_sizes \(1 entries\) and lrs \(2 entries\)"),
        ({"lrs": (0.1, -1.0)}, "lrs: every entry must be a float >= 0"),
        ({"variant": "tree"}, "variant: unknown 'tree'; choose one of sequential, nested, indep"),
        ({"objective": "ce"}, "objective: unknown 'ce'; choose one of local, teach"),
        ({"optimizer": "adam"}, "optimizer: unknown 'adam'; choose one of gd, momentum, dgd"),
        ({"mode": "fast"}, "mode: unknown 'fast'; choose one of chunk, reference"),
    ],
)
def test_bad_options_are_named_with_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cms(**kwargs)


def test_teach_without_a_teacher_and_foreign_states_are_refused():
    x, tokens = inputs()
    with pytest.raises(ValueError, match="needs teacher=Teacher"):
        make_cms(objective="teach")(x)
    with pytest.raises(ValueError, match=r"teacher.tokens: expected \[B, T\]"):
        make_cms(objective="teach")(x, None, toy_teacher(tokens[:, :3]))
    with pytest.raises(ValueError, match="a state from another model"):
        make_cms()(x, {"pos": torch.tensor(0)})


@pytest.mark.parametrize(("variant", "objective"), [("sequential", "teach"), ("nested", "local")])
def test_plain_step_layer_chunk_equals_reference_and_differs_from_normalized(variant, objective):
    chunk = make_cms(variant, objective, step="plain")
    reference = make_cms(variant, objective, step="plain", mode="reference")
    reference.load_state_dict(chunk.state_dict())
    normalized = make_cms(variant, objective)
    normalized.load_state_dict(chunk.state_dict())
    x, tokens = inputs()
    teacher = toy_teacher(tokens) if objective == "teach" else None
    results = []
    for module in (chunk, reference, normalized):
        xi = x.clone().requires_grad_()
        y, _ = module(xi, None, teacher)
        (y.pow(2).sum() + y.sum()).backward()
        results.append((y, xi.grad, [p.grad for p in module.parameters()]))
    (ya, ga, pa), (yb, gb, pb), (yn, _, _) = results
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-11)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(ya, yn)  # the step is threaded to the levels
    assert "plain η=" in chunk.inner_levels()[0].optimizer
    with pytest.raises(ValueError, match="step: unknown 'raw'; choose one of normalized, plain"):
        make_cms(step="raw")


def test_model_config_cms_step_reaches_every_cms():
    from nestlearn.errors import ConfigError
    from nestlearn.models.hope import HopeAttentionConfig, HopeAttentionLM

    small = {"vocab_size": 11, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16}
    model = HopeAttentionLM(HopeAttentionConfig(**small, cms_step="plain"))
    assert [block.cms.step for block in model.blocks] == ["plain", "plain"]
    assert HopeAttentionLM(HopeAttentionConfig(**small)).blocks[0].cms.step == "normalized"
    with pytest.raises(ConfigError, match=r"model\.cms_step: unknown 'raw'"):
        HopeAttentionLM(HopeAttentionConfig(**small, cms_step="raw"))
