"""``nestlearn demo``: the shipped spec (three architectures, one token stream) and a short run."""

from __future__ import annotations

import json
import re

import pytest

from nestlearn.cli.demo import demo_configs, load_demo_spec, token_stream
from nestlearn.cli.main import main
from nestlearn.errors import ConfigError

# Seconds-long versions of the demo's models: the debug config's byte-level data and loop.
FAST = [
    "data.tokenizer=byte",
    "data.max_bytes=300000",
    "model.d_model=32",
    "model.n_heads=2",
    "train.steps=2",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.eval_every=0",
    "train.log_every=1",
    "train.progress=false",
    "eval.max_tokens=512",
    "sample.max_new_tokens=8",
]


def test_shipped_demo_trains_transformer_recurrent_and_hope_on_equal_tokens(tmp_path):
    configs = demo_configs(load_demo_spec("demo"), tmp_path, [])
    models = [c.model.name for c in configs]
    assert len(set(models)) >= 3 and {"transformer", "hope", "gated_deltanet"} <= set(models)
    assert len({token_stream(c) for c in configs}) == 1
    assert len({str(c.data) for c in configs}) == 1
    for c in configs:  # a time budget guards each run
        assert 0 < c.train.max_minutes <= 5


def test_runs_with_different_token_budgets_are_refused(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "runs:\n  - {name: a, config: debug}\n"
        "  - {name: b, config: debug, overrides: {train.batch_size: 2}}\n"
    )
    with pytest.raises(ConfigError, match="same tokens"):
        demo_configs(load_demo_spec(str(spec)), tmp_path, [])
    # An override on the command line applies to every run, so the budgets stay equal.
    assert len(demo_configs(load_demo_spec("demo"), tmp_path, ["train.steps=7"])) == 3


def test_short_demo_reports_every_architecture_in_one_table(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["model"] for r in runs] == ["transformer", "gated_deltanet", "hope"]
    assert {r["tokens"] for r in runs} == {results["budget_tokens"]} == {2 * 2 * 32}
    assert all(r["complete"] and r["val"]["ppl"] > 1 and r["tokens_per_s"] > 0 for r in runs)
    assert runs[0]["time_per_token_ratio"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "time/token vs transformer" in summary and "unigram" in summary
    for name in ("transformer", "gated_deltanet", "hope"):
        assert f"| {name} | {name} |" in summary
        assert (out / name / "sample.txt").is_file()


def test_a_failed_run_is_marked_failed_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """A non-finite loss in one run, a setting the data refuses in another: the third trains, the
    report lists all three, and the exit status says that something failed."""
    from nestlearn.train import Trainer

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "runs:\n  - {name: a, config: debug}\n"
        "  - {name: b, config: debug, overrides: {model.vocab_size: 100}}\n"
        "  - {name: c, config: debug}\n"
    )
    original = Trainer.train_step

    def diverges(self):
        if self.cfg.name == "a" and self.step == 1:
            raise self._non_finite("the training loss", float("nan"))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", diverges)
    out = tmp_path / "demo"
    assert main(["demo", "--spec", str(spec), "--out", str(out), *FAST]) == 1
    assert "2 of 3 runs failed (a, b)" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert [r["status"] for r in results["runs"]] == ["failed", "failed", "finished"]
    assert results["failed"] == ["a", "b"]
    assert runs["a"]["error"].startswith("NonFiniteLossError: the training loss became nan")
    assert runs["a"]["steps"] == 1 and runs["b"]["error"].startswith(
        "ConfigError: model.vocab_size"
    )
    assert runs["c"]["complete"] and runs["c"]["val"]["ppl"] > 1
    assert runs["c"]["time_per_token_ratio"] == 1.0  # the first run that finished is the reference
    summary = (out / "summary.md").read_text()
    assert re.search(r"\| a \| transformer \| [\d,]+ \| failed after 1 step \(NonFinite", summary)
    assert "failed after 0 steps (ConfigError)" in summary and "unigram" in summary
    assert "## Failed runs" in summary and "time/token vs c" in summary
    assert (out / "c" / "sample.txt").is_file() and not (out / "a" / "sample.txt").exists()
