"""``nestlearn eval [TASK]``: perplexity modes on a checkpoint, and the mqar/niah hand-off."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

from nestlearn.cli.main import main
from nestlearn.experiments import EXPERIMENTS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalcli") / "run"
    assert main(["train", "debug", f"train.out_dir={out}", "train.steps=2"]) == 0
    return out


@pytest.mark.parametrize(
    ("mode", "tokens", "extra"),
    [("sliding", 200, {"stride": 8, "seq_len": 16}), ("streaming", 50, {"seq_len": 16})],
)
def test_perplexity_modes_score_the_first_tokens(run_dir, tmp_path, mode, tokens, extra):
    out = tmp_path / "r.json"
    argv = ["eval", "perplexity", str(run_dir), "--mode", mode, "--window", "16"]
    assert main([*argv, "--json", str(out), f"eval.max_tokens={tokens}"]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == mode and record["tokens"] == tokens and record["ppl"] > 1
    assert {k: record[k] for k in extra} == extra


def test_the_default_mode_is_the_trainers_validation(run_dir, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(run_dir), "--json", str(a)]) == 0
    assert main(["eval", "perplexity", str(run_dir), "--mode", "chunks", "--json", str(b)]) == 0
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    assert first["mode"] == "chunks" and first["loss"] == second["loss"]


def test_streaming_past_a_transformers_context_says_so(run_dir, capsys):
    argv = ["eval", "perplexity", str(run_dir), "--mode", "streaming", "eval.max_tokens=100"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.max_seq_len=64" in err and "use mode 'sliding'" in err


@pytest.mark.parametrize("command", [["eval"], ["experiment", "perplexity", "--checkpoints"]])
def test_a_checkpoint_without_its_tokenizer_is_named(run_dir, tmp_path, capsys, command):
    from nestlearn.train.checkpoint import resolve_checkpoint

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (resolve_checkpoint(copy) / "tokenizer.json").unlink()
    assert main([*command, str(copy), "--out" if "experiment" in command else "--json",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "tokenizer.json is missing" in capsys.readouterr().err


@pytest.fixture
def fake_tasks(monkeypatch):
    seen = []
    module = types.ModuleType("fake_nestlearn_task")
    module.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in ("mqar", "niah"):
        monkeypatch.setitem(EXPERIMENTS, name, (module.__name__, "a test double"))
    return seen


def test_mqar_and_niah_are_handed_to_their_experiments(fake_tasks, capsys):
    assert main(["eval", "mqar", "--steps", "3"]) == 0
    assert main(["eval", "niah", "runs/x", "--lengths", "256"]) == 0
    assert fake_tasks == [["--steps", "3"], ["--checkpoints", "runs/x", "--lengths", "256"]]
    assert main(["eval", "niah", "--lengths", "256"]) == 2
    assert "eval niah needs a checkpoint" in capsys.readouterr().err
