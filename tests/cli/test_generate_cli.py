"""``nestlearn generate``: prompts that are not UTF-8, bad lengths and counts, a closed pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nestlearn.cli.generate import encode_prompt
from nestlearn.cli.main import main
from nestlearn.config import load_config
from nestlearn.convert.run_folder import write_run_folder
from nestlearn.data.corpus import Document
from nestlearn.data.tokenizer import BPETokenizer, ByteTokenizer
from nestlearn.models.registry import build_model
from tests.conftest import subprocess_env

INVALID = "abc\udcff"  # what Python puts in sys.argv for the shell's $'abc\xff'


def tiny_run(out: Path, tokenizer) -> Path:
    model = {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2}
    model.update(vocab_size=tokenizer.vocab_size, max_seq_len=16)
    cfg = load_config(None, {"model": model, "train": {"seq_len": 16}})
    torch.manual_seed(0)
    write_run_folder(build_model(cfg.model), out, tokenizer)
    return out


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("generate") / "byte", ByteTokenizer())


@pytest.fixture(scope="module")
def bpe_tokenizer() -> BPETokenizer:
    docs = [Document(f"d{i}", "def add(a, b):\n    return a + b\n" * 5) for i in range(4)]
    return BPETokenizer.train(docs, vocab_size=270, max_bytes=0, seed=0)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe_tokenizer) -> Path:
    return tiny_run(tmp_path_factory.mktemp("generate") / "bpe", bpe_tokenizer)


def test_a_byte_tokenizer_takes_the_prompts_original_bytes(byte_run, capsys):
    shown, ids = encode_prompt(ByteTokenizer(), INVALID)
    assert ids == [97, 98, 99, 0xFF] and shown == "abc\ufffd"
    argv = ["generate", str(byte_run), "--prompt", INVALID, "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("abc\ufffd")


def test_a_bpe_tokenizer_refuses_a_prompt_that_is_not_utf8(bpe_run, capsys):
    assert main(["generate", str(bpe_run), "--prompt", INVALID]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not valid UTF-8 (byte 0xff at offset 3)" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_utf8_prompts_encode_as_before(bpe_tokenizer):
    for tokenizer in (ByteTokenizer(), bpe_tokenizer):
        assert encode_prompt(tokenizer, "déf x") == ("déf x", tokenizer.encode("déf x"))
        assert encode_prompt(tokenizer, "") == ("", [tokenizer.eos_id])
    with pytest.raises(Exception, match="not text"):
        encode_prompt(ByteTokenizer(), "a\ud800")  # a surrogate no byte escapes to


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 0, got -5"),
        (["sample.max_new_tokens=-5"], "sample.max_new_tokens=-5 must be >= 0"),
        (["sample.top_k=-1"], "sample.top_k=-1 must be >= 0"),
    ],
)
def test_negative_counts_are_refused(byte_run, argv, fragment, capsys):
    try:
        status = main(["generate", str(byte_run), *argv])
    except SystemExit as exc:  # argparse's usage error
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    assert fragment in captured.err and captured.out == ""


def test_a_prompt_longer_than_the_context_is_refused_before_anything_is_printed(byte_run, capsys):
    assert main(["generate", str(byte_run), "--prompt", "x" * 17]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "the prompt is 17 tokens, more than the model's context of 16" in captured.err


def test_a_closed_pipe_ends_quietly(byte_run):
    argv = [sys.executable, "-m", "nestlearn", "generate", str(byte_run), "--prompt", "x"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()
    )
    proc.stdout.close()  # the reader is gone before the first write (`| head -c 0`)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
