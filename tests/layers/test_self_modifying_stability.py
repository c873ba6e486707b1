"""Self-modifying Titans stays bounded on long runs of one repeated token (issue 15).

HOPE (``demo-hope``, seed 3) went non-finite at training step 468: a text starting with 60
identical bytes made ``M_v``'s weights reach 1e42 by token 64 (float64; NaN in float32). Two
couplings of the inner loop, measured in docs/self-modifying-titans.md ("Stability"): heavy-ball
momentum (``S_t = μ S_{t−1} − η g_t``, gain ``1/(1 − μ)``) outweighs the DGD projection (gain 1)
when the self-generated target cancels the L2 objective's pull, and ``M_v``'s own target
``M_v(M_v(x))`` grows with the square of its gain. The defaults (``ema_momentum``,
``normalize_v``) remove both. No trained weights here: a fresh mixer whose ``M_v`` is given a gain
along or across the repeated input (default gates), or whose gates are pinned at their bounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from nestlearn.layers.self_modifying import SelfModifyingTitansMixer

DT = torch.float64
OLD = dict(ema_momentum=False, normalize_v=False)  # the form before issue 15

# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def with_gain(direction: str, gain: float, T: int, **options):
    """A fresh mixer (default gates, chunks 16 / 64, no conv: every token of the stream is the
    same unit input ``u`` per head) whose ``M_v`` maps ``u`` to ``u + gain · d``, with ``d = u``
    (``"along"``) or a unit vector orthogonal to it (``"across"``); and the stream
    ``[1, T, 16]``."""
    torch.manual_seed(0)
    layer = SelfModifyingTitansMixer(16, 2, 8, conv_size=0, **options).to(DT)
    x = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(0), dtype=DT)
    with torch.no_grad():
        u = F.normalize(rearrange(layer.in_proj(x), "b t (h d) -> b h t d", h=2), dim=-1)[0, :, 0]
        d = u
        if direction == "across":
            r = torch.randn(u.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
            d = F.normalize(r - (r * u).sum(-1, keepdim=True) * u, dim=-1)
        first, second = layer.memories["v"]
        h = F.silu(torch.einsum("hij,hj->hi", first, u))  # the hidden units of M_v on u
        second.copy_(gain * d[:, :, None] * h[:, None, :] / h.square().sum(-1)[:, None, None])
    return layer, x.expand(1, T, 16)


def pinned(chunks: tuple[int, int], mu_logit: float, **options) -> SelfModifyingTitansMixer:
    """A fresh mixer whose gates sit at their bounds: ``η`` at its clamp ``(1 + α) / 2``,
    ``α → 1`` (no forgetting), ``μ = σ(mu_logit)``; chunks ``(other, mem)``."""
    torch.manual_seed(0)
    other, chunk = chunks
    layer = SelfModifyingTitansMixer(
        16, 2, 8, chunk_size=chunk, other_chunk_size=other, **options
    ).to(DT)
    with torch.no_grad():
        layer.eta_bias.fill_(30.0)
        layer.alpha_bias.fill_(30.0)
        layer.mu_logit.fill_(mu_logit)
    return layer


def stream(kind: str, T: int) -> torch.Tensor:
    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    if kind == "constant":  # one input repeated: every key of a chunk equal after the conv
        return x[:, :1].expand(1, T, 16)
    return x[:, :2].repeat(1, T // 2, 1)  # two inputs alternating


def largest(layer: SelfModifyingTitansMixer) -> float:
    return max(w.abs().max().item() for ws in layer.memories.values() for w in ws)


def run(layer: SelfModifyingTitansMixer, x: torch.Tensor) -> tuple[bool, float]:
    """Whether the outputs are finite, and the largest memory-weight entry after the stream."""
    with torch.no_grad():
        y, state = layer(x, layer.init_state(1, dtype=DT))
    weights = [v for k, v in state.items() if ".w." in k]
    return bool(torch.isfinite(y).all()), max(w.abs().max().item() for w in weights)


def diverged(finite: bool, weight: float, start: float) -> bool:
    return not finite or not weight < 1e3 * start


@pytest.mark.parametrize(
    "options",
    [{}, dict(normalize_v=False), dict(ema_momentum=False)],
    ids=["default", "ema momentum alone", "normalized v alone"],
)
def test_a_run_of_one_token_stays_bounded_where_the_old_form_diverges(options):
    """The saved case in miniature: 128 identical tokens, ``M_v`` with a gain across its input
    (the trained ``M_v``'s second maps had grown 3x). The old form goes non-finite, as the
    trained model did; like there, either change alone keeps it bounded."""
    old, x = with_gain("across", 2.0, T=128, **OLD)
    assert diverged(*run(old, x), largest(old))
    layer, x = with_gain("across", 2.0, T=128, **options)
    finite, weight = run(layer, x)
    # Observed: the largest entry decays (retention); a diverging memory is at 1e30+ or NaN.
    assert finite and weight <= largest(layer), (finite, weight, largest(layer))


def test_a_gain_along_the_input_needs_normalized_v():
    """``M_v(u) = 2u``: its target ``M_v(M_v(u))`` grows with the square of its gain, whatever
    the momentum; normalizing ``v`` (the target's input) removes it."""
    ema_alone, x = with_gain("along", 1.0, T=128, normalize_v=False)
    assert diverged(*run(ema_alone, x), largest(ema_alone))
    layer, x = with_gain("along", 1.0, T=128)
    finite, weight = run(layer, x)
    assert finite and weight <= largest(layer)


def test_a_large_gain_across_the_input_needs_ema_momentum():
    """``M_v(u) = u + 5 u⊥``: with normalized ``v`` but heavy-ball momentum it still diverges."""
    normalized_alone, x = with_gain("across", 5.0, T=256, ema_momentum=False)
    assert diverged(*run(normalized_alone, x), largest(normalized_alone))
    layer, x = with_gain("across", 5.0, T=256)
    finite, weight = run(layer, x)
    assert finite and weight <= largest(layer)


@pytest.mark.parametrize("kind", ["constant", "alternating"])
@pytest.mark.parametrize("mu_logit", [0.0, 3.0, 7.0], ids=["mu 0.5", "mu 0.95", "mu 0.999"])
@pytest.mark.parametrize("chunks", [(1, 1), (4, 16), (16, 64)], ids=str)
def test_gates_at_their_bounds_keep_the_memories_bounded(chunks, mu_logit, kind):
    """256 tokens (16 chunks of the other memories at 16) with every gate at its bound."""
    layer = pinned(chunks, mu_logit)
    finite, weight = run(layer, stream(kind, 256))
    # Observed <= 1.05x the initial largest entry; diverging memories reach 1e20+ or NaN.
    assert finite and weight < 2 * largest(layer), (finite, weight, largest(layer))


@pytest.mark.parametrize("mu_logit", [3.0, 7.0], ids=["mu 0.95", "mu 0.999"])
def test_the_old_form_diverges_under_the_same_stress(mu_logit):
    """The stress above is real: the old form blows up on it."""
    layer = pinned((16, 64), mu_logit, **OLD)
    assert diverged(*run(layer, stream("constant", 256)), largest(layer))


def test_old_form_stays_selectable():
    layer = SelfModifyingTitansMixer(16, 2, 8, **OLD)
    assert not layer.options.ema_momentum and not layer.options.normalize_v
    default = SelfModifyingTitansMixer(16, 2, 8)
    assert default.options.ema_momentum and default.options.normalize_v
