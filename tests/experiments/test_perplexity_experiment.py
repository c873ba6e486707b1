"""``nestlearn experiment perplexity``: train, score in every protocol, say what did not run."""

from __future__ import annotations

import json
import shutil

import pytest

from nestlearn.cli.main import main

TINY = ["--steps", "2", "--max-tokens", "100", "--no-progress", "--set", "train.eval_every=0"]


def test_trains_then_scores_each_model_in_each_mode(tmp_path, capsys):
    out = tmp_path / "ppl"
    argv = ["experiment", "perplexity", *TINY, "--models", "transformer", "gated_deltanet"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "transformer streaming: not run" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    runs = {r["model"]: r for r in result["results"]}
    assert set(runs) == {"transformer", "gated_deltanet"}
    rows = {(m, mode): runs[m]["modes"][mode] for m in runs for mode in runs[m]["modes"]}
    assert set(rows) == {
        (m, mode) for m in ("transformer", "gated_deltanet")
        for mode in ("chunks", "sliding", "streaming")
    }  # fmt: skip
    # The debug Transformer reads 64 tokens: it cannot stream 100; the recurrent model can.
    assert rows["transformer", "streaming"]["ppl"] is None
    assert "max_seq_len=64" in rows["transformer", "streaming"]["skipped"]
    for key, row in rows.items():
        if key != ("transformer", "streaming"):
            assert row["tokens"] == 100 and row["ppl"] > 1 and row["bpb"] > 0, key
    assert rows["gated_deltanet", "sliding"]["stride"] == 16  # half the 32-token window
    for m, run in runs.items():  # the headline numbers: chunks of the held-out text, OOD prose
        assert run["val_ppl"] == pytest.approx(rows[m, "chunks"]["ppl"], rel=1e-12)
        assert run["ood_bpb"] > 0 and run["ood_tokens"] == 100
        assert run["ood_source"].startswith("pydoc_data.topics")
    assert (out / "runs" / "gated_deltanet" / "seed0" / "checkpoints").is_dir()
    assert (out / "perplexity.png").stat().st_size > 0
    # A trained run is scored again as a checkpoint, on another text, in one mode.
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 10)
    run_dir = out / "runs" / "gated_deltanet" / "seed0"
    argv = ["experiment", "perplexity", "--checkpoints", str(run_dir)]
    argv += ["--source", str(text), "--modes", "streaming", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())["results"]
    assert [(r["model"], list(r["modes"]), r["modes"]["streaming"]["tokens"]) for r in again] == [
        ("seed0", ["streaming"], len(text.read_bytes()))  # bytes + eos - 1 target
    ]


@pytest.mark.slow
def test_seeds_units_equal_params_and_resume(tmp_path, capsys):
    out = tmp_path / "ppl"
    argv = ["experiment", "perplexity", "--steps", "4", "--eval-points", "2", "--seeds", "2",
            "--max-tokens", "100", "--no-progress", "--set", "eval.max_tokens=64",
            "--models", "transformer", "gated_deltanet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "equal parameters (target" in printed
    result = json.loads((out / "result.json").read_text())
    records = {(r["model"], r["seed"]): r for r in result["results"]}
    assert set(records) == {(m, s) for m in ("transformer", "gated_deltanet") for s in (0, 1)}
    params = {m: records[m, 0]["params"] for m in ("transformer", "gated_deltanet")}
    assert abs(params["transformer"] / params["gated_deltanet"] - 1) < 0.1
    # Both match HOPE's count (--params-like hope), whichever models this process runs.
    assert set(records["transformer", 0]["width"]) == {"mlp_hidden"}
    assert set(records["gated_deltanet", 0]["width"]) == {"mlp_hidden"}
    # The curve: a validation point every 2 steps, loss against tokens seen.
    curve = records["gated_deltanet", 1]["curve"]
    assert [p["step"] for p in curve] == [2, 4]
    assert curve[1]["tokens"] == 2 * curve[0]["tokens"] > 0
    summary = result["summary"]["transformer"]
    assert summary["val_ppl"]["n"] == 2 and summary["ood_bpb"]["std"] is not None
    assert summary["val_ppl"]["values"] == [records["transformer", s]["val_ppl"] for s in (0, 1)]
    # A rerun reuses every unit; --models one model reuses its units too.
    assert main(argv) == 0
    again = json.loads((out / "result.json").read_text())["results"]
    assert all(r["reused"] for r in again)
    # A run killed after its step-2 checkpoint (unit not stored) is resumed, not retrained.
    run = out / "runs" / "gated_deltanet" / "seed1"
    (out / "units" / "gated_deltanet-seed1.json").unlink()
    steps = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000002", "step_00000004"]
    shutil.rmtree(steps[-1])
    assert main([*argv[:-3], "gated_deltanet", "--out", str(out)]) == 0  # this model alone
    record = json.loads((out / "units" / "gated_deltanet-seed1.json").read_text())["record"]
    assert record["width"] == records["gated_deltanet", 1]["width"]
    assert record["trained"]["resumed"] and record["trained"]["step"] == 4
    assert record["val_ppl"] == pytest.approx(records["gated_deltanet", 1]["val_ppl"], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--models", "nope"], "--models nope: neither a named config nor an architecture"),
        (["--models", "transformer", "--set", "train.stepz=3"], "did you mean 'steps'"),
        (["--checkpoints", "/no/such/run"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, extra, fragment):
    argv = ["experiment", "perplexity", *TINY, *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
