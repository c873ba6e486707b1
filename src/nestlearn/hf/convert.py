"""Between nestlearn and ``transformers``: models, tokenizers and training checkpoints."""

from __future__ import annotations

from pathlib import Path

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

    BPE: the same `tokenizers` JSON. Bytes: an equivalent byte-level BPE without merges, whose
    vocabulary maps the character GPT-2's byte-level pre-tokenizer uses for byte ``b`` to id
    ``b``, plus ``<|endoftext|>`` = 256. One difference: the ``transformers`` tokenizer turns
    the literal text ``<|endoftext|>`` into the eos id, where nestlearn encodes it as text.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, BPETokenizer):
        rust = RustTokenizer.from_str(tokenizer.to_json())
    elif isinstance(tokenizer, ByteTokenizer):
        rust = _byte_level_tokenizer()
    else:
        raise ValueError(f"no transformers equivalent for a {type(tokenizer).__name__}")
    return PreTrainedTokenizerFast(tokenizer_object=rust, eos_token=EOS, pad_token=EOS)


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


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Save a training checkpoint (a run folder or ``checkpoints/step_*``) as a Hugging Face
    folder: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
    tokenizer files. Returns ``out_dir``."""
    from nestlearn.train.checkpoint import load_model

    model, loaded = load_model(Path(checkpoint))
    out = Path(out_dir)
    to_hf(model, eos_id=loaded.tokenizer.eos_id).save_pretrained(out)
    hf_tokenizer(loaded.tokenizer).save_pretrained(out)
    return out
