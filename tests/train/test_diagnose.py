"""A non-finite training loss whose cause is a layer's output: the error names the layer, the
token and that layer's own settings, not the outer learning rate (issue 15)."""

from __future__ import annotations

import re

import pytest
import torch

from nestlearn.errors import NonFiniteLossError
from nestlearn.train import Trainer
from nestlearn.train.diagnose import locate_non_finite

MODELS = {
    "gated_deltanet": ["model.name=gated_deltanet"],
    "hope": ["model.name=hope", "model.chunk_size=8", "model.other_chunk_size=4"],
}


def poison_first_mixer(monkeypatch, trainer: Trainer, when) -> None:
    """From ``when()`` on, block 0's mixer returns NaN at token 5 of batch row 1 (its class is
    patched, so every copy of the model built meanwhile is poisoned the same way)."""
    mixer_cls = type(trainer.model.blocks[0].mixer)
    forward = mixer_cls.forward
    first = trainer.model.blocks[0].mixer

    def poisoned(self, x, state=None):
        y, state = forward(self, x, state)
        is_first = self is first or getattr(self, "_first", False)
        if when() and is_first and y.shape[1] > 5:
            y = y.clone()
            y[1, 5] = float("nan")
        return y, state

    monkeypatch.setattr(mixer_cls, "forward", poisoned)
    # The checked copy's block 0 is poisoned too: mark it when it is built.
    init = mixer_cls.__init__

    def marking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._first = not getattr(mixer_cls, "_built_one", False)
        mixer_cls._built_one = True

    monkeypatch.setattr(mixer_cls, "__init__", marking_init)
    monkeypatch.setattr(mixer_cls, "_built_one", False, raising=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_non_finite_layer_is_named_with_its_own_advice(name, debug_config, monkeypatch):
    trainer = Trainer(debug_config(*MODELS[name], "train.steps=6", "train.ckpt_every=3"))
    poison_first_mixer(monkeypatch, trainer, lambda: trainer.step >= 4)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "at step 5" in message and "The cause is inside the model: " in message
    assert "block 0" in message and "token 5 (batch row 1)" in message, message
    assert "Lower optim.lr or raise optim.warmup_steps" not in message
    assert "step_00000003" in message


def test_a_loss_that_is_non_finite_outside_the_layers_keeps_the_outer_advice(
    debug_config, monkeypatch
):
    """Every layer finite, the logits poisoned: nothing to locate, the outer step's advice."""
    trainer = Trainer(debug_config("train.steps=6", "train.ckpt_every=3"))
    forward = type(trainer.model).forward

    def poisoned(self, tokens, state=None):
        logits, state = forward(self, tokens, state)
        return (logits * float("nan") if trainer.step >= 4 else logits), state

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    with pytest.raises(
        NonFiniteLossError, match=re.escape("Lower optim.lr or raise optim.warmup_steps")
    ):
        trainer.fit()


def test_locate_returns_none_for_a_finite_batch(debug_config):
    trainer = Trainer(debug_config(*MODELS["gated_deltanet"]))
    tokens = torch.randint(0, trainer.cfg.model.vocab_size, (2, 16))
    assert locate_non_finite(trainer.cfg.model, trainer.model, tokens) is None
    trainer.close()
