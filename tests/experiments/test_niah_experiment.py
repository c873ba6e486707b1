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
    assert row[0] == "run step 2" and row[2] != "—" and row[3] == "—"
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


def _run(out, *extra):
    return main(["experiment", "niah", *TINY, "--out", str(out), *extra])


def test_seeds_give_one_record_per_model_and_seed_and_a_summary_with_spreads(tmp_path):
    out = tmp_path / "niah"
    assert _run(out, "--models", "transformer", "gated_deltanet", "--seeds", "2") == 0
    result = json.loads((out / "result.json").read_text())
    assert [(r["model"], r["seed"]) for r in result["results"]] == [
        ("transformer", 0), ("transformer", 1), ("gated_deltanet", 0), ("gated_deltanet", 1)
    ]  # fmt: skip
    summary = result["summary"]
    assert set(summary) == {"transformer", "gated_deltanet"}
    assert set(summary["transformer"]) == {"L=140", "L=180", "accuracy"}
    runs = result["results"][:2]
    per_seed = [
        sum(c["accuracy"] for c in r["cells"] if c["length"] == 180) / 2 for r in runs
    ]  # 2 depths
    stat = summary["transformer"]["L=180"]
    assert stat["values"] == pytest.approx(per_seed) and stat["n"] == 2
    assert stat["std"] is not None
    assert summary["transformer"]["accuracy"]["values"] == pytest.approx(
        [sum(c["accuracy"] for c in r["cells"]) / 4 for r in runs]
    )
    rows = result["table"]["rows"]
    assert [r[:2] for r in rows] == [["transformer", "passkey"], ["gated_deltanet", "passkey"]]
    assert all(" ± " in cell for r in rows for cell in r[2:])
    assert "2 seeds (0, 1)" in (out / "results.md").read_text()
    assert (out / "units" / "gated_deltanet-seed1.json").exists()


def test_a_needle_per_seed_is_summarized_per_needle_too(tmp_path):
    out = tmp_path / "niah"
    assert _run(out, "--models", "transformer", "--needles", "passkey", "number",
                "--lengths", "190", "--train-lengths", "190") == 0  # fmt: skip
    summary = json.loads((out / "result.json").read_text())["summary"]["transformer"]
    assert set(summary) == {"L=190", "passkey L=190", "number L=190", "accuracy"}
    both = summary["L=190"]["mean"]
    assert both == pytest.approx(
        (summary["passkey L=190"]["mean"] + summary["number L=190"]["mean"]) / 2
    )


def test_models_run_apart_then_the_full_command_only_assembles(tmp_path, monkeypatch, capsys):
    import nestlearn.experiments.niah as experiment

    out = tmp_path / "niah"
    assert _run(out, "--models", "transformer", "--seeds", "2") == 0
    assert _run(out, "--models", "gated_deltanet", "--seeds", "2") == 0
    stored = json.loads((out / "units" / "transformer-seed1.json").read_text())["record"]
    capsys.readouterr()

    def fail(*args, **kwargs):
        raise AssertionError("a stored unit was trained again")

    monkeypatch.setattr(experiment, "train_synthetic", fail)
    assert _run(out, "--models", "transformer", "gated_deltanet", "--seeds", "2") == 0
    assert "gated_deltanet seed 1: reused" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert [(r["model"], r["seed"]) for r in result["results"]] == [
        ("transformer", 0), ("transformer", 1), ("gated_deltanet", 0), ("gated_deltanet", 1)
    ]  # fmt: skip
    assert result["results"][1]["cells"] == stored["cells"]
    with pytest.raises(AssertionError, match="trained again"):
        _run(out, "--models", "transformer", "--seeds", "2", "--steps", "3")


def test_a_seed_that_diverges_is_missing_from_the_spread(tmp_path, monkeypatch, capsys):
    import nestlearn.experiments.niah as experiment
    from nestlearn.errors import NonFiniteLossError

    real = experiment.train_synthetic

    def diverge_seed_0(model, sample, **kwargs):
        if "seed 0" in kwargs["desc"]:
            raise NonFiniteLossError(f"{kwargs['desc']}: the loss became non-finite at step 1")
        return real(model, sample, **kwargs)

    monkeypatch.setattr(experiment, "train_synthetic", diverge_seed_0)
    out = tmp_path / "o"
    assert _run(out, "--models", "transformer", "--seeds", "2") == 0
    assert "non-finite at step 1; its cells are reported as not run" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    stat = result["summary"]["transformer"]["L=140"]
    assert (stat["n"], stat["missing"], stat["values"][0]) == (1, 1, None)
    assert "diverged" in result["results"][0]
    assert "(1 failed)" in result["table"]["rows"][0][2]


def test_the_cpu_preset_runs_every_model_over_three_seeds_beyond_the_training_length():
    from nestlearn.experiments.model_source import apply_preset
    from nestlearn.experiments.niah import DEFAULT_MODELS, PRESETS, build_parser

    args = apply_preset(build_parser().parse_args(["--preset", "cpu"]), PRESETS)
    assert args.seeds == [0, 1, 2]
    assert DEFAULT_MODELS == ("hope", "hope_attention", "titans_lmm", "gated_deltanet",
                              "transformer")  # fmt: skip
    trained = max(args.train_lengths)
    assert max(args.lengths) >= 4 * trained and min(args.lengths) <= trained
