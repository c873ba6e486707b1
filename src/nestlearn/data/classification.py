"""Labelled text for class-incremental classification: CLINC150, Banking77, DBpedia-14.

Each loader returns a :class:`ClassificationData` (train and test examples whose labels are
readable class names, e.g. ``book flight``, ``card arrival``, ``educational institution``), read
either from local files in the data set's published format or, through the optional ``datasets``
extra, from the Hugging Face cache (strictly offline, like :mod:`nestlearn.data.hf`).

Local formats (``path`` is the file or the folder holding it):

- CLINC150 ``data_full.json``: ``{"train": [[text, intent], ...], "test": [...], ...}``; the
  out-of-scope intent ``oos`` (and the ``oos_*`` / ``val`` splits) are left out.
- Banking77: a folder with ``train.csv`` and ``test.csv``, header ``text,category``.
- DBpedia-14: a folder with ``train`` and ``test`` files, either ``.csv`` without a header (the
  original release: ``label,title,content``, labels 1..14), ``.csv`` with the header
  ``label,title,content`` or ``.parquet`` (the Hugging Face release; labels 0..13). The text of an
  example is ``"{title}. {content}"``.

A malformed file raises :class:`~nestlearn.errors.DataError` naming the file, the line (CSV), the
item (JSON) or the row (parquet), and the field.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.errors import DataError, require

DBPEDIA_CLASSES = (
    "Company",
    "EducationalInstitution",
    "Artist",
    "Athlete",
    "OfficeHolder",
    "MeanOfTransportation",
    "Building",
    "NaturalPlace",
    "Village",
    "Animal",
    "Plant",
    "Album",
    "Film",
    "WrittenWork",
)
CLINC_OUT_OF_SCOPE = "oos"
# name -> (Hugging Face dataset, configuration, text columns, label column)
HF_SOURCES: dict[str, tuple[str, str | None, tuple[str, ...], str]] = {
    "clinc150": ("clinc_oos", "plus", ("text",), "intent"),
    "banking77": ("PolyAI/banking77", None, ("text",), "label"),
    "dbpedia": ("fancyzhx/dbpedia_14", None, ("title", "content"), "label"),
}
DATASETS = tuple(HF_SOURCES)


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str  # a readable class name


@dataclass
class ClassificationData:
    name: str
    train: list[LabelledText]
    test: list[LabelledText]

    @property
    def labels(self) -> list[str]:
        """Class names in order of first appearance in the training split."""
        return list(dict.fromkeys(e.label for e in self.train))


def readable_label(name: str) -> str:
    """``book_flight`` -> ``book flight``; ``EducationalInstitution`` -> ``educational
    institution``: class names as words, so a language model can score them as text."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.replace("_", " "))
    return " ".join(spaced.lower().split())


def load_classification(name: str, path: str | Path | None = None) -> ClassificationData:
    """Data set ``name`` (one of :data:`DATASETS`) from local files, else from the HF cache."""
    if name not in HF_SOURCES:
        raise DataError(f"unknown classification data set {name!r}; choose one of {DATASETS}")
    if path is None:
        return load_hf_classification(name)
    readers = {"clinc150": read_clinc150, "banking77": read_banking77, "dbpedia": read_dbpedia}
    return readers[name](Path(path))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} does not exist: give the {what}")
    return path


def read_clinc150(path: Path) -> ClassificationData:
    """CLINC150's ``data_full.json`` (or a folder holding it), out-of-scope examples left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "data_full.json"
    _need(path, "CLINC150 data_full.json file or its folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with 'train' and 'test' lists")
    splits = {}
    for split in ("train", "test"):
        items = data.get(split)
        if not isinstance(items, list):
            raise DataError(f"{path}: no '{split}' list of [text, intent] pairs")
        examples = []
        for i, item in enumerate(items):
            where = f"{path}: '{split}' item {i}"
            if not isinstance(item, list) or len(item) != 2:
                raise DataError(f"{where} is {item!r}, not a [text, intent] pair")
            for field, value in zip(("text", "intent"), item, strict=True):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where} field '{field}' is {value!r}, not a non-empty string")
            if item[1] != CLINC_OUT_OF_SCOPE:
                examples.append(LabelledText(item[0], readable_label(item[1])))
        splits[split] = examples
    return ClassificationData("clinc150", splits["train"], splits["test"])


def read_banking77(path: Path) -> ClassificationData:
    """Banking77's ``train.csv`` and ``test.csv`` (header ``text,category``) in folder ``path``."""
    splits = {}
    for split in ("train", "test"):
        file = _need(Path(path) / f"{split}.csv", "Banking77 folder with train.csv and test.csv")
        splits[split] = [
            LabelledText(row["text"], readable_label(row["category"]))
            for row in _csv_rows(file, ("text", "category"), header=True)
        ]
    return ClassificationData("banking77", splits["train"], splits["test"])


def read_dbpedia(path: Path) -> ClassificationData:
    """DBpedia-14 ``train``/``test`` files in folder ``path`` (CSV or parquet, module docstring)."""
    splits = {}
    for split in ("train", "test"):
        files = sorted(Path(_need(Path(path), "DBpedia folder")).glob(f"{split}*.parquet"))
        if files:
            rows = [row for file in files for row in _parquet_rows(file)]
            splits[split] = [_dbpedia_example(row, where, 0) for row, where in rows]
            continue
        file = _need(Path(path) / f"{split}.csv", "DBpedia folder with train/test .csv or .parquet")
        header = _first_line(file).strip().lower() == "label,title,content"
        rows = _csv_rows(file, ("label", "title", "content"), header=header)
        # The original CSV numbers classes 1..14; the header/parquet release numbers them 0..13.
        base = 0 if header else 1
        splits[split] = [_dbpedia_example(row, row["_where"], base) for row in rows]
    return ClassificationData("dbpedia", splits["train"], splits["test"])


