"""``nestlearn bench decode``: rows, cells, ratios, the reference check, JSON and markdown."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from nestlearn.cli.bench import available
from nestlearn.cli.main import main
from nestlearn.errors import ConfigError

BENCH = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "decode.py"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A debug-sized Transformer++ (max_seq_len 64, shorter than the longest prompt + tokens)
    and Gated DeltaNet, at two batch sizes and two prompt lengths."""
    tmp = tmp_path_factory.mktemp("decode")
    gdn = tmp / "gdn.yaml"
    gdn.write_text("base: debug\nmodel: {name: gated_deltanet, n_heads: 2, chunk_size: 16}\n")
    argv = ["bench", "decode", "debug", str(gdn), "--batch-sizes", "1,2", "--prompts", "8,70"]
    argv += ["--new-tokens", "3", "--repeats", "1", "--threads", "1", "--out", str(tmp)]
    assert main(argv) == 0
    return json.loads((tmp / "decode.json").read_text()), (tmp / "decode.md").read_text()


def test_bench_is_discovered():
    assert "decode" in available()


def test_every_cell_is_measured_and_the_transformer_gets_a_longer_context(report):
    data, markdown = report
    assert [r["label"] for r in data["rows"]] == ["transformer", "gated_deltanet"]
    transformer, gdn = data["rows"]
    # 70 + 3 tokens exceed max_seq_len 64: rebuilt with room for the longest prompt + tokens
    assert "model.max_seq_len=73" in transformer["overrides"]
    assert gdn["model"] == "gated_deltanet" and gdn["overrides"] == []
    for row in data["rows"]:
        assert [(c["batch_size"], c["prompt"]) for c in row["cells"]] == [
            (1, 8), (1, 70), (2, 8), (2, 70)
        ]  # fmt: skip
        for cell in row["cells"]:
            assert cell["prefill_s"] > 0 and cell["decode_tokens_per_s"] > 0
        assert set(row["flat"]) == {"1", "2"}
        assert row["max_abs_diff"] < 1e-4  # the stateful steps agree with a plain forward
    assert all(c["ratio"] == 1.0 for c in transformer["cells"])
    assert data["threads"] == 1 and data["new_tokens"] == 3
    assert "decode tok/s" in markdown and "max |diff|" in markdown
    assert markdown.count("\n| gated_deltanet |") == 1 + 4  # the summary row, then a row per cell


def test_the_reference_check_sees_a_wrong_step():
    """``reference_diff`` compares the stateful steps with one stateless forward: a model whose
    step drifts shows a large difference."""
    import torch

    from nestlearn.config import load_config
    from nestlearn.models.registry import build_model

    cfg = load_config("debug", ["model.name=gated_deltanet", "model.n_heads=2"])
    cfg.model.vocab_size = 257
    model = build_model(cfg.model).eval()
    prompt = torch.randint(0, 257, (1, 8))
    tokens = torch.randint(0, 257, (1, 4))
    assert BENCH["reference_diff"](model, prompt, tokens) < 1e-4
    step = model.blocks[0].mixer.step
    model.blocks[0].mixer.step = lambda x, s: (lambda y, n: (y * 1.5, n))(*step(x, s))
    assert BENCH["reference_diff"](model, prompt, tokens) > 1e-3


def test_models_and_configs_are_exclusive_and_unknown_models_named():
    with pytest.raises(ConfigError, match="not both"):
        BENCH["select_rows"](BENCH["parse_args"](["debug", "--models", "all"]))
    with pytest.raises(ConfigError, match="unknown"):
        BENCH["select_rows"](BENCH["parse_args"](["--models", "transformer,nope"]))


def test_demo_size_narrows_the_tiny_configs():
    rows = BENCH["select_rows"](BENCH["parse_args"](["--size", "demo"]))
    by_label = {r.label: r for r in rows}
    assert rows[0].label == "transformer" and by_label["transformer"].config == "demo-transformer"
    assert by_label["hope"].config == "demo-hope"
    assert by_label["gla"].config == "gla-tiny" and "model.d_model=128" in by_label["gla"].overrides
