"""The Transformer: cached decoding equals the full forward, causality, init, errors, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.config.loader import load_config
from nestlearn.errors import ConfigError, DataError, SequenceTooLongError
from nestlearn.models import Transformer, TransformerConfig, available_models, build_model

VOCAB = 37

# (n_heads, n_kv_heads): multi-head, grouped-query and multi-query attention.
HEADS = [(1, 0), (2, 0), (2, 1), (3, 1), (4, 2), (6, 3), (4, 1)]


def tiny(**overrides) -> Transformer:
    fields = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, max_seq_len=24)
    fields.update(overrides)
    return build_model(TransformerConfig(**fields))


def decode(model: Transformer, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of feeding ``tokens`` through the KV cache in chunks of the given lengths."""
    state = model.init_state(tokens.shape[0])
    out, start = [], 0
    for size in chunks:
        logits, state = model(tokens[:, start : start + size], state)
        out.append(logits)
        start += size
    assert int(state["pos"]) == tokens.shape[1]
    return torch.cat(out, dim=1)


def split(total: int, first: int, size: int) -> list[int]:
    """``[first, size, size, ..., rest]`` summing to ``total``."""
    chunks = [first]
    while sum(chunks) < total:
        chunks.append(min(size, total - sum(chunks)))
    return chunks


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 24),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([2, 3, 4, 5]),
    tie=st.booleans(),
    data=st.data(),
)
def test_cached_decoding_equals_full_forward(batch, length, heads, head_dim, tie, data):
    n_heads, n_kv_heads = heads
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    # A large init makes attention far from uniform, so a wrong mask or position shows.
    model = tiny(
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        tie_embeddings=tie,
        init_std=0.5,
    ).double()
    tokens = torch.randint(0, VOCAB, (batch, length))
    full, state = model(tokens)
    assert state is None

    token_by_token = decode(model, tokens, [1] * length)
    torch.testing.assert_close(token_by_token, full, rtol=0, atol=1e-10)

    prefix = data.draw(st.integers(1, length), label="prefix")
    size = data.draw(st.integers(1, length), label="chunk")
    chunked = decode(model, tokens, split(length, prefix, size))
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-10)


def test_forward_does_not_modify_the_input_state_dict():
    model = tiny()
    state = model.init_state(2)
    keys, pos = list(state), state["pos"]
    _, new = model(torch.randint(0, VOCAB, (2, 5)), state)
    assert list(state) == keys and state["pos"] is pos and int(pos) == 0
    assert int(new["pos"]) == 5
    # The cache is written in place and shared (documented): no copy of max_seq_len per step.
    assert new["k.0"] is state["k.0"]
    assert state["k.0"][:, :, :5].abs().sum() > 0 and state["k.0"][:, :, 5:].abs().sum() == 0


def test_init_state_layout():
    model = tiny(n_heads=4, n_kv_heads=2, n_layers=3).to(torch.bfloat16)
    state = model.init_state(5)
    assert sorted(state) == sorted(["pos"] + [f"{kv}.{i}" for kv in "kv" for i in range(3)])
    assert state["pos"].dtype == torch.long and state["pos"].shape == ()
    assert state["k.2"].shape == (5, 2, 24, 4) and state["v.0"].dtype == torch.bfloat16


def test_decoding_under_bf16_autocast():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(tokens)
        cached = decode(model, tokens, [3, 1, 3])
    torch.testing.assert_close(cached.float(), full.float(), rtol=0.05, atol=0.05)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 24), data=st.data())
def test_causality(length, data):
    torch.manual_seed(0)
    model = tiny(init_std=0.5).double()
    t = data.draw(st.integers(0, length - 1))
    tokens = torch.randint(0, VOCAB, (2, length))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, _ = model(tokens)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, t], before[:, t])


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny(vocab_size=64, d_model=32, n_layers=2, max_seq_len=32)
    # Distinct first tokens: position 0 sees only its own token, so its target must be unique.
    tokens = torch.randint(0, 64, (4, 33))
    tokens[:, 0] = torch.arange(4)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        logits, _ = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def test_init_scales_residual_outputs_by_depth():
    torch.manual_seed(0)
    model = tiny(d_model=64, n_layers=8, init_std=0.02, tie_embeddings=False)
    residual_std = 0.02 / math.sqrt(16)
    for block in model.blocks:
        assert block.attn.out.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.mlp.w2.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.attn_norm.weight == 1)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_tied_head_is_the_embedding():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight


def test_safetensors_round_trip_with_tied_weights(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, copy = tiny(), tiny()
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    safetensors_torch.load_model(copy, str(tmp_path / "model.safetensors"))
    tokens = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(copy(tokens)[0], model(tokens)[0])
    assert copy.head.weight is copy.embed.weight


def test_mlp_hidden_default():
    assert tiny(d_model=32).mlp_hidden == 96  # 8/3 * 32 = 85.3 -> 96
    assert tiny(d_model=48).mlp_hidden == 128  # exactly 128
    assert tiny(d_model=32, mlp_hidden=40).blocks[0].mlp.w1.out_features == 40


def test_flops_per_token_hand_count():
    model = tiny(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    head_dim, hidden = 8, 96
    qkv = 32 * (4 + 2 * 2) * head_dim
    out = 32 * 32
    mlp = 3 * 32 * hidden
    n = 2 * (qkv + out + mlp) + 100 * 32  # the tied head still costs its matmul
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16
    untied = tiny(vocab_size=100, d_model=32, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    assert untied.flops_per_token(16) == model.flops_per_token(16)


def test_registered_and_loadable_from_config():
    assert "transformer" in available_models()
    cfg = load_config(overrides=["model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=50"])
    assert isinstance(cfg.model, TransformerConfig) and cfg.model.n_kv_heads == 1
    assert isinstance(build_model(cfg.model), Transformer)


def test_too_long_sequence():
    model = tiny()
    with pytest.raises(SequenceTooLongError, match=r"model\.max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    state = model.init_state(1)
    _, state = model(torch.zeros(1, 20, dtype=torch.long), state)
    with pytest.raises(SequenceTooLongError, match=r"20 cached \+ 5 new .*max_seq_len=24"):
        model(torch.zeros(1, 5, dtype=torch.long), state)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.zeros(1, 4), "integer"),
        (torch.zeros(1, 4, dtype=torch.bool), "integer"),
        (torch.zeros(4, dtype=torch.long), r"\[batch, seq_len\]"),
        (torch.zeros(1, 2, 4, dtype=torch.long), r"\[batch, seq_len\]"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
    ],
)
def test_bad_tokens(tokens, match):
    with pytest.raises(ValueError, match=match):
        tiny()(tokens)


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_out_of_vocabulary_ids(bad_id):
    tokens = torch.tensor([[1, 2, bad_id]])
    with pytest.raises(DataError, match=rf"token id {bad_id} .*vocab"):
        tiny()(tokens)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(d_model=18, n_heads=4), r"d_model=18 is not divisible by model\.n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), r"n_heads=4 is not divisible by model\.n_kv_heads=3"),
        (dict(n_kv_heads=-1), r"n_kv_heads=-1 must be >= 0"),
        (dict(n_heads=0), r"n_heads=0 must be > 0"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**fields)
