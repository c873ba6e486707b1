"""Classification loaders on small local files in each data set's published format."""

from __future__ import annotations

import json
import os

import pytest

from nestlearn.data.classification import (
    LabelledText,
    hf_examples,
    load_classification,
    load_hf_classification,
    readable_label,
)
from nestlearn.errors import DataError


@pytest.fixture
def datasets(monkeypatch, tmp_path):
    if os.environ.get("CI"):
        import datasets as module
    else:
        module = pytest.importorskip("datasets")
    monkeypatch.setattr(module.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return module


def test_readable_labels():
    assert readable_label("book_flight") == "book flight"
    assert readable_label("EducationalInstitution") == "educational institution"
    assert readable_label("Refund_not_showing_up") == "refund not showing up"
    assert readable_label("oos") == "oos"


def write_clinc(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_clinc150_drops_out_of_scope(tmp_path):
    write_clinc(
        tmp_path / "data_full.json",
        {
            "train": [["wake me at 7", "alarm"], ["what is up", "oos"], ["fly me", "book_flight"]],
            "val": [["ignored", "alarm"]],
            "test": [["set an alarm", "alarm"]],
            "oos_train": [["junk", "oos"]],
        },
    )
    data = load_classification("clinc150", tmp_path)  # the folder or the file
    assert data.train == [
        LabelledText("wake me at 7", "alarm"),
        LabelledText("fly me", "book flight"),
    ]
    assert data.test == [LabelledText("set an alarm", "alarm")]
    assert data.labels == ["alarm", "book flight"]
    assert load_classification("clinc150", tmp_path / "data_full.json").train == data.train


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"train": [["a", "b"]],\n "test": [oops]}', r"line 2 column 11: not valid JSON"),
        ({"train": [["a", "b"]]}, r"no 'test' list"),
        ({"train": [["a", "b"], ["c"]], "test": []}, r"'train' item 1 is \['c'\]"),
        ({"train": [["a", 3]], "test": []}, r"'train' item 0 field 'intent' is 3"),
        ({"train": [], "test": [["", "x"]]}, r"'test' item 0 field 'text' is ''"),
    ],
)
def test_clinc150_errors_name_the_item_and_field(tmp_path, content, message):
    path = tmp_path / "data_full.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_clinc(path, content)
    with pytest.raises(DataError, match=message):
        load_classification("clinc150", path)


def write_banking(folder, train: str, test: str = "text,category\nhi,card_arrival\n") -> None:
    folder.mkdir(exist_ok=True)
    (folder / "train.csv").write_text(train, encoding="utf-8")
    (folder / "test.csv").write_text(test, encoding="utf-8")


def test_banking77_reads_quoted_csv(tmp_path):
    write_banking(
        tmp_path / "b",
        'text,category\n"Where is my card, please?",card_arrival\nrefund?,Refund_not_showing_up\n',
    )
    data = load_classification("banking77", tmp_path / "b")
    assert data.train == [
        LabelledText("Where is my card, please?", "card arrival"),
        LabelledText("refund?", "refund not showing up"),
    ]
    assert data.test == [LabelledText("hi", "card arrival")]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("sentence,label\nhi,x\n", r"train.csv line 1: header .* lacks \['text', 'category'\]"),
        ("text,category\nhi,x\nonly one field\n", r"train.csv line 3: 1 fields"),
        ("text,category\nhi,x\n ,card\n", r"train.csv line 3 field 'text' is empty"),
        ("text,category\n", r"train.csv holds no examples"),
    ],
)
def test_banking77_errors_name_the_line_and_field(tmp_path, train, message):
    write_banking(tmp_path / "b", train)
    with pytest.raises(DataError, match=message):
        load_classification("banking77", tmp_path / "b")


def test_banking77_missing_files_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"train.csv does not exist"):
        load_classification("banking77", tmp_path)
    write_banking(tmp_path / "b", "text,category\n")
    (tmp_path / "b" / "train.csv").write_bytes(b"text,category\n\xff\xfe,x\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_classification("banking77", tmp_path / "b")


def test_dbpedia_original_csv_is_one_based(tmp_path):
    (tmp_path / "train.csv").write_text(
        '1,"Acme","Acme makes, well, everything."\n14,Moby-Dick,A novel.\n', encoding="utf-8"
    )
    (tmp_path / "test.csv").write_text("9,Smallville,A village.\n", encoding="utf-8")
    data = load_classification("dbpedia", tmp_path)
    assert data.train == [
        LabelledText("Acme. Acme makes, well, everything.", "company"),
        LabelledText("Moby-Dick. A novel.", "written work"),
    ]
    assert data.test == [LabelledText("Smallville. A village.", "village")]


def test_dbpedia_csv_with_header_is_zero_based(tmp_path):
    (tmp_path / "train.csv").write_text("label,title,content\n0,Acme,A firm.\n", encoding="utf-8")
    (tmp_path / "test.csv").write_text("label,title,content\n13,Book,Text.\n", encoding="utf-8")
    data = load_classification("dbpedia", tmp_path)
    assert [e.label for e in data.train + data.test] == ["company", "written work"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("15,A,B", r"train.csv line 2 field 'label' is 15, outside 1..14"),
        ("x,A,B", r"train.csv line 2 field 'label' is 'x', not a class number"),
        ("3,A,", r"train.csv line 2 field 'content' is empty"),
    ],
)
def test_dbpedia_csv_errors_name_the_line_and_field(tmp_path, row, message):
    (tmp_path / "train.csv").write_text(f"1,Acme,A firm.\n{row}\n", encoding="utf-8")
    (tmp_path / "test.csv").write_text("1,Acme,A firm.\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_classification("dbpedia", tmp_path)


def test_dbpedia_parquet_as_published_on_the_hub(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {"label": [0, 9], "title": ["Acme", "Cat"], "content": ["A firm.", "An animal."]}
    pq.write_table(pa.table(rows), tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({k: v[:1] for k, v in rows.items()}), tmp_path / "test.parquet")
    data = load_classification("dbpedia", tmp_path)
    assert [e.label for e in data.train] == ["company", "animal"]
    assert data.test == [LabelledText("Acme. A firm.", "company")]
    bad = {"label": [0], "title": ["Acme"], "content": [None]}
    pq.write_table(pa.table(bad), tmp_path / "test.parquet")
    with pytest.raises(DataError, match=r"test.parquet row 0 field 'content' is None"):
        load_classification("dbpedia", tmp_path)


def test_unknown_data_set_lists_the_known_ones():
    with pytest.raises(DataError, match=r"unknown classification data set 'imdb'.*clinc150"):
        load_classification("imdb", "x")


def test_hub_rows_turn_class_ids_into_names(datasets):
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "intent": datasets.ClassLabel(names=["book_flight", "oos", "alarm"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"text": ["fly", "huh", "wake"], "intent": [0, 1, 2]}, features=features
    )
    assert hf_examples(ds, ["text"], "intent", "clinc") == [
        LabelledText("fly", "book flight"),
        LabelledText("huh", "oos"),
        LabelledText("wake", "alarm"),
    ]
    two = datasets.Dataset.from_dict({"label": ["Film"], "title": ["Up"], "content": ["Film."]})
    assert hf_examples(two, ["title", "content"], "label", "db") == [
        LabelledText("Up. Film.", "film")
    ]
    with pytest.raises(DataError, match=r"clinc lacks columns \['label'\]"):
        hf_examples(ds, ["text"], "label", "clinc")


def test_uncached_hub_data_fails_offline(datasets):
    with pytest.raises(DataError, match=r"nestlearn is offline.*--data-path"):
        load_hf_classification("banking77")
