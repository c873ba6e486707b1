"""Between nestlearn and ``transformers``: models, tokenizers and training checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from nestlearn.data.tokenizer import EOS, BPETokenizer, ByteTokenizer, Tokenizer
from nestlearn.hf.configuration import NestlearnConfig
from nestlearn.hf.modeling import NestlearnForCausalLM
from nestlearn.models.base import LanguageModel


def to_hf(model: LanguageModel, eos_id: int | None = None) -> NestlearnForCausalLM:
    """Wrap ``model`` (weights shared, not copied); ``eos_id`` stops ``generate()``.

    ``eos_id`` also becomes the pad id, which ``generate()`` writes after a row has finished.
    """
    config = NestlearnConfig.from_model_config(
        model.config, eos_token_id=eos_id, pad_token_id=eos_id
    )
    return NestlearnForCausalLM(config, model=model).train(model.training)


def from_hf(hf_model: NestlearnForCausalLM) -> LanguageModel:
    """The nestlearn model inside the wrapper (weights shared); its config is ``.config``."""
    if not isinstance(hf_model, NestlearnForCausalLM):
        raise ValueError(
            f"expected a NestlearnForCausalLM, got {type(hf_model).__name__}; load it with "
            "AutoModelForCausalLM.from_pretrained after importing nestlearn.hf"
        )
    return hf_model.model


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``transformers`` fast tokenizer giving the same ids as ``tokenizer``.

    BPE (trained by nestlearn, or a pretrained model's own kept by ``nestlearn convert``): the
    same `tokenizers` JSON, eos its end-of-text token. Bytes: an equivalent byte-level BPE
    without merges, whose vocabulary maps the character GPT-2's byte-level pre-tokenizer uses
    for byte ``b`` to id ``b``, plus ``<|endoftext|>`` = 256. One difference: the
    ``transformers`` tokenizer turns the literal text of a special token (``<|endoftext|>``)
    into its id, where nestlearn encodes it as text; and it applies the JSON's template (a
    pretrained tokenizer's BOS) unless called with ``add_special_tokens=False``."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        rust = _byte_level_tokenizer()
    elif isinstance(tokenizer, BPETokenizer) or kind_of(tokenizer) == "bpe":
        rust = RustTokenizer.from_str(tokenizer.to_json())
    else:
        raise ValueError(f"no transformers equivalent for a {type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token", EOS)
    return PreTrainedTokenizerFast(tokenizer_object=rust, eos_token=eos, pad_token=eos)


def kind_of(tokenizer: object) -> str | None:
    """``data.tokenizer`` kind of a nestlearn tokenizer (``bpe``: a `tokenizers` JSON)."""
    return getattr(tokenizer, "kind", None) if isinstance(tokenizer, Tokenizer) else None


def _byte_level_tokenizer():
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([AddedToken(EOS, special=True)])
    return rust


def _byte_chars() -> list[str]:
    """GPT-2's ``bytes_to_unicode`` map, byte -> character, from the byte-level pre-tokenizer's
    own alphabet (``tokenizers``' ``ByteLevel.alphabet()``, the 256 characters as a set): a byte
    whose character is in the alphabet stands for itself (the printable ones), the others take
    the remaining characters (``chr(256 + k)``) in byte order."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    shifted = iter(sorted(c for c in alphabet if ord(c) >= 256))
    return [chr(byte) if chr(byte) in alphabet else next(shifted) for byte in range(256)]


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Save a training checkpoint (a run folder or ``checkpoints/step_*``) as a Hugging Face
    folder that loads in any process with nestlearn installed (``trust_remote_code=True``):
    ``config.json`` (with ``auto_map``), ``generation_config.json``, ``model.safetensors``
    (in ``dtype``, default as trained), ``modeling_nestlearn.py`` and the tokenizer files.
    Returns ``out_dir``."""
    from nestlearn.train.checkpoint import load_model

    model, loaded = load_model(Path(checkpoint))
    if dtype is not None:
        model = model.to(dtype)
    out = Path(out_dir)
    to_hf(model, eos_id=loaded.tokenizer.eos_id).save_pretrained(out)
    hf_tokenizer(loaded.tokenizer).save_pretrained(out)
    return out
