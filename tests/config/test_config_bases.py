"""Named configs inherit with ``base:``; every shipped config loads and builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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


SCALES = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}


def scale_of(name: str) -> str | None:
    return next((s for s in SCALES if name == s or name.endswith(f"-{s}")), None)


@pytest.mark.parametrize("name", [n for n in named_configs() if n != "demo"])
def test_every_named_config_builds(name):
    cfg = load_config(name, {"model": {"vocab_size": 64, "n_layers": 1}})
    if scale_of(name):
        with torch.device("meta"):  # the paper-scale widths: shapes only, no memory
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", [n for n in named_configs() if scale_of(n)])
def test_paper_scale_configs_are_within_ten_percent_of_their_names(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.model.vocab_size == 0
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
    with torch.device("meta"):
        model = build_model(model_cfg)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / SCALES[scale_of(name)] - 1) <= 0.10, f"{name}: {count / 1e6:.0f}M"
