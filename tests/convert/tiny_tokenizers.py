"""Tiny tokenizers shaped like the Llama family's, trained offline with `tokenizers`.

``sentencepiece_bpe``: Llama 2 / Mistral (``▁`` spaces, byte fallback ``<0xNN>``, ``<s>``/``</s>``);
``byte_level_bpe``: Llama 3 (regex split then byte level, BOS template) or, with ``nfc``, Qwen2
(NFC normalizer, ``<|endoftext|>``).
"""

from __future__ import annotations

import json

TEXT = (
    "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. "
    "Numbers 12345 and 67890; naïve café. "
) * 8
SPACE = "\u2581"


def sentencepiece_bpe(vocab: int = 60):
    """A Llama-2-style BPE: ``vocab`` trained entries then the 256 byte-fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    # Byte-fallback tokens live in the model's vocabulary (not as added tokens), as in Llama 2.
    spec = json.loads(tok.to_str())
    table = spec["model"]["vocab"]
    for byte in range(256):
        table[f"<0x{byte:02X}>"] = len(table)
    return Tokenizer.from_str(json.dumps(spec))


def byte_level_bpe(vocab: int = 300, nfc: bool = False):
    """A Llama-3-style byte-level BPE, or with ``nfc`` a Qwen2-style one."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = (
        ["<|endoftext|>", "<|im_start|>"] if nfc else ["<|begin_of_text|>", "<|end_of_text|>"]
    )
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(
        Regex(r"\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    if not nfc:
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok
