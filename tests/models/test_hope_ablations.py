"""Each ablation of ``nestlearn experiment ablations`` changes what it claims to change: its
config has the field set, and its forward differs from full HOPE's on the weights they share."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nestlearn.experiments.ablations import FULL, VARIANTS
from nestlearn.layers.self_modifying import SelfModifyingTitansMixer
from nestlearn.models.hope_titans import HopeConfig
from nestlearn.models.registry import build_model

# Chunks shorter than the sequence, so every memory updates in context within it.
SMALL = dict(
    name="hope", vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=64,
    chunk_size=8, other_chunk_size=4, cms_chunk_sizes=[8, 4],
)  # fmt: skip


def _logits(config: HopeConfig, tokens: torch.Tensor, shared: dict | None = None):
    torch.manual_seed(0)
    model = build_model(config).double().eval()
    if shared is not None:
        own = model.state_dict()
        same = {k: v for k, v in shared.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(same, strict=False)
    with torch.no_grad():
        return model(tokens)[0], model.state_dict()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != FULL])
def test_each_ablation_sets_its_field_and_changes_the_forward(variant):
    overrides = VARIANTS[variant][0]
    full = HopeConfig(**SMALL)
    ablated = dataclasses.replace(full, **overrides)
    for key, value in overrides.items():
        assert getattr(ablated, key) == value != getattr(full, key), key
    tokens = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    reference, weights = _logits(full, tokens)
    again, _ = _logits(full, tokens, weights)
    assert torch.equal(reference, again)  # loading the shared weights reproduces full HOPE
    logits, _ = _logits(ablated, tokens, weights)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max() > 1e-9, f"{variant} computes what full HOPE does"


FIXED_GATES = [
    dict(fixed_eta=True),
    dict(fixed_alpha=True),
    dict(fixed_eta=True, fixed_alpha=True, fixed_k=True),
]


@pytest.mark.parametrize("fixed", FIXED_GATES)
def test_fixed_gates_replace_their_memories_and_chunk_equals_token_loop(fixed):
    torch.manual_seed(0)
    kw = dict(chunk_size=8, other_chunk_size=4, **fixed)
    chunk = SelfModifyingTitansMixer(16, 2, 8, **kw).double()
    loop = SelfModifyingTitansMixer(16, 2, 8, mode="reference", **kw).double()
    loop.load_state_dict(chunk.state_dict())
    for gate in ("eta", "alpha"):
        is_fixed = fixed.get(f"fixed_{gate}", False)
        assert (gate in chunk.projections) == is_fixed
        assert (gate in chunk.memories) != is_fixed
        if is_fixed:
            assert list(chunk.projections[gate].shape) == [2, 1, 8]
    x = torch.randn(2, 19, 16, dtype=torch.double)
    y, _ = chunk(x)
    torch.testing.assert_close(y, loop(x)[0], rtol=1e-10, atol=1e-10)
    state, steps = chunk.init_state(2, dtype=torch.double), []
    for t in range(x.shape[1]):
        out, state = chunk(x[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(y, torch.cat(steps, 1), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    for gate in ("eta", "alpha"):
        if gate in chunk.projections:
            assert chunk.projections[gate].grad.abs().sum() > 0  # learned by the outer loss


def test_every_memory_fixed_is_refused():
    with pytest.raises(ValueError, match="keep one of them adaptive"):
        SelfModifyingTitansMixer(
            16, 2, 8, fixed_k=True, fixed_v=True, fixed_eta=True, fixed_alpha=True
        )
