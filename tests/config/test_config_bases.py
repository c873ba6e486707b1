"""Named configs inherit with ``base:``; every shipped config loads and builds."""

from __future__ import annotations

import pytest

from nestlearn.config import load_config, named_configs
from nestlearn.errors import ConfigError
from nestlearn.models.registry import build_model


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_base_is_read_first_and_the_file_wins(tmp_path):
    write(tmp_path / "parent.yaml", "model:\n  d_model: 48\n  n_layers: 3\ntrain:\n  steps: 7\n")
    child = write(
        tmp_path / "child.yaml", f"base: {tmp_path / 'parent.yaml'}\nmodel:\n  n_layers: 5\n"
    )
    cfg = load_config(str(child))
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.steps) == (48, 5, 7)
    assert cfg.name == "child"


def test_changing_architecture_keeps_only_the_shared_model_keys():
    cfg = load_config("gated_deltanet-tiny")
    tiny = load_config("tiny")
    assert cfg.model.name == "gated_deltanet"
    assert (cfg.model.d_model, cfg.model.n_layers) == (tiny.model.d_model, tiny.model.n_layers)
    assert cfg.data == tiny.data and cfg.train.steps == tiny.train.steps
    assert cfg.train.out_dir == "runs/gated_deltanet-tiny"


def test_a_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", f"base: {tmp_path / 'b.yaml'}\n")
    write(tmp_path / "b.yaml", f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_missing_base_names_the_known_configs(tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: no_such_config\n")
    with pytest.raises(ConfigError, match=r"no config named 'no_such_config'.*tiny"):
        load_config(str(bad))


@pytest.mark.parametrize("name", [n for n in named_configs() if n != "demo"])
def test_every_named_config_builds(name):
    cfg = load_config(name, {"model": {"vocab_size": 64, "n_layers": 1}})
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
