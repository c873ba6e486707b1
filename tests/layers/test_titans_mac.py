"""MAC against a token-by-token oracle written from its definition; the memory read it uses
against the memory op itself; MAG / MAL state handling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.layers.rope import apply_rope, rope_tables
from nestlearn.layers.sliding_attention import SlidingWindowAttention
from nestlearn.layers.titans import MemoryAsGate, MemoryAsLayer
from nestlearn.layers.titans_mac import MemoryAsContext, memory_read
from nestlearn.memory.mlp.forms import mlp_memory_chunk

DT = torch.float64
D_MODEL, H, D = 10, 2, 3


def memory(chunk: int, mode: str = "reference", depth: int = 2) -> NeuralMemoryMixer:
    return NeuralMemoryMixer(D_MODEL, H, D, depth=depth, chunk_size=chunk, mode=mode, conv_size=2)


def mac(chunk: int = 3, P: int = 2, mode: str = "chunk", seed: int = 0) -> MemoryAsContext:
    torch.manual_seed(seed)
    return MemoryAsContext(memory(chunk, mode), D_MODEL, H, D, n_persistent=P).to(DT)


def mlp(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The memory MLP on one vector per head: ``weights [H, out, in]``, ``x [H, in]``."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("hoi,hi->ho", w, h)
        h = F.silu(h) if i < len(weights) - 1 else h
    return h + x


def oracle(layer: MemoryAsContext, x: torch.Tensor) -> torch.Tensor:
    """One batch row, one token at a time, from the definition: retrieve with the weights the
    memory had when the segment began, attend over persistent + h_{≤t} + x_{≤t} of the segment,
    write y_t (the memory's own sequential form), gate."""
    C, attn = layer.segment, layer.attn
    T = x.shape[1]
    cos, sin = rope_tables(D, T, dtype=DT)
    state = layer.memory.init_state(1, dtype=DT)
    keys, values, outputs = [], [], []
    for t in range(T):
        if t % C == 0:
            start = [state[f"memory.w.{i}"][0] for i in range(2)]  # [H, out, in]
            keys, values = [], []
        xt = x[:, t : t + 1]
        q_ret = F.normalize(layer.retrieve_q(xt).view(H, D), dim=-1)
        read = torch.stack([mlp(start, q_ret)], dim=1)[None]  # [1, H, 1, D]
        ht = layer.memory.heads.output(read, xt)  # [1, 1, d]
        q, k, v = rearrange(attn.qkv(xt), "b t (n h d) -> n b h t d", n=3, h=H)
        _, k_h, v_h = rearrange(attn.qkv(ht), "b t (n h d) -> n b h t d", n=3, h=H)
        rot = (cos[t : t + 1], sin[t : t + 1])
        q_rot = apply_rope(q, *rot)
        keys += [apply_rope(k_h, *rot), apply_rope(k, *rot)]
        values += [v_h, v]
        scores = [torch.einsum("bhqd,bhkd->bhk", q_rot, k)[..., 0] for k in keys]
        persistent = torch.einsum("bhd,hpd->bhp", q[:, :, 0], attn.persistent_k)
        p = torch.softmax(torch.cat([persistent, torch.stack(scores, -1)], -1) / math.sqrt(D), -1)
        n = attn.n_persistent
        o = torch.einsum("bhp,hpd->bhd", p[..., :n], attn.persistent_v)
        o = o + torch.einsum("bhk,bhkd->bhd", p[..., n:], torch.cat(values, 2))
        y = attn.o_proj(o.reshape(1, 1, H * D))
        m, state = layer.memory(y, state)
        outputs.append(layer.gate(y, m))
    return torch.cat(outputs, 1)


@pytest.mark.parametrize(("T", "chunk", "P"), [(8, 3, 2), (1, 3, 1), (5, 1, 0), (4, 4, 2)])
def test_mac_equals_the_token_by_token_oracle(T, chunk, P):
    layer = mac(chunk, P)
    x = torch.randn(1, T, D_MODEL, dtype=DT)
    y, _ = layer(x)
    torch.testing.assert_close(y, oracle(layer, x), rtol=1e-10, atol=1e-12)


def test_mac_is_causal_and_the_past_segment_reaches_through_the_memory():
    layer = mac(chunk=4)
    x = torch.randn(1, 8, D_MODEL, dtype=DT, requires_grad=True)
    y, _ = layer(x)
    (g,) = torch.autograd.grad(y[:, 2].sum(), x, retain_graph=True)
    assert g[:, 3:].abs().max() == 0
    # Token 4 opens a segment: it attends to nothing before it, yet every token of the previous
    # segment reaches it through the memory's weights.
    (g,) = torch.autograd.grad(y[:, 4].sum(), x)
    assert g[:, :4].abs().amax(-1).min() > 0 and g[:, 5:].abs().max() == 0


def test_memory_read_equals_the_memory_op_without_a_write():
    torch.manual_seed(1)
    weights = [torch.randn(2, 2, 5, 3, dtype=DT), torch.randn(2, 2, 3, 5, dtype=DT)]
    q = F.normalize(torch.randn(2, 2, 4, 3, dtype=DT), dim=-1)
    # η = 0 and no momentum/retention: the op only reads, from the initial weights.
    expected, _ = mlp_memory_chunk(q, q, q, weights, eta=0.0, residual=True, chunk_size=2)
    torch.testing.assert_close(memory_read(weights, q, True), expected)


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_chunk_and_reference_memory_forms_agree_with_gradients(kind):
    def build(mode: str) -> torch.nn.Module:
        torch.manual_seed(0)
        mem = memory(3, mode)
        if kind == "mac":
            return MemoryAsContext(mem, D_MODEL, H, D, n_persistent=1).to(DT)
        attn = SlidingWindowAttention(D_MODEL, H, D, window=2, n_persistent=1)
        cls = MemoryAsGate if kind == "mag" else MemoryAsLayer
        return cls(attn, mem, D_MODEL).to(DT)

    x = torch.randn(2, 7, D_MODEL, dtype=DT)
    chunk, reference = build("chunk"), build("reference")
    results = []
    for layer in (chunk, reference):
        y, _ = layer(x)
        results.append(torch.autograd.grad(y.square().sum(), list(layer.parameters())))
        results[-1] = (y, *results[-1])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_states_of_other_layers_are_refused():
    torch.manual_seed(0)
    mag = MemoryAsGate(SlidingWindowAttention(D_MODEL, H, D, window=2), memory(3), D_MODEL)
    layer = mac()
    x = torch.randn(1, 2, D_MODEL)
    with pytest.raises(ValueError, match=r"unexpected entry 'attn\.k'"):
        layer(x.to(DT), mag.init_state(1))
    with pytest.raises(ValueError, match=r"unexpected entry 'cache\.k'"):
        mag(x, layer.init_state(1))
    with pytest.raises(ValueError, match="lacks its lmm entries"):
        mag(x, {k: v for k, v in mag.init_state(1).items() if not k.startswith("lmm.")})
    with pytest.raises(ValueError, match=r"cache.k'\] must be \[B, H, segment, D\]"):
        layer(x.to(DT), layer.init_state(2, dtype=DT))
    with pytest.raises(ValueError, match=r"\[B, T >= 1, d\]"):
        layer(torch.randn(1, 0, D_MODEL, dtype=DT))