def _dbpedia_example(row: dict[str, Any], where: str, base: int) -> LabelledText:
    raw = row["label"]
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise DataError(f"{where} field 'label' is {raw!r}, not a class number") from None
    if not base <= label < base + len(DBPEDIA_CLASSES):
        raise DataError(
            f"{where} field 'label' is {label}, outside {base}..{base + len(DBPEDIA_CLASSES) - 1}"
        )
    for field in ("title", "content"):
        if not isinstance(row[field], str):
            raise DataError(f"{where} field '{field}' is {row[field]!r}, not text")
    text = f"{row['title'].strip()}. {row['content'].strip()}"
    return LabelledText(text, readable_label(DBPEDIA_CLASSES[label - base]))


def _first_line(file: Path) -> str:
    with open(file, encoding="utf-8", newline="") as f:
        return f.readline()


def _csv_rows(file: Path, fields: Sequence[str], header: bool) -> list[dict[str, Any]]:
    """Rows of a UTF-8 CSV as dicts (plus ``_where``: "FILE line N"); every field non-empty."""
    rows = []
    try:
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            if header:
                names = next(reader, [])
                missing = [k for k in fields if k not in names]
                if missing:
                    expected = ",".join(fields)
                    raise DataError(
                        f"{file} line 1: header {names} lacks {missing}; expected {expected}"
                    )
                index = [names.index(k) for k in fields]
            else:
                index = list(range(len(fields)))
            for record in reader:
                where = f"{file} line {reader.line_num}"
                if not record:
                    continue
                if len(record) <= max(index):
                    raise DataError(f"{where}: {len(record)} fields, expected {','.join(fields)}")
                row: dict[str, Any] = {"_where": where}
                for k, i in zip(fields, index, strict=True):
                    if not record[i].strip():
                        raise DataError(f"{where} field '{k}' is empty")
                    row[k] = record[i]
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{file}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{file} holds no examples")
    return rows


def _parquet_rows(file: Path) -> list[tuple[dict[str, Any], str]]:
    pq = require("pyarrow.parquet", "hf", "pyarrow")
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataError(f"{file} is not a readable parquet file ({exc})") from None
    missing = [k for k in ("label", "title", "content") if k not in table.column_names]
    if missing:
        raise DataError(f"{file} lacks columns {missing}; it has {table.column_names}")
    return [(row, f"{file} row {i}") for i, row in enumerate(table.to_pylist())]


def load_hf_classification(name: str) -> ClassificationData:
    """Data set ``name`` from the local Hugging Face cache (fetch it once with `datasets`)."""
    from nestlearn.data.hf import _offline

    datasets = require("datasets", "hf")
    hf_name, hf_config, text_fields, label_field = HF_SOURCES[name]
    splits = {}
    for split in ("train", "test"):
        try:
            with _offline():
                ds = datasets.load_dataset(hf_name, hf_config, split=split)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise DataError(
                f"cannot load '{hf_name}' split '{split}' from the Hugging Face cache ({reason}); "
                f"nestlearn is offline: fetch it once with datasets.load_dataset({hf_name!r}), or "
                "give local files with --data-path"
            ) from None
        splits[split] = hf_examples(ds, text_fields, label_field, f"{hf_name}[{split}]")
    if name == "clinc150":
        for split, examples in splits.items():
            splits[split] = [e for e in examples if e.label != CLINC_OUT_OF_SCOPE]
    return ClassificationData(name, splits["train"], splits["test"])


def hf_examples(
    ds: Any, text_fields: Sequence[str], label_field: str, where: str
) -> list[LabelledText]:
    """Rows of a `datasets.Dataset` as examples: text fields joined by ``". "``, the label a
    ``ClassLabel`` id turned into its readable name (or a string label made readable)."""
    missing = [k for k in (*text_fields, label_field) if k not in ds.column_names]
    if missing:
        raise DataError(f"{where} lacks columns {missing}; it has {ds.column_names}")
    names = getattr(ds.features[label_field], "names", None)
    examples = []
    columns = [ds[k] for k in text_fields]
    for i, (label, *texts) in enumerate(zip(ds[label_field], *columns, strict=True)):
        if names is not None and isinstance(label, int):
            label = names[label]
        if not isinstance(label, str):
            raise DataError(f"{where} row {i} field '{label_field}' is {label!r}, not a class")
        for field, text in zip(text_fields, texts, strict=True):
            if not isinstance(text, str):
                raise DataError(f"{where} row {i} field '{field}' is {text!r}, not text")
        text = ". ".join(t.strip() for t in texts)
        readable = label if label == CLINC_OUT_OF_SCOPE else readable_label(label)
        examples.append(LabelledText(text, readable))
    return examples


def per_class(examples: Iterable[LabelledText]) -> dict[str, list[LabelledText]]:
    """Examples grouped by label, labels in order of first appearance."""
    groups: dict[str, list[LabelledText]] = {}
    for e in examples:
        groups.setdefault(e.label, []).append(e)
    return groups
