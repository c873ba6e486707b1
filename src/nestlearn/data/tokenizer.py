"""Tokenizers: raw bytes, or a byte-level BPE trained locally with the `tokenizers` library.

Both map any text to ids and back exactly (``decode(encode(s)) == s``) and know how many UTF-8
bytes of text each id stands for (:meth:`Tokenizer.token_byte_lengths`), so a loss in nats per
token converts exactly to bits per byte whichever tokenizer is used. Each has one end-of-text id,
``<|endoftext|>``, that the data pipeline puts after every document; text that happens to contain
the string ``<|endoftext|>`` is encoded as ordinary text, never as that id. Decoding the id gives
the string back, so samples show where a document ended.

A tokenizer is saved as one JSON file (for BPE the `tokenizers` format, loadable by that library)
and identified by the sha256 of that content, which keys the token cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nestlearn.config.schema import DataConfig
from nestlearn.data.corpus import cap_bytes
from nestlearn.data.document import Document
from nestlearn.errors import DataError
from nestlearn.utils.io import atomic_write_text

EOS = "<|endoftext|>"
BYTE_FORMAT = "nestlearn-byte-tokenizer"


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``kind``, ``vocab_size`` and ``eos_id``."""

    kind: str  # "byte" or "bpe"
    vocab_size: int  # ids are 0 .. vocab_size - 1, special tokens included
    eos_id: int  # <|endoftext|>, appended after every document

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never emits special ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (subclasses may run them in parallel)."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the eos id decodes to ``<|endoftext|>``."""

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """int64 ``[vocab_size]``: UTF-8 bytes of text each id stands for (0 for special ids)."""

    @abstractmethod
    def to_json(self) -> str:
        """The content :meth:`save` writes and :func:`load_tokenizer` reads."""

    def save(self, path: Path) -> None:
        """Write the tokenizer to ``path`` as JSON, atomically."""
        atomic_write_text(Path(path), self.to_json())

    def fingerprint(self) -> str:
        """Hex sha256 of the saved JSON: equal fingerprints encode identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is ``<|endoftext|>``."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Decode byte runs between eos ids separately so eos never glues two broken characters.
        runs: list[bytearray] = [bytearray()]
        for i in ids:
            if i == self.eos_id:
                runs.append(bytearray())
            else:
                runs[-1].append(i)
        return EOS.join(run.decode("utf-8", errors="replace") for run in runs)

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths

    def to_json(self) -> str:
        return json.dumps({"format": BYTE_FORMAT, "version": 1, "eos": EOS}, sort_keys=True)


class TokenizersBacked(Tokenizer):
    """Encoding and decoding through a ``tokenizers.Tokenizer`` held as ``self._tok``: special
    tokens are neither added nor skipped."""

    _tok: Any

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust side encodes the batch on all cores; "fast" skips the offsets we never use.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class BPETokenizer(TokenizersBacked):
    """A byte-level BPE (a `tokenizers.Tokenizer`) with ``<|endoftext|>`` as its special token.

    Byte-level means the pre-tokenizer maps each UTF-8 byte to one printable character before
    merging, so every token string has one character per byte it stands for and any text can be
    encoded without an unknown token.
    """

    kind = "bpe"

    def __init__(self, tok) -> None:
        """Wrap a `tokenizers.Tokenizer`; raises DataError if it is not a byte-level BPE."""
        self._tok = tok
        self._json = tok.to_str()
        spec = json.loads(self._json)
        if not _is_byte_level_bpe(spec):
            raise DataError(
                "tokenizer is not a byte-level BPE (model BPE, ByteLevel pre-tokenizer and "
                "decoder, no normalizer): train one with data.tokenizer=bpe"
            )
        eos_id = tok.token_to_id(EOS)
        if eos_id is None:
            raise DataError(f"tokenizer has no {EOS} token: train one with data.tokenizer=bpe")
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Text that contains "<|endoftext|>" must stay text; only the pipeline inserts eos ids.
        # This switch is not part of the saved JSON, so it is set on every wrap.
        tok.encode_special_tokens = True

    @classmethod
    def train(
        cls,
        docs: Sequence[Document],
        vocab_size: int,
        max_bytes: int,
        seed: int,
        progress: bool = False,
    ):
        """Train on ``docs``, fed up to ``max_bytes`` bytes in a fixed hashed order.

        ``progress`` shows the `tokenizers` library's own progress bars on stderr when it is a
        terminal (they would only fill a log file with control codes otherwise).
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise DataError(
                f"data.vocab_size={vocab_size} is too small for a byte-level BPE: use at least "
                "257 (256 byte symbols + <|endoftext|>)"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress and sys.stderr.isatty(),
        )
        texts = [d.text for d in cap_bytes(docs, max_bytes, seed)]
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    @cached_property
    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            lengths[i] = len(token)
        for i, added in self._tok.get_added_tokens_decoder().items():
            if added.special:
                lengths[i] = 0
        return lengths

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths.copy()

    def to_json(self) -> str:
        return self._json


def build_tokenizer(
    cfg: DataConfig, train_docs: Sequence[Document], progress: bool = False
) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names: bytes, or a BPE trained on ``train_docs``."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(
            train_docs, cfg.vocab_size, cfg.bpe_train_bytes, cfg.split_seed, progress=progress
        )
    raise DataError(f"unknown data.tokenizer '{cfg.tokenizer}': use 'bpe' or 'byte'")


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer saved by :meth:`Tokenizer.save`; DataError names a missing/bad file."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    fix = "re-save it with nestlearn, or delete it so it is rebuilt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"tokenizer file {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"tokenizer file {path} cannot be read ({exc}): {fix}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer file {path} is corrupt (not JSON: {exc}): {fix}") from None
    if isinstance(spec, dict) and spec.get("format") == BYTE_FORMAT:
        return ByteTokenizer()
    if not isinstance(spec, dict) or "model" not in spec:
        raise DataError(f"tokenizer file {path} is not a nestlearn tokenizer: {fix}")
    try:
        tok = HFTokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        raise DataError(f"tokenizer file {path} is corrupt ({exc}): {fix}") from None
    try:
        if _is_byte_level_bpe(spec) and tok.token_to_id(EOS) is not None:
            return BPETokenizer(tok)
        # A pretrained model's own tokenizer (Llama, Mistral, Qwen2, ...), kept by conversion.
        from nestlearn.convert.tokenizer import PretrainedTokenizer

        return PretrainedTokenizer(tok)
    except DataError as exc:
        raise DataError(f"tokenizer file {path}: {exc}") from None


def _is_byte_level_bpe(spec: dict) -> bool:
    """Whether token strings have one character per byte, which token_byte_lengths relies on."""
    pre = spec.get("pre_tokenizer") or {}
    dec = spec.get("decoder") or {}
    return (
        spec.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and dec.get("type") == "ByteLevel"
        and spec.get("normalizer") is None
    )
