"""Pretrained models' own tokenizers (``tokenizer.json`` through `tokenizers`) as nestlearn ones.

Two families of BPE cover the Llama family and GPT-2:

    byte-level     GPT-2, Llama 3, Qwen2: a ``ByteLevel`` pre-tokenizer/decoder (possibly in a
                   ``Sequence`` after a regex ``Split``, possibly an NFC normalizer); every
                   token string has one character per byte it stands for
    sentencepiece  Llama 2, Mistral: ``▁`` for spaces (a ``Prepend``/``Replace`` normalizer or a
                   ``Metaspace`` pre-tokenizer) and byte fallback ``<0xNN>`` tokens for text the
                   vocabulary lacks; a token stands for the UTF-8 bytes of its text with ``▁``
                   read as a space, ``<0xNN>`` for one byte

Ids are the tokenizer's own ids without its template (no BOS; ``encode`` never emits special
ids, and text that contains a special token's string stays text). The end-of-text id is the
first special token of :data:`EOS_CANDIDATES` the vocabulary holds: the document separator of the
models' pretraining. Limits: an NFC normalizer (Qwen2) makes ``decode(encode(s))`` the NFC form
of ``s``; a SentencePiece tokenizer prepends one space to every text it encodes, which its
decoder strips again, so :meth:`token_byte_lengths` counts one byte more per text than it holds.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import numpy as np

from nestlearn.data.tokenizer import TokenizersBacked
from nestlearn.errors import DataError

# In order of preference: each family's end-of-document token (GPT-2/Qwen2, Llama 3, Llama 2 and
# Mistral), then chat models' end-of-turn tokens.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
SPACE = "\u2581"  # SentencePiece's ▁


def _types(node: Any) -> set[str]:
    """Every ``type`` in a `tokenizers` component spec, ``Sequence`` members included."""
    if not isinstance(node, dict):
        return set()
    found = {node["type"]} if "type" in node else set()
    for key in ("pretokenizers", "decoders", "normalizers"):
        for child in node.get(key) or ():
            found |= _types(child)
    return found


def tokenizer_family(spec: dict) -> str | None:
    """``byte-level`` or ``sentencepiece`` (see the module docstring) for a `tokenizers` JSON
    spec, or None for one nestlearn cannot use (not BPE, or no exact way back to bytes)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    decoder = _types(spec.get("decoder"))
    if "ByteLevel" in decoder and "ByteLevel" in _types(spec.get("pre_tokenizer")):
        return "byte-level"
    if model.get("byte_fallback") and "ByteFallback" in decoder:
        return "sentencepiece"
    return None


class PretrainedTokenizer(TokenizersBacked):
    """A pretrained model's `tokenizers.Tokenizer` (a family of :func:`tokenizer_family`).

    ``kind`` is ``bpe`` (what ``data.tokenizer`` records); the saved JSON is the `tokenizers`
    JSON itself, so a run folder's ``tokenizer.json`` loads in `tokenizers` and ``transformers``.
    """

    kind = "bpe"

    def __init__(self, tok) -> None:
        """Wrap a `tokenizers.Tokenizer`; DataError names what makes it unusable."""
        self._tok = tok
        self._json = tok.to_str()
        spec = json.loads(self._json)
        self.family = tokenizer_family(spec)
        if self.family is None:
            model = (spec.get("model") or {}).get("type")
            raise DataError(
                f"tokenizer ({model} model) is neither a byte-level BPE (GPT-2, Llama 3, Qwen2) "
                "nor a SentencePiece BPE with byte fallback (Llama 2, Mistral), so its tokens "
                "cannot be mapped back to bytes; pass --tokenizer byte or another tokenizer.json"
            )
        specials = {
            added.content for added in tok.get_added_tokens_decoder().values() if added.special
        }
        eos = next((name for name in EOS_CANDIDATES if name in specials), None)
        if eos is None:
            raise DataError(
                "tokenizer has no end-of-text special token (one of "
                f"{', '.join(EOS_CANDIDATES)}); nestlearn separates documents with it"
            )
        self.eos_token = eos
        self.eos_id = tok.token_to_id(eos)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Text that contains a special token's string stays text (not part of the saved JSON).
        tok.encode_special_tokens = True

    def _piece_bytes(self, token: str) -> int:
        """UTF-8 bytes of text a vocabulary entry stands for."""
        if self.family == "byte-level":
            return len(token)  # one character per byte
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return 1  # byte fallback
        return len(token.replace(SPACE, " ").encode("utf-8"))

    @cached_property
    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            lengths[i] = self._piece_bytes(token)
        # Added tokens match raw text (not byte characters); special ones stand for none.
        for i, added in self._tok.get_added_tokens_decoder().items():
            lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
        return lengths

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths.copy()

    def to_json(self) -> str:
        return self._json
