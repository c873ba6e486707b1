"""The Hugging Face loader, on local JSONL files and strictly offline."""

from __future__ import annotations

import json
import os
import sys

import pytest

from nestlearn.config.schema import DataConfig
from nestlearn.data import prepare_data, read_documents
from nestlearn.errors import DataError, MissingDependencyError


@pytest.fixture
def datasets(monkeypatch, tmp_path):
    """The `datasets` module with its Arrow cache in the test's folder."""
    # The test command installs the `hf` extra, so in CI a missing `datasets` is a failure.
    if os.environ.get("CI"):
        import datasets as module
    else:
        module = pytest.importorskip("datasets")
    monkeypatch.setattr(module.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return module


@pytest.fixture
def jsonl(tmp_path):
    rows = [{"text": "first row\n", "id": 0}, {"text": None, "id": 1}, {"text": "é 🎉", "id": 2}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_cfg(path, **overrides) -> DataConfig:
    return DataConfig(source="hf", hf_dataset="json", hf_data_files=str(path), **overrides)


def test_rows_become_documents(datasets, jsonl):
    docs = read_documents(hf_cfg(jsonl))
    assert [(d.name, d.text) for d in docs] == [
        ("train/000000000", "first row\n"),
        ("train/000000002", "é 🎉"),
    ]


def test_prepare_data_on_a_local_dataset(datasets, jsonl, tmp_path):
    cfg = hf_cfg(jsonl, tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    corpus = prepare_data(cfg, progress=False)
    assert corpus.train_docs + corpus.val_docs == 2
    assert corpus.train_bytes + corpus.val_bytes == len(b"first row\n") + len("é 🎉".encode())


def test_missing_column_lists_the_columns(datasets, jsonl):
    with pytest.raises(DataError, match=r"no column 'body'.*'text'.*'id'"):
        read_documents(hf_cfg(jsonl, hf_text_field="body"))


def test_non_text_column_is_refused(datasets, jsonl):
    with pytest.raises(DataError, match="holds int, not text"):
        read_documents(hf_cfg(jsonl, hf_text_field="id"))


def test_missing_files_and_uncached_hub_datasets_fail_offline(datasets, tmp_path):
    with pytest.raises(DataError, match="nestlearn is offline"):
        read_documents(hf_cfg(tmp_path / "absent.jsonl"))
    hub_constants = sys.modules["huggingface_hub"].constants
    before = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    with pytest.raises(DataError, match=r"nestlearn is offline.*hf_data_files"):
        read_documents(DataConfig(source="hf", hf_dataset="nestlearn-test/not-cached"))
    # The offline switch is restored after the call.
    assert before == (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)


def test_hf_source_needs_a_dataset_name(datasets):
    with pytest.raises(DataError, match=r"needs data\.hf_dataset"):
        read_documents(DataConfig(source="hf"))


def test_missing_datasets_package_names_the_pip_line(monkeypatch):
    # A None entry in sys.modules makes `import datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'datasets'.*nestlearn\[hf\]"):
        read_documents(DataConfig(source="hf", hf_dataset="json"))
