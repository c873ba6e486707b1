"""JSON Lines data files: every wrong line is reported by number and field."""

from __future__ import annotations

import pytest

from nestlearn.errors import DataError
from nestlearn.eval.records import read_jsonl, write_jsonl

SCHEMA = {"n": ((int,), True), "x": ((int, float), False), "s": ((str,), False)}


def test_round_trip_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"n": 1, "x": 0.5}, {"n": 2, "s": "é"}])
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path, SCHEMA) == [{"n": 1, "x": 0.5}, {"n": 2, "s": "é"}]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"n": true}', "line 2: field 'n' must be an integer, got true"),
        ('{"n": 1.5}', "line 2: field 'n' must be an integer, got 1.5"),
        ('{"n": 1, "x": "1"}', "line 2: field 'x' must be an integer or a number"),
        ('{"x": 1}', "line 2: field 'n' is missing (required: n)"),
        ("[1]", "line 2: expected a JSON object, got list"),
        ("{", "line 2: not JSON"),
    ],
)
def test_errors_name_the_line_and_field(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text('{"n": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=None) as info:
        read_jsonl(path, SCHEMA)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl", SCHEMA)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_jsonl(tmp_path / "e.jsonl", SCHEMA)
