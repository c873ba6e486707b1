"""``nestlearn experiment mqar`` end to end at a seconds-long size, and its bad inputs."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli.main import main

TINY = [
    "--seq-lens", "16", "24", "--pairs", "2", "4", "--vocab", "32", "--steps", "3",
    "--batch-size", "4", "--test-examples", "8", "--d-model", "16", "--no-progress",
]  # fmt: skip


def test_trains_and_scores_every_model_on_every_cell(tmp_path):
    out = tmp_path / "mqar"
    argv = ["experiment", "mqar", *TINY, "--models", "transformer", "gated_deltanet"]
    argv += ["--set", "chunk_size=8"]  # gated_deltanet has it, the transformer does not
    assert main([*argv, "--out", str(out), "--save-test", str(tmp_path / "test.jsonl")]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "mqar"
    assert result["table"]["headers"] == ["model", "params", "T", "P=2 (%)", "P=4 (%)"]
    rows = result["table"]["rows"]
    assert [r[:1] + r[2:3] for r in rows] == [
        ["transformer", 16], ["transformer", 24], ["gated_deltanet", 16], ["gated_deltanet", 24]
    ]  # fmt: skip
    # T=16 holds at most 4 pairs; every cell has 8 test sequences of P queries each.
    for model in result["results"]:
        assert {(c["seq_len"], c["n_pairs"]): c["queries"] for c in model["cells"]} == {
            (16, 2): 16, (16, 4): 32, (24, 2): 16, (24, 4): 32
        }  # fmt: skip
        assert all(0.0 <= c["accuracy"] <= 1.0 for c in model["cells"])
        assert len(model["loss_curve"]) == 3
    assert (out / "mqar.png").stat().st_size > 0
    assert "| transformer |" in (out / "results.md").read_text()

    # The saved test sets score again from the file, cell for cell.
    again = tmp_path / "again"
    assert main([*argv, "--out", str(again), "--test-file", str(tmp_path / "test.jsonl")]) == 0
    first = {m["model"]: m["cells"] for m in result["results"]}
    second = {
        m["model"]: m["cells"] for m in json.loads((again / "result.json").read_text())["results"]
    }
    for model, cells in first.items():
        assert [c["queries"] for c in cells] == [c["queries"] for c in second[model]]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"inputs": [1, 2], "targets": [-100, 3]}', "line 2: field 'n_pairs' is missing"),
        (
            '{"inputs": "1 2", "targets": [1, 2], "n_pairs": 1}',
            "line 2: field 'inputs' must be a list",
        ),
        ("not json", "line 2: not JSON"),
        ('{"inputs": [1, 99], "targets": [-100, 3], "n_pairs": 1}', "record 2: field 'inputs'"),
    ],
)
def test_a_malformed_test_file_names_the_line_and_field(tmp_path, capsys, line, fragment):
    data = tmp_path / "bad.jsonl"
    good = '{"inputs": [1, 2, 3, 4], "targets": [-100, -100, 5, -100], "n_pairs": 1}'
    data.write_text(good + "\n" + line + "\n")
    argv = ["experiment", "mqar", *TINY, "--models", "transformer", "--test-file", str(data)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(data) in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seq-lens", "8", "--pairs", "4"], "no (T, pairs) setting has T >= 4 * pairs"),
        (["--vocab", "6"], "use vocab_size >= 10"),
        (["--set", "chunk_sise=8"], "--set chunk_sise=...: none of the models transformer has it"),
        (["--models", "nope"], "unknown model.name 'nope'"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, extra, fragment):
    argv = ["experiment", "mqar", *TINY, "--models", "transformer", *extra]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_a_model_that_diverges_is_reported_not_run(tmp_path, capsys, monkeypatch):
    import nestlearn.experiments.mqar as experiment
    from nestlearn.errors import NonFiniteLossError

    def diverge(model, sample, **kwargs):
        raise NonFiniteLossError(f"{kwargs['desc']}: the loss became non-finite at step 7")

    monkeypatch.setattr(experiment, "train_synthetic", diverge)
    out = tmp_path / "o"
    assert main(["experiment", "mqar", *TINY, "--models", "transformer", "--out", str(out)]) == 0
    assert "non-finite at step 7; its cells are reported as not run" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["table"]["rows"][0][3:] == [None, None]
    assert "step 7" in result["results"][0]["diverged"]
    assert "| transformer |" in (out / "results.md").read_text()


def test_presets_fill_unset_flags_and_given_flags_win():
    from nestlearn.experiments.model_source import apply_preset
    from nestlearn.experiments.mqar import PRESETS, build_parser

    tiny = apply_preset(build_parser().parse_args([]), PRESETS)
    assert (tiny.vocab, tiny.steps, tiny.d_model) == (32, 1500, 64)
    paper = apply_preset(build_parser().parse_args(["--preset", "paper", "--steps", "7"]), PRESETS)
    assert (paper.vocab, paper.seq_lens[-1], paper.pairs[-1]) == (8192, 512, 64)
    assert paper.steps == 7
    # Every preset is a valid MQAR setting and fills every flag it names.
    for name, values in PRESETS.items():
        args = apply_preset(build_parser().parse_args(["--preset", name]), PRESETS)
        assert all(getattr(args, k) == v for k, v in values.items())
