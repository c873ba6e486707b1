"""Level stacking of the Llama family's variants (SPEC §4): tiny random HF Qwen2 / Mistral models
-> hope_attention, logits equal; their tokenizers come along through ``tokenizer.json``.

The HF models are built offline with ``transformers`` (the conversion itself does not use it),
every parameter randomized (Qwen2's q/k/v biases included, so a dropped bias shows).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="building reference HF models needs transformers")

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nestlearn.cli.main import main
from nestlearn.convert import PretrainedTokenizer, level_stack
from nestlearn.errors import ConfigError
from nestlearn.train.checkpoint import load_model
from tests.convert.tiny_tokenizers import TEXT, byte_level_bpe, sentencepiece_bpe

VOCAB = 320  # holds the tiny tokenizers' ids (at most 316)
T = 40
# transformers computes RMSNorm and the RoPE angles in float32 whatever the model dtype
# (tests/hf/test_level_stacking.py): ~1e-6 on float64 logits.
TOL64 = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
}
CLASSES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def build(tmp_path, arch: str, dtype=torch.float64, **fields):
    """A randomized tiny ``arch`` model saved to ``tmp_path/arch``; (model, folder)."""
    config_cls, model_cls = CLASSES[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **fields})).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.15 * noise)
    model.to(dtype).save_pretrained(tmp_path / arch)
    return model.to(dtype), tmp_path / arch


def tokens(seed: int = 0, length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
@pytest.mark.parametrize("levels", [1, 3])
def test_zero_lr_logits_equal_the_original_float64(tmp_path, arch, levels):
    # Mistral without a window here (sliding_window=None); the window has its own test.
    hf, folder = build(tmp_path, arch, sliding_window=None)
    ours = level_stack(
        folder, levels=levels, lrs=[0.0] * levels, chunk_sizes=[8, 4, 2][:levels],
        dtype=torch.float64,
    )  # fmt: skip
    ids = tokens()
    expected = hf_logits(hf, ids)
    assert expected.abs().max() > 1.0  # large enough for a wrong tensor to show
    torch.testing.assert_close(our_logits(ours, ids), expected, rtol=TOL64, atol=TOL64)
    # The decoding path (KV cache, CMS state) gives the same numbers token by token.
    state = ours.init_state(2)
    steps = []
    with torch.no_grad():
        for t in range(6):
            logits, state = ours(ids[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, :6], rtol=TOL64, atol=TOL64)


def test_qwen2_qkv_biases_are_carried_and_its_output_has_none(tmp_path):
    hf, folder = build(tmp_path, "qwen2", tie_word_embeddings=True)
    ours = level_stack(folder, lrs=[0.0], dtype=torch.float64)
    attn = ours.blocks[0].mixer.attn
    assert ours.config.attn_bias and ours.config.tie_embeddings
    q_bias = hf.model.layers[0].self_attn.q_proj.bias
    torch.testing.assert_close(attn.qkv.bias[: q_bias.numel()], q_bias, rtol=0, atol=0)
    assert attn.out.bias.abs().max() == 0
    # Without its biases the same model's logits move: the test above would see a dropped bias.
    with torch.no_grad():
        attn.qkv.bias.zero_()
    ids = tokens(1)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max() > 1e-3


def test_float32_mistral_and_qwen2_equal(tmp_path):
    for arch in ("qwen2", "mistral"):
        hf, folder = build(tmp_path, arch, dtype=torch.float32, sliding_window=None)
        ours = level_stack(folder, levels=2, lrs=[0.0, 0.0])
        ids = tokens(2)
        torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_mistral_sliding_window_caps_the_context_exactly(tmp_path):
    window = 16
    hf, folder = build(tmp_path, "mistral", sliding_window=window)
    ours = level_stack(folder, lrs=[0.0], dtype=torch.float64)
    # No sliding window in hope_attention: exact on at most `window` tokens, so that is the context.
    assert ours.config.max_seq_len == window
    ids = tokens(3, length=window)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=TOL64, atol=TOL64)
    # Longer, the window changes the original's outputs: a longer context is refused...
    with pytest.raises(ConfigError, match=r"sliding window of 16 tokens.*--allow-inexact"):
        level_stack(folder, lrs=[0.0], overrides={"max_seq_len": 64})
    # ...unless allowed; then the positions past the window differ, as the error said.
    longer = level_stack(
        folder, lrs=[0.0], overrides={"max_seq_len": 64}, exact=False, dtype=torch.float64
    )
    ids = tokens(3, length=T)
    got, expected = our_logits(longer, ids), hf_logits(hf, ids)
    torch.testing.assert_close(got[:, :window], expected[:, :window], rtol=TOL64, atol=TOL64)
    assert (got[:, window:] - expected[:, window:]).abs().max() > 1e-3


def test_qwen2_window_applies_only_when_used(tmp_path):
    _, folder = build(tmp_path, "qwen2", sliding_window=16, use_sliding_window=False)
    assert level_stack(folder, lrs=[0.0]).config.max_seq_len == 64


def _same_ids_as_transformers(tokenizer, folder) -> None:
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    text = TEXT[:120] + " unseen: 🙂 Ωmega "
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == reference.decode(ids) == text


@pytest.mark.parametrize(
    ("arch", "make", "eos"),
    [
        ("qwen2", lambda: byte_level_bpe(nfc=True), "<|endoftext|>"),
        ("llama", byte_level_bpe, "<|end_of_text|>"),  # Llama 3
        ("mistral", sentencepiece_bpe, "</s>"),  # Llama 2 / Mistral
    ],
)
def test_cli_converts_with_the_checkpoints_own_tokenizer(tmp_path, capsys, arch, make, eos):
    hf, folder = build(tmp_path, arch, dtype=torch.float32, sliding_window=None)
    make().save(str(folder / "tokenizer.json"))
    out = tmp_path / "run"
    assert main(["convert", str(folder), str(out), "--lrs", "0", "train.seq_len=32"]) == 0
    assert "exact" in capsys.readouterr().out
    assert json.loads((out / "conversion.json").read_text())["model_type"] == arch
    model, loaded = load_model(out)
    tokenizer = loaded.tokenizer
    assert isinstance(tokenizer, PretrainedTokenizer) and tokenizer.eos_token == eos
    assert tokenizer.eos_id == hf_tokenizer_id(folder, eos)
    _same_ids_as_transformers(tokenizer, folder)
    ids = torch.tensor([tokenizer.encode(TEXT[:40])])
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), rtol=0, atol=1e-5)
    assert main(["generate", str(out), "--max-new-tokens", "4", "--prompt", "def"]) == 0


def hf_tokenizer_id(folder, token: str) -> int:
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return reference.convert_tokens_to_ids(token)


def test_sliding_window_conversion_is_reported(tmp_path, capsys):
    _, folder = build(tmp_path, "mistral", dtype=torch.float32, sliding_window=16)
    sentencepiece_bpe().save(str(folder / "tokenizer.json"))
    out = tmp_path / "run"
    assert main(["convert", str(folder), str(out), "--lrs", "0", "train.seq_len=16"]) == 0
    assert "sliding window of 16 tokens" in capsys.readouterr().out
    record = json.loads((out / "conversion.json").read_text())
    assert record["sliding_window"] == 16 and record["exact_at_zero_lr"]
    argv = ["convert", str(folder), str(tmp_path / "long"), "--lrs", "0", "model.max_seq_len=64"]
    assert main(argv) == 2
    assert "no sliding window" in capsys.readouterr().err
    assert main([*argv, "--allow-inexact", "train.seq_len=16"]) == 0
    record = json.loads((tmp_path / "long" / "conversion.json").read_text())
    assert not record["exact_at_zero_lr"] and "sliding window" in record["why_not_exact"]
