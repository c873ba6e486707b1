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
    assert all("±" not in cell for r in rows for cell in r[3:])  # one seed: no spread
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
    assert result["table"]["rows"][0][3:] == ["—", "—"]
    assert result["summary"]["transformer"]["accuracy"]["missing"] == 1
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


def _run(out, *extra):
    return main(["experiment", "mqar", *TINY, "--out", str(out), *extra])


def test_seeds_give_one_record_per_model_and_seed_and_a_summary_with_spreads(tmp_path):
    out = tmp_path / "mqar"
    assert _run(out, "--models", "transformer", "gated_deltanet", "--seeds", "2") == 0
    result = json.loads((out / "result.json").read_text())
    assert [(r["model"], r["seed"]) for r in result["results"]] == [
        ("transformer", 0), ("transformer", 1), ("gated_deltanet", 0), ("gated_deltanet", 1)
    ]  # fmt: skip
    # Each seed has its own test sets (and init, and training batches).
    first, second = result["results"][:2]
    assert first["cells"] != second["cells"]
    summary = result["summary"]
    assert list(summary) == ["transformer", "gated_deltanet"]
    assert set(summary["transformer"]) == {"T=16,P=2", "T=16,P=4", "T=24,P=2", "T=24,P=4",
                                           "accuracy"}  # fmt: skip
    cell = summary["transformer"]["T=24,P=4"]
    accs = [next(c["accuracy"] for c in r["cells"] if (c["seq_len"], c["n_pairs"]) == (24, 4))
            for r in (first, second)]  # fmt: skip
    assert cell["values"] == accs and cell["n"] == 2 and cell["std"] is not None
    assert cell["mean"] == pytest.approx(sum(accs) / 2)
    means = [sum(c["accuracy"] for c in r["cells"]) / 4 for r in (first, second)]
    assert summary["transformer"]["accuracy"]["values"] == pytest.approx(means)
    # The table shows mean ± std in %, the figure title the seeds.
    assert all(" ± " in cell for r in result["table"]["rows"] for cell in r[3:])
    assert "2 seeds (0, 1)" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "units").iterdir()) == [
        "gated_deltanet-seed0.json", "gated_deltanet-seed1.json",
        "transformer-seed0.json", "transformer-seed1.json",
    ]  # fmt: skip


def _no_training(monkeypatch):
    import nestlearn.experiments.mqar as experiment

    def fail(*args, **kwargs):
        raise AssertionError("a stored unit was trained again")

    monkeypatch.setattr(experiment, "train_synthetic", fail)


def test_models_run_apart_then_the_full_command_only_assembles(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mqar"
    assert _run(out, "--models", "transformer", "--seed", "0", "3") == 0
    assert _run(out, "--models", "gated_deltanet", "--seed", "0", "3") == 0
    first = json.loads((out / "units" / "transformer-seed3.json").read_text())["record"]
    capsys.readouterr()
    _no_training(monkeypatch)
    argv = ["--models", "transformer", "gated_deltanet", "--seed", "0", "3"]
    assert _run(out, *argv) == 0
    assert "transformer seed 3: reused" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert [(r["model"], r["seed"]) for r in result["results"]] == [
        ("transformer", 0), ("transformer", 3), ("gated_deltanet", 0), ("gated_deltanet", 3)
    ]  # fmt: skip
    assert result["results"][1]["cells"] == first["cells"]
    assert set(result["summary"]) == {"transformer", "gated_deltanet"}
    # A changed setting is not reused: it trains (here: fails, training is patched out).
    with pytest.raises(AssertionError, match="trained again"):
        _run(out, *argv, "--lr", "0.01")


def test_a_seed_that_diverges_is_missing_from_the_spread(tmp_path, monkeypatch):
    import nestlearn.experiments.mqar as experiment
    from nestlearn.errors import NonFiniteLossError

    real = experiment.train_synthetic

    def diverge_seed_1(model, sample, **kwargs):
        if "seed 1" in kwargs["desc"]:
            raise NonFiniteLossError(f"{kwargs['desc']}: the loss became non-finite at step 2")
        return real(model, sample, **kwargs)

    monkeypatch.setattr(experiment, "train_synthetic", diverge_seed_1)
    out = tmp_path / "o"
    assert _run(out, "--models", "transformer", "--seeds", "3") == 0
    result = json.loads((out / "result.json").read_text())
    stat = result["summary"]["transformer"]["T=16,P=2"]
    assert (stat["n"], stat["missing"], stat["values"][1]) == (2, 1, None)
    assert all("(1 failed)" in cell for cell in result["table"]["rows"][0][3:])


def test_the_cpu_preset_runs_every_model_over_three_seeds():
    from nestlearn.eval.mqar import check_mqar
    from nestlearn.experiments.model_source import apply_preset
    from nestlearn.experiments.mqar import PRESETS, build_parser

    args = apply_preset(build_parser().parse_args(["--preset", "cpu"]), PRESETS)
    assert args.seeds == [0, 1, 2]
    assert args.models == ["hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer"]
    # Harder than tiny: more pairs, longer sequences.
    tiny = PRESETS["tiny"]
    assert max(args.pairs) > max(tiny["pairs"]) and max(args.seq_lens) > max(tiny["seq_lens"])
    for t in args.seq_lens:
        for p in args.pairs:
            if t >= 4 * p:
                check_mqar(t, p, args.vocab)
    explicit = apply_preset(build_parser().parse_args(["--preset", "cpu", "--seed", "5"]), PRESETS)
    assert explicit.seeds == [5]
