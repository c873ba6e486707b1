"""The command line, end to end on the debug config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestlearn.cli.main import main
from nestlearn.train.checkpoint import MODEL_FILE, resolve_checkpoint
from nestlearn.train.metrics import read_metrics
from tests.conftest import subprocess_env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "debug", f"train.out_dir={out}", "train.steps=10"]) == 0
    return out


def test_train_writes_the_run_folder(run_dir):
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.md"):
        assert (run_dir / name).is_file(), name
    kinds = {r["kind"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert kinds == {"train", "eval"}
    summary = (run_dir / "summary.md").read_text()
    assert "unigram" in summary and "val ppl" in summary


def test_eval_on_validation_and_on_a_file(run_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["step"] == 10 and result["ppl"] > 1 and result["bpb"] > 0
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    assert main(["eval", str(run_dir), "--source", str(text), "eval.max_tokens=0"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_generate_streams_text_reproducibly(run_dir, capsys):
    argv = ["generate", str(run_dir), "--prompt", "import ", "--max-new-tokens", "12"]
    assert main([*argv, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ")
    assert main([*argv, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_info_prints_components_and_config(capsys):
    assert main(["info", "debug", "model.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "blocks.*.attn" in out and "total" in out and "n_layers: 3" in out
    assert main(["info", "--list"]) == 0
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "debug", "train.stepz=1"], "did you mean 'steps'"),
        (["train", "no-such-config"], "no config named"),
        (["eval", "/no/such/run"], "does not exist"),
        (["train", "debug", "data.source=/no/such/corpus"], "/no/such/corpus"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, fragment, capsys, tmp_path):
    argv = [*argv, f"train.out_dir={tmp_path / 'x'}"] if argv[0] == "train" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_is_named(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    step = resolve_checkpoint(copy)
    (step / MODEL_FILE).write_bytes(b"garbage")
    assert main(["eval", str(step)]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_0(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nestlearn",
        "train",
        "debug",
        f"train.out_dir={run}",
        "train.steps=100000",
        "train.eval_every=0",
        "train.ckpt_every=0",
    ]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted; checkpoint saved" in out
    step = resolve_checkpoint(run)
    assert int(step.name.split("_")[1]) >= 3


def test_demo_trains_every_listed_run(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"out_dir: {tmp_path / 'demo'}\n"
        "runs:\n"
        "  - {name: a, config: debug}\n"
        "  - {name: b, config: debug, overrides: {model.n_layers: 1}}\n"
    )
    assert main(["demo", "--spec", str(spec), "train.steps=6"]) == 0
    out = tmp_path / "demo"
    for name in (
        "summary.md",
        "loss.png",
        "metrics.jsonl",
        "results.json",
        "a/sample.txt",
        "b/sample.txt",
        "a/checkpoints/latest",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["a", "b"]
    assert results["runs"][1]["params"] < results["runs"][0]["params"]
    assert "| a |" in (out / "summary.md").read_text()


def test_bench_runs_a_benchmark_and_names_the_available_ones(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "train", "debug", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "available: " in err and "memory" in err and "train_throughput" in err
