"""Reading, capping, splitting and fingerprinting corpora."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from nestlearn.config.schema import DataConfig
from nestlearn.data import Document, corpus_fingerprint, read_documents, split_documents
from nestlearn.data.corpus import STDLIB_EXCLUDED, _list_files
from nestlearn.errors import DataError

STDLIB_CAP = 200_000


@pytest.fixture(scope="module")
def stdlib_docs() -> list[Document]:
    return read_documents(DataConfig(max_bytes=STDLIB_CAP))


def names(docs: list[Document]) -> list[str]:
    return [d.name for d in docs]


def test_stdlib_corpus_is_found_capped_and_deterministic(stdlib_docs):
    assert len(stdlib_docs) >= 2
    assert all(d.name.endswith(".py") and not Path(d.name).is_absolute() for d in stdlib_docs)
    assert 0 < sum(len(d.text.encode()) for d in stdlib_docs) <= STDLIB_CAP
    assert names(stdlib_docs) == sorted(names(stdlib_docs))
    assert read_documents(DataConfig(max_bytes=STDLIB_CAP)) == stdlib_docs


def test_stdlib_listing_is_python_files_without_site_packages():
    files = _list_files("stdlib")
    assert len(files) > 500
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(path.suffix == ".py" and path.is_relative_to(root) for _, path in files)
    assert not any(STDLIB_EXCLUDED & set(Path(name).parts) for name, _ in files)


def test_stdlib_split_is_by_file_deterministic_and_seeded(stdlib_docs):
    train, val = split_documents(stdlib_docs, 0.05, 0)
    assert train and val
    assert set(names(train)).isdisjoint(names(val))
    assert sorted(names(train) + names(val)) == names(stdlib_docs)
    assert split_documents(stdlib_docs, 0.05, 0) == (train, val)
    others = {tuple(names(split_documents(stdlib_docs, 0.05, seed)[1])) for seed in range(1, 8)}
    assert others - {tuple(names(val))}


def test_split_fraction_and_seed_on_many_documents():
    docs = [Document(f"f{i:03d}.txt", "x\n") for i in range(400)]
    train, val = split_documents(docs, 0.25, 0)
    assert 60 <= len(val) <= 140
    assert len(train) + len(val) == len(docs)
    assert names(split_documents(docs, 0.25, 1)[1]) != names(val)
    # A document's side depends only on its own name, not on the other documents.
    sub_val = split_documents(docs[:200], 0.25, 0)[1]
    assert set(names(sub_val)) == set(names(val)) & set(names(docs[:200]))


@pytest.mark.parametrize("fraction", [0.0, 0.999999])
def test_split_keeps_both_sides_non_empty(fraction):
    docs = [Document("a", "1"), Document("b", "2"), Document("c", "3")]
    train, val = split_documents(docs, fraction, 0)
    assert train and val and len(train) + len(val) == 3


def test_single_document_is_cut_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(10))
    train, val = split_documents([Document("one.txt", text)], 0.3, 0)
    assert names(train) == ["one.txt#train"] and names(val) == ["one.txt#val"]
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n") and train[0].text.count("\n") == 7


def test_single_document_without_line_breaks_is_cut_at_a_character():
    train, val = split_documents([Document("one", "abcdefghij")], 0.2, 0)
    assert (train[0].text, val[0].text) == ("abcdefgh", "ij")


def test_split_errors():
    with pytest.raises(DataError, match="too little"):
        split_documents([Document("a", "x")], 0.1, 0)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents([Document("a", "x"), Document("b", "y")], 1.0, 0)


def test_folder_reads_text_files_exactly_and_skips_the_rest(make_tree):
    root = make_tree(
        {
            "a.txt": "alpha\r\nbeta\n",
            "sub/b.md": "# héllo 🎉\n",
            ".git/config": "[core]\n",
            "bin.dat": b"\x00\x01\x02text",
            "latin1.txt": b"caf\xe9\n",
            "empty.txt": "",
        }
    )
    docs = read_documents(DataConfig(source=str(root)))
    assert docs == [Document("a.txt", "alpha\r\nbeta\n"), Document("sub/b.md", "# héllo 🎉\n")]


def test_file_and_glob_sources(make_tree):
    root = make_tree({"a.txt": "a\n", "b.txt": "b\n", "sub/c.txt": "c\n", "d.md": "d\n"})
    assert read_documents(DataConfig(source=str(root / "a.txt"))) == [Document("a.txt", "a\n")]
    flat = read_documents(DataConfig(source=str(root / "*.txt")))
    assert names(flat) == ["a.txt", "b.txt"]
    deep = read_documents(DataConfig(source=str(root / "**" / "*.txt")))
    assert names(deep) == ["a.txt", "b.txt", "sub/c.txt"]
    assert names(read_documents(DataConfig(source=str(root / "[bd].*")))) == ["b.txt", "d.md"]


def test_missing_source_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: point data\.source"):
        read_documents(DataConfig(source=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="matched no files"):
        read_documents(DataConfig(source=str(tmp_path / "*.nothing")))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "has no documents"),
        ({"a.txt": "", "b.txt": ""}, r"has no text: .* point data\.source"),
        ({"a.bin": b"\x00\xff"}, "has no UTF-8 text"),
    ],
)
def test_empty_corpora_raise(make_tree, files, message):
    root = make_tree(files)
    with pytest.raises(DataError, match=message):
        read_documents(DataConfig(source=str(root)))


def test_max_bytes_cap_is_deterministic_and_cuts_at_lines(make_tree):
    files = {f"f{i:02d}.txt": "".join(f"{i} line {j}\n" for j in range(40)) for i in range(30)}
    root = make_tree(files)
    cap = 5_000
    docs = read_documents(DataConfig(source=str(root), max_bytes=cap))
    assert 0.9 * cap < sum(len(d.text.encode()) for d in docs) <= cap
    assert all(files[d.name].startswith(d.text) and d.text.endswith("\n") for d in docs)
    assert sum(d.text != files[d.name] for d in docs) <= 1
    assert read_documents(DataConfig(source=str(root), max_bytes=cap)) == docs
    reseeded = read_documents(DataConfig(source=str(root), max_bytes=cap, split_seed=3))
    assert names(reseeded) != names(docs)


def test_fingerprint_tracks_names_texts_and_split_settings():
    docs = [Document("a", "x"), Document("b", "y")]
    cfg = DataConfig()
    fp = corpus_fingerprint(docs, cfg)
    assert fp == corpus_fingerprint(list(docs), DataConfig()) and len(fp) == 64
    assert fp != corpus_fingerprint([Document("a", "x"), Document("b", "z")], cfg)
    assert fp != corpus_fingerprint([Document("a", "x"), Document("c", "y")], cfg)
    assert fp != corpus_fingerprint([Document("a", "xb"), Document("", "y")], cfg)
    assert fp != corpus_fingerprint(docs, DataConfig(split_seed=1))
    assert fp != corpus_fingerprint(docs, DataConfig(val_fraction=0.1))
