"""``nestlearn experiment niah`` / ``nestlearn eval niah``: fresh models, checkpoints, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from nestlearn.cli.main import main
from nestlearn.train.checkpoint import resolve_checkpoint

TINY = [
    "--lengths", "140", "180", "--depths", "0", "1", "--samples-per-cell", "2",
    "--train-lengths", "140", "--steps", "2", "--batch-size", "2", "--d-model", "16",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step debug run whose Transformer reads 160 tokens: 140 fit, 180 do not."""
    out = tmp_path_factory.mktemp("niah") / "run"
    argv = ["train", "debug", f"train.out_dir={out}", "train.steps=2", "model.max_seq_len=160"]
    assert main(argv) == 0
    return out


def test_fresh_models_train_then_fill_the_heat_map(tmp_path):
    out = tmp_path / "niah"
    argv = ["experiment", "niah", *TINY, "--models", "transformer", "gated_deltanet"]
    argv += ["--needles", "passkey", "number", "--lengths", "190", "211", "--train-lengths", "190"]
    assert main([*argv, "--set", "chunk_size=16", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["table"]["headers"] == ["model", "needle", "L=190 (%)", "L=211 (%)", "mean (%)"]
    assert [r[:2] for r in result["table"]["rows"]] == [
        ["transformer", "passkey"], ["transformer", "number"],
        ["gated_deltanet", "passkey"], ["gated_deltanet", "number"],
    ]  # fmt: skip
    for model in result["results"]:
        # 2 needles x 2 lengths x 2 depths, each an accuracy over 2 samples.
        assert len(model["cells"]) == 8
        assert all(c["accuracy"] in (0.0, 0.5, 1.0) for c in model["cells"])
    assert (out / "niah.png").stat().st_size > 0


def test_a_checkpoint_is_tested_where_it_fits(run_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    samples = tmp_path / "samples.jsonl"
    argv = ["eval", "niah", str(run_dir), *TINY, "--out", str(out)]
    assert main([*argv, "--save-samples", str(samples)]) == 0
    assert "lengths [180] do not fit its context limit (160 tokens)" in capsys.readouterr().out
    row = json.loads((out / "result.json").read_text())["table"]["rows"][0]
    assert row[0] == "run step 2" and row[2] is not None and row[3] is None
    # The saved prompts can be tested again from the file.
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 8 and {r["length"] for r in records} == {140, 180}
    assert main([*argv, "--samples", str(samples), "--out", str(tmp_path / "again")]) == 0


def test_a_checkpoint_without_its_tokenizer_is_named(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (resolve_checkpoint(copy) / "tokenizer.json").unlink()
    assert main(["eval", "niah", str(copy), *TINY, "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"prompt": "What is it?"}', "line 2: field 'answer' is missing"),
        ('{"prompt": "x", "answer": 7}', "line 2: field 'answer' must be a string, got 7"),
        ('{"prompt": "x", "answer": "7", "depht": 0.5}', "line 2: unknown field 'depht'"),
        ('["x", "7"]', "line 2: expected a JSON object"),
    ],
)
def test_a_malformed_samples_file_names_the_line_and_field(tmp_path, capsys, line, fragment):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "The key is 4. The key is", "answer": "4"}\n' + line + "\n")
    argv = ["experiment", "niah", *TINY, "--models", "transformer", "--samples", str(data)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(data) in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--lengths", "60"], "--lengths: length=60 tokens is too short for the passkey needle"),
        (["--train-lengths", "50"], "--train-lengths: length=50 tokens is too short"),
        (["--depths", "1.5"], "every depth must be in [0, 1]"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, extra, fragment):
    argv = ["experiment", "niah", *TINY, "--models", "transformer", *extra]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_presets_fill_unset_flags_and_given_flags_win():
    from nestlearn.experiments.model_source import apply_preset
    from nestlearn.experiments.niah import PRESETS, build_parser

    tiny = apply_preset(build_parser().parse_args([]), PRESETS)
    assert (tiny.lengths, tiny.train_lengths, tiny.needles) == ([192, 384, 768], [192], ["passkey"])
    paper = apply_preset(build_parser().parse_args(["--preset", "paper", "--lr", "0.5"]), PRESETS)
    assert paper.needles == ["passkey", "number", "uuid"] and paper.lengths[-1] == 8192
    assert paper.lr == 0.5
