"""Data fingerprints: what prepare_data records, and how a difference is put in words."""

from __future__ import annotations

import warnings

import pytest

from nestlearn.config.schema import DataConfig
from nestlearn.data import check_resume_data, describe_data_change, prepare_data
from nestlearn.data import fingerprint as fingerprint_module
from nestlearn.errors import DataError, NestlearnWarning


def record(**changes) -> dict:
    base = {
        "version": 1,
        "source": "corpus/",
        "corpus": "c0",
        "tokenizer": "t0",
        "train_tokens": "a0",
        "val_tokens": "b0",
        "n_documents": 2,
        "documents": {"a.txt": "1", "b.txt": "2"},
    }
    return {**base, **changes}


def test_prepare_data_records_corpus_tokenizer_streams_and_documents(make_tree, tmp_path):
    root = make_tree({"a.txt": "alpha\n", "sub/b.txt": "beta\n", "c.txt": "gamma\n"})
    cfg = DataConfig(source=str(root), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, progress=False).data_fingerprint
    assert first["corpus"] and first["tokenizer"] and first["train_tokens"] != first["val_tokens"]
    assert sorted(first["documents"]) == ["a.txt", "c.txt", "sub/b.txt"]
    assert "python" not in first  # only the stdlib corpus depends on the interpreter
    assert prepare_data(cfg, progress=False).data_fingerprint == first  # cache hit: same record
    (root / "c.txt").write_text("gamma!\n")
    second = prepare_data(cfg, progress=False).data_fingerprint
    assert second["documents"]["c.txt"] != first["documents"]["c.txt"]
    assert describe_data_change(first, second).endswith("changed: c.txt (edited)")


def test_equal_records_describe_no_change():
    assert describe_data_change(record(), record()) is None
    # Only the compared components count (e.g. not the python version of a non-stdlib source).
    assert describe_data_change(record(), record(python="3.12.0")) is None


def test_documents_are_named_edited_added_removed_with_a_limit():
    before = record(documents={f"f{i}.txt": "x" for i in range(6)})
    after = record(
        corpus="c1",
        documents={**{f"f{i}.txt": "x" for i in range(1, 5)}, "f5.txt": "y", "g.txt": "z"},
    )
    assert describe_data_change(before, after) == (
        "the corpus of data.source=corpus/ changed: f5.txt (edited), g.txt (added), "
        "f0.txt (removed)"
    )
    after["documents"]["h.txt"] = "w"
    assert describe_data_change(before, after).endswith("g.txt (added), h.txt (added) and 1 more")


def test_without_document_lists_the_counts_are_given():
    before = {k: v for k, v in record().items() if k != "documents"}
    after = record(corpus="c1", n_documents=3)
    assert describe_data_change(before, after) == (
        "the corpus of data.source=corpus/ changed (2 documents then, 3 now)"
    )


def test_tokenizer_and_stream_only_changes():
    assert describe_data_change(record(), record(tokenizer="t1", train_tokens="a1")) == (
        "the tokenizer changed"
    )
    assert "token streams changed though the corpus text and tokenizer did not" in (
        describe_data_change(record(), record(val_tokens="b1"))
    )


def test_many_documents_are_not_listed(monkeypatch, make_tree, tmp_path):
    monkeypatch.setattr(fingerprint_module, "MAX_LISTED_DOCUMENTS", 2)
    root = make_tree({"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    cfg = DataConfig(source=str(root), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    fp = prepare_data(cfg, progress=False).data_fingerprint
    assert "documents" not in fp and fp["n_documents"] == 3


def test_check_resume_data(tmp_path):
    ckpt = tmp_path / "step_00000002"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_resume_data(record(), record(), ckpt)
        check_resume_data(None, record(), ckpt, report=False)  # other ranks stay quiet
        check_resume_data(None, record(), ckpt, step=0)  # has read no data (a converted model)
    with pytest.raises(DataError, match="step_00000002 was trained on: the tokenizer changed;"):
        check_resume_data(record(), record(tokenizer="t1"), ckpt)
    with pytest.warns(NestlearnWarning, match="resuming on changed data"):
        check_resume_data(record(), record(tokenizer="t1"), ckpt, allow_change=True)
    with pytest.warns(NestlearnWarning, match="records no data fingerprint"):
        check_resume_data(None, record(), ckpt, step=2)
