from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nestlearn.config import load_config, named_configs, parse_overrides, replace, save_config
from nestlearn.config.loader import from_dict, read_yaml
from nestlearn.errors import ConfigError


def test_defaults_and_named_configs_load():
    assert load_config().model.name == "transformer"
    for name in named_configs():
        if name.startswith("demo"):
            continue
        cfg = load_config(name)
        assert cfg.name == name


def test_override_types_are_checked_and_coerced():
    cfg = load_config(None, ["train.steps=7", "optim.lr=1e-3", "model.tie_embeddings=false"])
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is False
    # An int where a float is expected is lossless, so it is accepted.
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.stepz=3"])
    message = str(info.value)
    assert "train" in message and "stepz" in message
    assert "did you mean 'steps'" in message
    assert "batch_size" in message and "seq_len" in message


def test_unknown_section_and_model_name():
    with pytest.raises(ConfigError, match=r"valid: data, eval, model"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match=r"available: .*transformer"):
        load_config(None, ["model.name=nope"])


def test_model_keys_are_validated_against_the_architecture():
    assert load_config(None, ["model.n_heads=2", "model.d_model=64"]).model.n_heads == 2
    with pytest.raises(ConfigError, match=r"key in \[model\]"):
        load_config(None, ["model.chunk_size=3"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=abc", "expected int"),
        ("train.steps=1.5", "expected int"),
        ("optim.lr=fast", "expected float"),
        ("train.progress=maybe", "expected bool"),
        ("data.tokenizer=words", "choose one of bpe, byte"),
        ("train.precision=fp8", "choose one of"),
        ("optim.beta2=1.0", "must be in [0, 1)"),
        ("optim.lr=-1", "must be > 0"),
        ("train.steps=0", "must be > 0"),
        ("train.seq_len=4096", "exceeds model.max_seq_len"),
        ("data.val_fraction=0", "must be in (0, 1)"),
        ("steps=3", "needs a section"),
        ("train.steps", "section.key=value"),
    ],
)
def test_bad_values_fail_with_a_clear_message(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_unknown_named_config_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"named configs: .*tiny"):
        load_config("no-such-config")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.steps=11", "data.source=/tmp/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(read_yaml(tmp_path / "config.yaml"))
    assert again == cfg
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_replace_revalidates():
    cfg = load_config("tiny")
    assert replace(cfg, ["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError):
        replace(cfg, ["train.steps=-3"])


def test_parse_overrides_nests_sections():
    assert parse_overrides(["a.b=1", "a.c=x", "name=n"]) == {"a": {"b": 1, "c": "x"}, "name": "n"}


@given(steps=st.integers(1, 10**9), lr=st.floats(1e-8, 10.0, allow_nan=False))
def test_numeric_overrides_round_trip(steps, lr):
    cfg = load_config(None, [f"train.steps={steps}", f"optim.lr={lr!r}"])
    assert cfg.train.steps == steps
    assert cfg.optim.lr == lr
