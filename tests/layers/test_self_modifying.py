"""SelfModifyingTitansMixer: chunk == reference (with every parameter's gradient), decoding ==
forward, causality, each ablation switch, meta-gradients, levels, errors, overfitting a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.layers.self_modifying import SelfModifyingTitansMixer

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(d_model=12, n_heads=2, head_dim=5, chunk_size=4, other_chunk_size=3)


def mixer(**changes) -> SelfModifyingTitansMixer:
    torch.manual_seed(0)
    return SelfModifyingTitansMixer(**{**SMALL, **changes}).double()


def inputs(B: int = 2, T: int = 10, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, SMALL["d_model"], generator=gen, dtype=DT)


def loss_and_grads(layer: nn.Module, x: torch.Tensor):
    layer.zero_grad()
    y, _ = layer(x)
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=DT)).sum()
    loss.backward()
    return y, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize(
    "switches",
    [
        {},
        dict(dgd=False, momentum=False),
        dict(variant="fully_adaptive", adaptive_q=True),
        dict(ema_momentum=False, normalize_v=False),
    ],
)
def test_chunk_mode_equals_reference_mode_with_gradients(switches):
    chunk = mixer(**switches)
    reference = mixer(mode="reference", **switches)
    reference.load_state_dict(chunk.state_dict())
    x = inputs(T=11)
    y, grads = loss_and_grads(chunk, x)
    y_ref, grads_ref = loss_and_grads(reference, x)
    torch.testing.assert_close(y, y_ref)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(grad, grads_ref[name], msg=name)


@pytest.mark.parametrize("prefix", [1, 6, 8])
def test_decoding_token_by_token_equals_the_full_forward(prefix):
    layer = mixer()
    x = inputs(T=13)
    full, _ = layer(x)
    state = layer.init_state(2, dtype=DT)
    y, state = layer(x[:, :prefix], state)
    outputs = [y]
    for t in range(prefix, 13):
        y, state = layer(x[:, t : t + 1], state)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full)
    assert int(state["memory.mem.pos"]) == 13 % 4 and int(state["memory.k.pos"]) == 13 % 3


def test_is_causal():
    layer = mixer()
    x = inputs(T=12)
    y, _ = layer(x)
    changed = x.clone()
    changed[:, 6] += 1.0
    y_changed, _ = layer(changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


SWITCHES = {
    "gd instead of dgd": dict(dgd=False),
    "no momentum": dict(momentum=False),
    "heavy-ball momentum": dict(ema_momentum=False),
    "v as read": dict(normalize_v=False),
    "no retention": dict(retention=False),
    "fixed k": dict(fixed_k=True),
    "fixed v": dict(fixed_v=True),
    "dot objective": dict(objective="dot"),
    "fully adaptive": dict(variant="fully_adaptive"),
    "adaptive q": dict(adaptive_q=True),
    "chunk-start read": dict(read="chunk_start"),
    "other chunk 1": dict(other_chunk_size=1),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_switch_runs_and_changes_the_output(name):
    default = mixer()
    ablated = mixer(**SWITCHES[name])
    # Shared parameters equal, so that only the switch differs.
    shared = {k: v for k, v in default.state_dict().items() if k in ablated.state_dict()}
    ablated.load_state_dict(shared, strict=False)
    x = inputs(T=9)
    y, _ = default(x)
    y_ablated, grads = loss_and_grads(ablated, x)
    assert torch.isfinite(y_ablated).all()
    assert not torch.allclose(y_ablated, y), f"{name} does not change the output"
    for pname, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), pname
        assert grad.abs().max() > 0, f"{name}: {pname} gets no gradient"


def test_detach_inner_keeps_the_output():
    layer, detached = mixer(), mixer(detach_inner=True)
    x = inputs(T=9)
    torch.testing.assert_close(detached(x)[0], layer(x)[0])


def test_levels_list_every_memory_with_its_frequency():
    levels = {lv.component: lv for lv in mixer().inner_levels()}
    assert list(levels) == [
        "memories.k",
        "memories.v",
        "memories.eta",
        "memories.alpha",
        "memories.mem",
    ]
    assert levels["memories.mem"].update_every == 4
    assert all(levels[f"memories.{n}"].update_every == 3 for n in ("k", "v", "eta", "alpha"))
    assert "DGD" in levels["memories.k"].optimizer and "momentum" in levels["memories.k"].optimizer
    assert "M_k,c(v)" in levels["memories.k"].objective
    ablated = mixer(fixed_k=True, adaptive_q=True, retention=False, dgd=False, momentum=False)
    levels = {lv.component: lv for lv in ablated.inner_levels()}
    assert list(levels) == ["memories.v", "memories.q", "memories.eta", "memories.mem"]
    assert levels["memories.v"].optimizer == "GD at chunk start"


def test_flops_per_token():
    layer = mixer()
    assert layer.flops_per_token(64) > 0
    assert mixer(dgd=False).flops_per_token(64) < layer.flops_per_token(64)
    assert layer.flops_per_token(2) < layer.flops_per_token(64)


def test_state_is_plain_and_typed():
    state = mixer().init_state(3, dtype=torch.float32)
    assert state["conv"].shape == (3, 10, 3)
    assert (
        state["memory.mem.w.0"].shape == (3, 2, 5, 5)
        and state["memory.mem.w.0"].dtype == torch.float32
    )
    assert state["memory.eta.w.2"].shape == (3, 2, 1, 5)
    assert state["memory.k.pos"].dtype == torch.long
    assert "conv" not in mixer(conv_size=0).init_state(1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size=0), r"SelfModifyingTitansMixer: chunk_size: expected an int >= 1, got 0"),
        (dict(other_chunk_size=-1), r"other_chunk_size: expected an int >= 1, got -1"),
        (dict(mode="fast"), r"mode='fast'; choose one of \('chunk', 'reference'\)"),
        (dict(variant="x"), r"variant='x'; choose one of"),
        (dict(objective="l3"), r"objective: unknown inner objective 'l3'"),
        (dict(read="later"), r"read: expected one of"),
        (dict(head_dim=0), r"head_dim must be an int >= 1"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelfModifyingTitansMixer(**{**SMALL, **kwargs})


def test_bad_inputs_and_foreign_states_are_named():
    layer = mixer()
    name = r"SelfModifyingTitansMixer\(d_model=12, n_heads=2, head_dim=5\)"
    with pytest.raises(ValueError, match=name + r": expected x \[B, T, 12\], got \[2, 5, 11\]"):
        layer(torch.zeros(2, 5, 11, dtype=DT))
    with pytest.raises(ValueError, match=name + r": expected a floating-point x"):
        layer(torch.zeros(2, 5, 12, dtype=torch.long))
    other = SelfModifyingTitansMixer(**{**SMALL, "head_dim": 4}).double()
    with pytest.raises(ValueError, match=name + r": state\['conv'\] expected shape \[2, 10, 3\]"):
        layer(inputs(T=3), other.init_state(2))
    with pytest.raises(
        ValueError, match=name + r": state\['conv'\] .*\(batch 2\), got \[1, 10, 3\]"
    ):
        layer(inputs(T=3), layer.init_state(1))
    wider = SelfModifyingTitansMixer(**{**SMALL, "hidden_mult": 2}).double()
    with pytest.raises(ValueError, match=name + r": state\['memory.k.w.0'\] expected shape"):
        layer(inputs(T=3), wider.init_state(2))
    titans = NeuralMemoryMixer(12, 2, 5, chunk_size=4)
    with pytest.raises(
        ValueError, match=name + r": state keys do not match.*a state from another layer"
    ):
        layer(inputs(T=3), titans.init_state(2))


def test_overfits_one_batch():
    torch.manual_seed(0)
    vocab, d = 11, 16
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(vocab, d),
            "mixer": SelfModifyingTitansMixer(d, 2, 8, chunk_size=8, other_chunk_size=6),
            "head": nn.Linear(d, vocab),
        }
    )
    tokens = torch.randint(0, vocab, (2, 13))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(20):
        h = model["embed"](tokens[:, :-1])
        h = h + model["mixer"](h)[0]
        loss = F.cross_entropy(model["head"](h).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02
