"""``model.check_finite``: the first layer and token whose memory went non-finite are named."""

from __future__ import annotations

import pytest
import torch

from nestlearn.errors import NonFiniteMemoryError
from tests.models.test_memory_models import MEMORY_MODELS, small


def poison_values(model, block: int, token: int):
    """Make block ``block``'s value projection emit inf at ``token`` (batch row 1 only)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[1, token] = float("inf")
        return output

    return model.blocks[block].mixer.heads.v_proj.register_forward_hook(hook)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_the_first_non_finite_memory_is_named(name):
    model = small(name, check_finite=True, conv_size=0)
    poison_values(model, block=1, token=5)
    with pytest.raises(
        NonFiniteMemoryError, match=r"block 1 .*its memory.* token 5 \(batch row 1\)"
    ):
        model(torch.randint(0, 37, (2, 9)))


def test_decoding_names_the_absolute_token():
    model = small("gated_deltanet", check_finite=True, conv_size=0)
    state = model.init_state(2)
    tokens = torch.randint(0, 37, (2, 8))
    _, state = model(tokens[:, :6], state)
    poison_values(model, block=0, token=0)
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 .* token 6 "):
        model(tokens[:, 6:7], state)


def test_a_non_finite_input_is_reported_as_the_input():
    model = small("deltanet", check_finite=True)
    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    tokens = torch.zeros(1, 6, dtype=torch.long)
    tokens[0, 4] = 3
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 .*its input.* token 4"):
        model(tokens)


def test_off_by_default_and_finite_runs_pass():
    model = small("titans_lmm", check_finite=True)
    model(torch.randint(0, 37, (2, 9)))  # finite: no error
    quiet = small("titans_lmm", conv_size=0)
    poison_values(quiet, block=1, token=5)
    logits, _ = quiet(torch.randint(0, 37, (2, 9)))
    assert not torch.isfinite(logits).all()
