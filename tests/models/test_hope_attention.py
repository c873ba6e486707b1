"""HOPE-attention: shapes, decode == forward, causality, chunk == reference, overfit, levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.models.hope import HopeAttentionConfig
from nestlearn.models.registry import build_model

V = 37


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**fields):
    overrides = {
        "name": "hope_attention",
        "vocab_size": V,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 32,
        "cms_chunk_sizes": [4, 3],
        "cms_lrs": [0.5, 0.5],
        "cms_hidden": 12,
        **fields,
    }
    cfg = load_config(None, {"model": overrides, "train": {"seq_len": 32}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    # Larger CMS weights than the LM init, so that the in-context updates matter.
    for block in model.blocks:
        block.cms.reset_parameters(std=0.3)
    return model


VARIANTS = [
    {"cms_objective": "local"},
    {"cms_objective": "teach"},
    {"cms_variant": "nested", "cms_optimizer": "momentum", "cms_objective": "local"},
    {"cms_variant": "independent", "cms_objective": "teach", "cms_optimizer": "dgd"},
]


def test_shapes_and_untied_head():
    model = small(tie_embeddings=False)
    logits, state = model(torch.randint(0, V, (3, 5)))
    assert logits.shape == (3, 5, V) and state is None
    assert model.head.weight is not model.embed.weight
    assert model.context_limit == 32 and model.flops_per_token(32) > 0


@pytest.mark.parametrize("fields", VARIANTS)
def test_decoding_token_by_token_equals_the_full_forward(fields):
    model = small(**fields).double().eval()
    tokens = torch.randint(0, V, (2, 11))
    full, _ = model(tokens)
    # A prefix of 5 (not a multiple of any chunk), then one token at a time.
    logits, state = model(tokens[:, :5], model.init_state(2))
    outputs = [logits]
    for t in range(5, 11):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-9, atol=1e-9)
    assert int(state["pos"]) == 11


@pytest.mark.parametrize("fields", VARIANTS)
def test_logits_up_to_t_ignore_the_tokens_after_t(fields):
    model = small(**fields).double()
    tokens = torch.randint(0, V, (2, 14))
    full, _ = model(tokens)
    for t in (0, 3, 8):
        changed = tokens.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(13 - t)) % V
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, : t + 1], full[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(logits[:, t + 1 :], full[:, t + 1 :])


@pytest.mark.parametrize("fields", VARIANTS[:2])
def test_chunk_mode_equals_reference_mode_with_gradients(fields):
    chunk = small(**fields).double()
    reference = small(**fields, cms_mode="reference").double()
    reference.load_state_dict(chunk.state_dict())
    tokens = torch.randint(0, V, (2, 10))
    losses = []
    for model in (chunk, reference):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(chunk.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_the_teach_signal_is_the_gradient_through_norm_and_head():
    model = small().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (2, 5))
    logits = model.head(model.norm(h))
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")
    (expected,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(model.next_token_error(h, targets), expected)


@pytest.mark.parametrize("fields", VARIANTS[:2])
def test_overfits_one_batch(fields):
    model = small(d_model=32, n_layers=1, **fields)
    tokens = torch.randint(0, V, (2, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_a_state_from_another_model_is_refused():
    model = small()
    tokens = torch.randint(0, V, (1, 3))
    with pytest.raises(ValueError, match="block 1"):
        model(tokens, small(n_layers=1).init_state(1))
    transformer = build_model(load_config("debug", {"model": {"vocab_size": V}}).model)
    with pytest.raises(ValueError, match="state from another model"):
        model(tokens, transformer.init_state(1))
    with pytest.raises(ValueError, match="CMS level"):
        model(tokens, small(cms_chunk_sizes=[4], cms_lrs=[0.1]).init_state(1))


def test_levels_list_attention_each_cms_level_and_the_outer_level():
    levels = small(cms_chunk_sizes=[8, 2], cms_lrs=[0.1, 0.2]).levels()
    components = [lv.component for lv in levels]
    assert components[:2] == ["blocks.0.mixer.attn", "blocks.1.mixer.attn"]
    assert components[2:4] == ["blocks.0.cms.levels.1", "blocks.1.cms.levels.1"]
    assert [lv.update_every for lv in levels] == [1, 1, 2, 2, 8, 8, None]


def test_list_fields_from_overrides_and_config_errors():
    cfg = load_config(
        None,
        [
            "model.name=hope_attention",
            "model.cms_chunk_sizes=[8,32]",
            "model.cms_lrs=[0.1, 1]",
            "train.seq_len=64",
        ],
    )
    assert isinstance(cfg.model, HopeAttentionConfig)
    assert cfg.model.cms_chunk_sizes == [8, 32] and cfg.model.cms_lrs == [0.1, 1.0]
    with pytest.raises(ConfigError, match=r"model.cms_chunk_sizes\[1\]: expected int"):
        load_config(None, ["model.name=hope_attention", "model.cms_chunk_sizes=[8, x]"])
    with pytest.raises(ConfigError, match=r"model.cms_chunk_sizes: expected a list"):
        load_config(None, ["model.name=hope_attention", "model.cms_chunk_sizes=8"])
    with pytest.raises(ConfigError, match=r"model.cms_variant: unknown 'x'; choose one of"):
        small(cms_variant="x")
    with pytest.raises(ConfigError, match=r"model.cms_chunk_sizes \(2 entries\) and model.cms_lrs"):
        small(cms_lrs=[0.1])
