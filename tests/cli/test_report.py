"""``nestlearn report``: a table per experiment from many runs, figures linked, bad files named."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli.main import main
from nestlearn.eval.results import write_result


def fake_run(folder, experiment="mqar", headers=("model", "acc"), rows=(("a", 0.5),)):
    (folder).mkdir(parents=True)
    (folder / "fig.png").write_bytes(b"\x89PNG")
    write_result(
        folder, experiment, args={"seed": 0}, headers=headers, rows=rows, figures=["fig.png"]
    )
    return folder


def test_results_of_one_experiment_share_a_table(tmp_path, capsys):
    fake_run(tmp_path / "one")
    fake_run(tmp_path / "two", rows=(("b", 0.75), ("c", None)))
    fake_run(tmp_path / "other", experiment="niah", headers=("model", "L=256"))
    out = tmp_path / "paper" / "report.md"
    argv = ["report", str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "other")]
    assert main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    mqar = text[text.index("## mqar") : text.index("## niah")]
    assert "| run | model | acc |" in mqar
    assert (
        "| one | a | 0.5 |" in mqar and "| two | b | 0.75 |" in mqar and "| two | c | — |" in mqar
    )
    # Figures are linked relative to the report file.
    assert "(../one/fig.png)" in mqar and "(../two/fig.png)" in mqar
    assert "| other | model | L=256 |" not in text and "| run | model | L=256 |" in text
    # Without --out the report is printed.
    assert main(["report", str(tmp_path / "one")]) == 0
    assert "| one | a | 0.5 |" in capsys.readouterr().out


def test_folders_are_searched_and_differing_tables_kept_apart(tmp_path):
    fake_run(tmp_path / "sweep" / "small")
    fake_run(tmp_path / "sweep" / "big", headers=("model", "acc", "extra"), rows=(("z", 1, 2),))
    out = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "sweep"), "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    assert "| run | model | acc |" in lines and "| run | model | acc | extra |" in lines
    assert "| sweep/small | a | 0.5 |" in text and "| sweep/big | z | 1 | 2 |" in text


def test_results_without_a_table_bring_their_markdown_or_numbers(tmp_path):
    with_md = tmp_path / "cl"
    with_md.mkdir()
    (with_md / "result.json").write_text(json.dumps({"experiment": "continual", "acc": 0.4}))
    (with_md / "table.md").write_text("# Continual\n\n| ACC |\n|---|\n| 0.4 |\n")
    bare = tmp_path / "tt"
    bare.mkdir()
    record = {"experiment": "test_time", "metrics": {"recall": 0.9}, "steps": 3, "x": [1]}
    (bare / "result.json").write_text(json.dumps(record))
    out = tmp_path / "r.md"
    assert main(["report", str(with_md), str(bare), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### cl" in text and "### Continual" in text and "| 0.4 |" in text
    assert "| steps | recall |" in text and "| 3 | 0.9 |" in text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "result.json is not JSON (line 1"),
        ('{"table": {}}', "field 'experiment'"),
        ('{"experiment": "x", "table": {"headers": ["a"], "rows": [[1, 2]]}}', "field 'table'"),
    ],
)
def test_bad_result_files_are_named(tmp_path, capsys, content, fragment):
    (tmp_path / "result.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(tmp_path / "result.json") in err


def test_a_folder_without_results_says_what_to_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no result.json in or below" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
