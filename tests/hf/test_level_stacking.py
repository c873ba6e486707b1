"""Level stacking (SPEC §4): tiny random HF Llama / GPT-2 models -> hope_attention, logits equal.

The HF models are built offline with ``transformers`` (the conversion itself does not use it),
every parameter randomized (biases and norms included, so a dropped or transposed tensor shows)
and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="building reference HF models needs transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from nestlearn.cli.main import main
from nestlearn.convert import inexact_reason, level_stack, resolve_tokenizer
from nestlearn.errors import CheckpointError, ConfigError, DataError
from nestlearn.train.checkpoint import load_model

VOCAB = 300  # > 257, so nestlearn's byte tokenizer fits for the run-folder tests
T = 40


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            # Norm gains around 1, everything else N(0, 0.15²): logits of order 1.
            p.copy_(1 + 0.3 * noise if "norm" in name or "ln_" in name else 0.15 * noise)


def llama(tmp_path, dtype=torch.float64, **fields):
    values = {
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
    torch.manual_seed(0)
    config = LlamaConfig(**{**values, **fields})
    model = LlamaForCausalLM(config).eval()
    _randomize(model, 1)
    model.to(dtype).save_pretrained(tmp_path / "llama")
    return model.to(dtype), tmp_path / "llama"


def gpt2(tmp_path, dtype=torch.float64, **fields):
    values = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    values |= {"bos_token_id": 0, "eos_token_id": 0}
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**values, **fields})).eval()
    _randomize(model, 2)
    model.to(dtype).save_pretrained(tmp_path / "gpt2")
    return model.to(dtype), tmp_path / "gpt2"


BUILDERS = {"llama": llama, "gpt2": gpt2}
# float64 tolerance: transformers' Llama computes RMSNorm and the RoPE angles in float32 whatever
# the model dtype (ours stays in float64 but for the RoPE tables, float32 rounded once); that
# alone moves its logits by ~1e-6. GPT-2 runs in float64 on both sides.
TOL64 = {"llama": 1e-5, "gpt2": 1e-10}


def tokens(seed: int = 0, length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


# (levels, variant, extra levels): SPEC §4's exact settings.
EXACT = [
    (1, "sequential", "auto"),
    (1, "nested", "auto"),
    (3, "sequential", "zero"),
    (3, "independent", "copy"),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("levels", "variant", "extra"), EXACT)
def test_zero_lr_logits_equal_the_original_float64(tmp_path, arch, levels, variant, extra):
    hf, folder = BUILDERS[arch](tmp_path)
    ours = level_stack(
        folder,
        levels=levels,
        lrs=[0.0] * levels,
        chunk_sizes=[8, 4, 2][:levels],
        variant=variant,
        extra_levels=extra,
        dtype=torch.float64,
    )
    ids = tokens()
    expected = hf_logits(hf, ids)
    assert expected.abs().max() > 1.0  # large enough for a wrong tensor to show
    tol = TOL64[arch]
    torch.testing.assert_close(our_logits(ours, ids), expected, rtol=tol, atol=tol)
    # The decoding path (KV cache, CMS state) gives the same numbers token by token.
    state = ours.init_state(2)
    steps = []
    with torch.no_grad():
        for t in range(6):
            logits, state = ours(ids[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, :6], rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_logits_equal_and_untied_or_tied_heads(tmp_path, arch):
    # Llama untied (its default), GPT-2 tied (its default), both in float32 storage.
    hf, folder = BUILDERS[arch](tmp_path, dtype=torch.float32)
    ours = level_stack(folder, levels=2, lrs=[0.0, 0.0])
    assert ours.config.tie_embeddings == (arch == "gpt2")
    ids = tokens(1)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_llama_variants_tied_head_no_gqa_and_biases(tmp_path):
    fields = {"tie_word_embeddings": True, "num_key_value_heads": 4}
    fields |= {"attention_bias": True, "mlp_bias": True}
    hf, folder = llama(tmp_path, **fields)
    ours = level_stack(folder, lrs=[0.0], dtype=torch.float64)
    assert ours.config.attn_bias and ours.config.cms_bias
    ids = tokens(2)
    tol = TOL64["llama"]
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=tol, atol=tol)


def test_sharded_checkpoint_converts_the_same(tmp_path):
    hf, _ = gpt2(tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = level_stack(tmp_path / "sharded", lrs=[0.0], dtype=torch.float64)
    ids = tokens(3)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=1e-10, atol=1e-10)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    # The original GPT-2 files name tensors without "transformer." and carry causal-mask buffers.
    from safetensors.torch import load_file, save_file

    hf, folder = gpt2(tmp_path)
    stored = load_file(str(folder / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v.contiguous() for k, v in stored.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(renamed, str(folder / "model.safetensors"))
    ours = level_stack(folder, lrs=[0.0], dtype=torch.float64)
    ids = tokens(7)
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_with_a_learning_rate_it_learns_in_context_and_trains(tmp_path, arch):
    hf, folder = BUILDERS[arch](tmp_path, dtype=torch.float32)
    chunks = [16, 8]
    ours = level_stack(folder, levels=2, chunk_sizes=chunks, lrs=[0.5, 0.5])
    ids = tokens(4, length=64)
    expected, got = hf_logits(hf, ids), our_logits(ours, ids)
    # Until the fastest level's first chunk end the weights are the pretrained ones...
    first = min(chunks)
    torch.testing.assert_close(got[:, :first], expected[:, :first], rtol=0, atol=1e-5)
    # ...then the CMS has learned from the context and the predictions move.
    assert (got[:, first:] - expected[:, first:]).abs().max() > 1e-3
    # One outer training step runs and changes the weights (CMS levels included).
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    before = ours.blocks[0].cms.levels[1].w2.detach().clone()
    logits, _ = ours(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, ours.blocks[0].cms.levels[1].w2)


def test_teach_signal_through_layernorm_is_autograd(tmp_path):
    _, folder = gpt2(tmp_path)
    ours = level_stack(folder, dtype=torch.float64)
    h = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 5))
    logits = ours.head(ours.norm(h))
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="sum"
    )
    (expected,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(ours.next_token_error(h, targets), expected, rtol=1e-10, atol=1e-12)


def test_run_folder_works_with_generate_eval_and_train_resume(tmp_path, capsys):
    # The byte tokenizer's 257 ids: `generate` samples from the whole head.
    hf, folder = gpt2(tmp_path, dtype=torch.float32, vocab_size=257)
    out = tmp_path / "run"
    overrides = [
        "model.cms_objective=local",
        "data.source=stdlib",
        "data.max_bytes=60000",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_every=0",
        "train.progress=false",
        "eval.max_tokens=256",
    ]
    argv = ["convert", str(folder), str(out), "--tokenizer", "byte", "--lrs", "0", *overrides]
    assert main(argv) == 0
    assert "exact" in capsys.readouterr().out
    record = json.loads((out / "conversion.json").read_text())
    assert record["exact_at_zero_lr"] and record["model_type"] == "gpt2"
    model, loaded = load_model(out)
    assert loaded.step == 0 and loaded.config.model.cms_objective == "local"
    ids = tokens(5) % 257
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), rtol=0, atol=1e-5)
    assert main(["generate", str(out), "--max-new-tokens", "4", "--prompt", "ab"]) == 0
    assert main(["eval", str(out), "eval.max_tokens=128"]) == 0
    assert "validation split" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "train.steps=2"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert load_model(out)[1].step == 2


def test_tokenizer_json_of_the_hf_folder_is_used(tmp_path):
    from nestlearn.data.document import Document
    from nestlearn.data.tokenizer import BPETokenizer

    _, folder = gpt2(tmp_path, dtype=torch.float32)
    docs = [Document(f"d{i}", "def f(x):\n    return x + 1\n" * 30) for i in range(3)]
    tokenizer = BPETokenizer.train(docs, vocab_size=VOCAB, max_bytes=0, seed=0)
    tokenizer.save(folder / "tokenizer.json")
    argv = ["convert", str(folder), str(tmp_path / "run"), "--chunk-sizes", "8,4", "--lrs", "0,0"]
    assert main(argv) == 0
    _, loaded = load_model(tmp_path / "run")
    assert loaded.tokenizer.fingerprint() == tokenizer.fingerprint()
    # --levels defaults to the number of chunk sizes given.
    assert loaded.config.model.cms_chunk_sizes == [8, 4]


def test_exactness_table():
    assert inexact_reason(1, "nested", "copy") is None
    assert inexact_reason(2, "sequential", "zero") is None
    assert inexact_reason(2, "independent", "copy") is None
    assert "k times" in inexact_reason(2, "sequential", "copy")
    assert "1/k" in inexact_reason(2, "independent", "zero")
    assert "nested" in inexact_reason(2, "nested", "zero")


def test_inexact_settings_are_refused_unless_allowed(tmp_path):
    hf, folder = gpt2(tmp_path)
    with pytest.raises(ConfigError, match=r"applies the MLP k times.*--allow-inexact"):
        level_stack(folder, levels=2, extra_levels="copy")
    with pytest.raises(ConfigError, match="nested levels all start from level 0"):
        level_stack(folder, levels=2, variant="nested")
    # The same settings reached through model.* overrides are judged too.
    nested = {"cms_chunk_sizes": [8, 4], "cms_lrs": [0.0, 0.0], "cms_variant": "nested"}
    with pytest.raises(ConfigError, match="nested levels all start from level 0"):
        level_stack(folder, overrides=nested)
    # Allowed: a chain of two copies really is a different function.
    ours = level_stack(
        folder, levels=2, lrs=[0.0, 0.0], extra_levels="copy", exact=False, dtype=torch.float64
    )
    ids = tokens(6)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max() > 1e-3


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        level_stack(tmp_path)
    _, folder = llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ConfigError, match=r"model_type 't5' is not supported.*llama, gpt2"):
        level_stack(folder)
    scaled = {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
    (folder / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ConfigError, match="RoPE scaling"):
        level_stack(folder)
    # A config that promises more layers than the weights hold: the missing key is named.
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.q_proj\.weight'"):
        level_stack(folder)
    # Fewer layers than the weights: the first tensor left over is named.
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"no place .*'model\.layers\.1\."):
        level_stack(folder)
    # A size that does not match the tensors: our key and both shapes are named.
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.cms\.levels\.0\.w1' has shape"):
        level_stack(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"has no tokenizer.json.*--tokenizer byte"):
        resolve_tokenizer("auto", folder)
    capsys.readouterr()
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    argv = ["convert", str(folder), str(tmp_path / "run"), "--tokenizer", "byte"]
    assert main([*argv, "--levels", "2", "--lrs", "0"]) == 2
    assert "lrs: 1 entries for 2 levels" in capsys.readouterr().err
    assert main([*argv, "model.name=transformer"]) == 2
    assert "always hope_attention" in capsys.readouterr().err
