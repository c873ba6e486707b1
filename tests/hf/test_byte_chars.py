"""The byte -> character map of byte-level BPE, now derived from ``tokenizers``' alphabet."""

from __future__ import annotations

import pytest

from nestlearn.hf.convert import _byte_chars

pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")


def gpt2_bytes_to_unicode() -> list[str]:
    """GPT-2's ``bytes_to_unicode`` (openai/gpt-2 encoder.py), as a list indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def test_the_map_is_gpt2_bytes_to_unicode():
    chars = _byte_chars()
    assert chars == gpt2_bytes_to_unicode()
    assert len(set(chars)) == 256


def test_the_map_is_what_the_byte_level_pre_tokenizer_writes():
    # Every ASCII byte, and multi-byte UTF-8 (2, 3 and 4 bytes) for bytes 0x80..0xF4.
    text = "".join(chr(c) for c in range(128)) + "é€ ☃ 😀 ÿ Ā ߿ 𐀀 \U0010ffff"
    [(pieces, _)] = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    ).pre_tokenize_str(text)
    chars = _byte_chars()
    assert pieces == "".join(chars[b] for b in text.encode("utf-8"))
