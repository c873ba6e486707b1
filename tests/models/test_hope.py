"""HOPE (self-modifying Titans -> CMS): decoding == forward, causality, overfit, ablations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.models.registry import build_model


def hope(**fields):
    model = {
        "name": "hope",
        "vocab_size": 37,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "chunk_size": 4,
        "other_chunk_size": 2,
        "cms_chunk_sizes": [8, 4],
        **fields,
    }
    cfg = load_config(None, {"model": model, "train": {"seq_len": 64}})
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_decoding_token_by_token_equals_the_full_forward():
    model = hope().double().eval()
    tokens = torch.randint(0, 37, (2, 11))
    full, _ = model(tokens)
    state = model.init_state(2)
    logits, state = model(tokens[:, :6], state)
    outputs = [logits]
    for t in range(6, 11):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-9, atol=1e-9)
    assert model.context_limit is None


def test_later_tokens_do_not_change_earlier_logits():
    model = hope().double().eval()
    tokens = torch.randint(0, 37, (1, 13))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 37
    a, _ = model(tokens)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_overfits_a_batch():
    model = hope()
    tokens = torch.randint(0, 37, (2, 12))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize(
    "ablation",
    [
        {"sm_dgd": False},
        {"sm_momentum": False},
        {"sm_ema_momentum": False},
        {"sm_normalize_v": False},
        {"sm_retention": False},
        {"fixed_k": True},
        {"fixed_v": True},
        {"adaptive_q": True},
        {"memory_objective": "dot"},
        {"variant": "fully_adaptive"},
    ],
)
def test_every_ablation_is_a_config_switch_that_changes_the_model(ablation):
    tokens = torch.randint(0, 37, (1, 9))
    default, _ = hope()(tokens)
    ablated, _ = hope(**ablation)(tokens)
    assert ablated.shape == default.shape and torch.isfinite(ablated).all()
    assert not torch.allclose(ablated, default)


def test_bad_config_and_foreign_state_are_rejected():
    with pytest.raises(ConfigError, match="n_heads"):
        hope(d_model=15)
    model = hope()
    other = hope(n_layers=1).init_state(1)
    with pytest.raises(ValueError, match="state"):
        model(torch.randint(0, 37, (1, 3)), other)


def test_levels_list_the_self_modifying_memories_and_the_cms():
    components = [level.component for level in hope().levels()]
    assert any("mixer.memories.mem" in c for c in components)
    assert any("cms" in c for c in components)
