"""``nestlearn experiment perplexity``: train, score in every protocol, say what did not run."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli.main import main

TINY = ["--steps", "2", "--max-tokens", "100", "--no-progress", "--set", "train.eval_every=0"]


def test_trains_then_scores_each_model_in_each_mode(tmp_path, capsys):
    out = tmp_path / "ppl"
    argv = ["experiment", "perplexity", *TINY, "--models", "transformer", "gated_deltanet"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "transformer streaming: not run" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    rows = {(r["model"], r["mode"]): r for r in result["results"]}
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
    assert (out / "runs" / "gated_deltanet" / "checkpoints").is_dir()
    assert (out / "perplexity.png").stat().st_size > 0
    # A trained run is scored again as a checkpoint, on another text, in one mode.
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 10)
    argv = ["experiment", "perplexity", "--checkpoints", str(out / "runs" / "gated_deltanet")]
    argv += ["--source", str(text), "--modes", "streaming", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())["results"]
    assert [(r["model"], r["mode"], r["tokens"]) for r in again] == [
        ("gated_deltanet", "streaming", len(text.read_bytes()))  # bytes + eos - 1 target
    ]


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
