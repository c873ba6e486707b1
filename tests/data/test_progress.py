"""A first run says what it spends its time on (training the BPE, tokenizing), on stderr only."""

from __future__ import annotations

import pytest
import tokenizers.trainers

from nestlearn.config.schema import DataConfig
from nestlearn.data import prepare_data


@pytest.fixture
def bpe_cfg(make_tree, tmp_path) -> DataConfig:
    files = {f"doc{i}.txt": f"document {i}\n" + "word " * (i + 3) + "\n" for i in range(12)}
    root = make_tree(files)
    return DataConfig(
        source=str(root), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "cache")
    )


@pytest.fixture
def trainer_kwargs(monkeypatch) -> list[dict]:
    """The keyword arguments of every BpeTrainer built (the real trainer is still used)."""
    seen: list[dict] = []
    real = tokenizers.trainers.BpeTrainer

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", spy)
    return seen


def test_bpe_training_is_announced_and_shows_its_progress_on_a_terminal(
    bpe_cfg, trainer_kwargs, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    prepare_data(bpe_cfg, progress=True)
    out, err = capsys.readouterr()
    assert "training a 300-token BPE tokenizer on 16.0 MB of the train split" in err
    assert "cached in" in err and out == ""
    assert "tokenizing" in err and "MB of text (once: it is cached in" in err
    assert trainer_kwargs[-1]["show_progress"] is True


def test_no_terminal_no_progress_bars_from_the_tokenizers_library(
    bpe_cfg, trainer_kwargs, monkeypatch
):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    prepare_data(bpe_cfg, progress=True)
    assert trainer_kwargs[-1]["show_progress"] is False


def test_quiet_when_progress_is_off(bpe_cfg, trainer_kwargs, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    prepare_data(bpe_cfg, progress=False)
    assert capsys.readouterr() == ("", "")
    assert trainer_kwargs[-1]["show_progress"] is False
