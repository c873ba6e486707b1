"""Tokenizers and training checkpoints exported to the Hugging Face format."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer

from nestlearn.config import load_config
from nestlearn.data.document import Document
from nestlearn.data.tokenizer import EOS, BPETokenizer, ByteTokenizer
from nestlearn.hf import export_checkpoint, from_hf, hf_tokenizer
from nestlearn.models.registry import build_model
from nestlearn.train.checkpoint import load_model, save_checkpoint

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Größe, naïve café — 日本語のテキスト 🎉\n",
    "\x00\x01 control bytes\tand tabs\r\n",
    "  leading spaces, trailing spaces   ",
]


def bpe() -> BPETokenizer:
    docs = [Document(f"d{i}", text * 20) for i, text in enumerate(TEXTS)]
    return BPETokenizer.train(docs, vocab_size=300, max_bytes=0, seed=0)


@pytest.mark.parametrize("make", [ByteTokenizer, bpe], ids=["byte", "bpe"])
def test_hf_tokenizer_gives_the_same_ids_and_text(make, tmp_path):
    ours = make()
    theirs = hf_tokenizer(ours)
    assert theirs.eos_token == EOS and theirs.eos_token_id == ours.eos_id
    theirs.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "unseen words: xylophone ẞ"]:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids) == text
    assert reloaded.decode([ours.eos_id]) == EOS


def test_hf_tokenizer_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="no transformers equivalent"):
        hf_tokenizer(object())


def test_export_checkpoint_loads_with_auto_classes(tmp_path):
    tokenizer = bpe()
    cfg = load_config(
        None,
        {
            "model": {
                "name": "gated_deltanet",
                "vocab_size": tokenizer.vocab_size,
                "d_model": 16,
                "n_layers": 2,
                "n_heads": 2,
                "chunk_size": 4,
            },
            "train": {"seq_len": 32},
        },
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(run, 7, model=model, trainer_state={}, cfg=cfg, tokenizer=tokenizer)

    out = export_checkpoint(run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.eos_token_id == tokenizer.eos_id
    assert hf.generation_config.eos_token_id == tokenizer.eos_id

    reference, _ = load_model(run)
    ids = hf_tok(TEXTS[0], return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer.encode(TEXTS[0])
    assert torch.equal(hf(ids).logits, reference(ids)[0])
    assert from_hf(hf).config == reference.config
