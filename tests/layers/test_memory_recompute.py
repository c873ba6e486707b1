"""Recomputing HOPE's memories in backward (``ContinuumMemory(recompute=True)``,
``SelfModifyingTitansMixer(recompute=True)``; ``model.cms_recompute``, ``model.sm_recompute``):
the same outputs and gradients bit for bit (the same code on the same inputs), the teach errors
replayed rather than recomputed, and fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch

from nestlearn.layers.cms import ContinuumMemory, Teacher
from nestlearn.layers.self_modifying import SelfModifyingTitansMixer
from nestlearn.models.hope_titans import HopeConfig
from nestlearn.models.registry import build_model

DT = torch.float64
B, T, D, V = 2, 24, 8, 11

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_bytes(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes of the distinct storages autograd keeps for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


class CountingTeacher:
    """A stop-gradient error from a fixed head, counting its calls."""

    def __init__(self) -> None:
        self.head = torch.randn(V, D, generator=torch.Generator().manual_seed(7), dtype=DT)
        self.calls = 0

    def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            probs = torch.softmax(h @ self.head.T, -1)
            probs.scatter_add_(-1, targets.unsqueeze(-1), -torch.ones_like(probs[..., :1]))
            return probs @ self.head


def cms_run(recompute: bool, objective: str, variant: str = "sequential"):
    torch.manual_seed(0)
    cms = ContinuumMemory(
        D, 12, [8, 4], [0.5, 0.5], objective=objective, variant=variant, recompute=recompute
    ).double()
    x = torch.randn(B, T, D, dtype=DT, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    error = CountingTeacher()
    teacher = Teacher(error, tokens) if objective == "teach" else None
    y, saved = saved_bytes(lambda: cms(x, None, teacher)[0])
    grads = torch.autograd.grad(y.pow(2).sum() + y.sum(), [x, *cms.parameters()])
    return y, grads, error.calls, saved


@pytest.mark.parametrize("objective", ["teach", "local"])
@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_cms_recompute_gives_the_same_outputs_and_gradients(objective, variant):
    y0, g0, calls0, saved0 = cms_run(False, objective, variant)
    y1, g1, calls1, saved1 = cms_run(True, objective, variant)
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert calls1 == calls0  # teach: replayed in backward, not recomputed
    assert saved1 < saved0 / 3


def mixer_run(recompute: bool):
    torch.manual_seed(0)
    mixer = SelfModifyingTitansMixer(
        16, 2, 8, chunk_size=8, other_chunk_size=4, recompute=recompute
    ).double()
    x = torch.randn(B, T, 16, dtype=DT, generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    y, saved = saved_bytes(lambda: mixer(x)[0])
    grads = torch.autograd.grad(y.pow(2).sum() + y.sum(), [x, *mixer.parameters()])
    return y, grads, saved


def test_mixer_recompute_gives_the_same_outputs_and_gradients():
    y0, g0, saved0 = mixer_run(False)
    y1, g1, saved1 = mixer_run(True)
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert saved1 < saved0 / 3


def test_recompute_leaves_decoding_and_no_grad_calls_alone():
    """With a state (decoding) or without gradients the layers run as without the switch."""
    torch.manual_seed(0)
    mixer = SelfModifyingTitansMixer(16, 2, 8, chunk_size=8, other_chunk_size=4, recompute=True)
    x = torch.randn(1, 5, 16)
    state = mixer.init_state(1)
    y, new = mixer(x, state)
    mixer.recompute = False
    y_ref, new_ref = mixer(x, state)
    assert torch.equal(y, y_ref) and new.keys() == new_ref.keys()


def test_hope_model_switches_reach_the_layers_and_keep_gradients():
    def run(recompute: bool):
        config = HopeConfig(
            name="hope",
            vocab_size=V,
            d_model=16,
            n_layers=2,
            n_heads=2,
            max_seq_len=32,
            chunk_size=8,
            other_chunk_size=4,
            cms_chunk_sizes=[8, 4],
            cms_recompute=recompute,
            sm_recompute=recompute,
        )
        torch.manual_seed(0)
        model = build_model(config).double()
        assert all(b.cms.recompute == recompute for b in model.blocks)
        assert all(b.mixer.recompute == recompute for b in model.blocks)
        tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
        logits, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    loss0, g0 = run(False)
    loss1, g1 = run(True)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
