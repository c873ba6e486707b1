"""Test-time learning states: save/load round trip, foreign states refused, per-row reset."""

from __future__ import annotations

import pytest
import torch

from nestlearn.config import load_config
from nestlearn.errors import CheckpointError
from nestlearn.models.registry import available_models, build_model
from nestlearn.models.state_io import load_state, reset_state, save_state


def small(name: str, **fields):
    model = {"name": name, "vocab_size": 37, "d_model": 16, "n_layers": 2, **fields}
    if name not in ("transformer", "hope_attention"):
        model.setdefault("chunk_size", 4)
    if name.startswith("hope"):
        model["cms_chunk_sizes"] = [8, 4]
    if name == "hope":
        model["other_chunk_size"] = 2
    if name.startswith("titans_ma"):
        model["window"] = 8
    cfg = load_config(None, {"model": {**model, "max_seq_len": 64}, "train": {"seq_len": 64}})
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


@pytest.mark.parametrize("name", available_models())
def test_a_saved_state_continues_exactly(name, tmp_path):
    model = small(name)
    tokens = torch.randint(0, 37, (2, 10))
    _, state = model(tokens[:, :6], model.init_state(2))
    save_state(model, state, tmp_path / "state.safetensors")
    loaded = load_state(model, tmp_path / "state.safetensors")
    assert loaded.keys() == state.keys()
    a, _ = model(tokens[:, 6:], state)
    b, _ = model(tokens[:, 6:], loaded)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_state_of_another_model_or_config_is_refused(tmp_path):
    model = small("gated_deltanet")
    save_state(model, model.init_state(1), tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="model 'gated_deltanet', not 'deltanet'"):
        load_state(small("deltanet"), tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model's config"):
        load_state(small("gated_deltanet", d_model=32), tmp_path / "s.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_state(model, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="no state file"):
        load_state(model, tmp_path / "missing.safetensors")


def test_reset_rows_forget_and_the_other_rows_keep_learning():
    model = small("titans_lmm")
    tokens = torch.randint(0, 37, (2, 12))
    _, state = model(tokens[:, :8], model.init_state(2))
    reset = reset_state(model, state, [0])
    a, _ = model(tokens[:, 8:], reset)
    kept, _ = model(tokens[:, 8:], state)
    torch.testing.assert_close(a[1], kept[1])
    fresh, _ = model(tokens[:, 8:], model.init_state(2))
    assert not torch.allclose(a[0], kept[0])
    # Row 0 starts over from the initial memories; the chunk phase (8 % 4 = 0) is the same.
    torch.testing.assert_close(a[0], fresh[0])


def test_reset_needs_a_recurrent_model():
    model = small("transformer")
    with pytest.raises(ValueError, match="recurrent"):
        reset_state(model, model.init_state(1), [0])
