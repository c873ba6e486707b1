"""``model.check_finite``: the first layer and token whose memory went non-finite are named."""

from __future__ import annotations

import re

import pytest
import torch

from nestlearn.config import load_config
from nestlearn.errors import NonFiniteMemoryError
from nestlearn.models.registry import available_models, build_model
from nestlearn.train.trainer import Trainer
from tests.models.test_memory_models import MEMORY_MODELS, small


def poison_values(model, block: int, token: int):
    """Make block ``block``'s value projection emit inf at ``token`` (batch row 1 only)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[1, token] = float("inf")
        return output

    return model.blocks[block].mixer.heads.v_proj.register_forward_hook(hook)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_the_first_non_finite_memory_is_named(name):
    model = small(name, check_finite=True, conv_size=0)
    poison_values(model, block=1, token=5)
    with pytest.raises(
        NonFiniteMemoryError, match=r"block 1 .*its memory.* token 5 \(batch row 1\)"
    ):
        model(torch.randint(0, 37, (2, 9)))


def test_decoding_names_the_absolute_token():
    model = small("gated_deltanet", check_finite=True, conv_size=0)
    state = model.init_state(2)
    tokens = torch.randint(0, 37, (2, 8))
    _, state = model(tokens[:, :6], state)
    poison_values(model, block=0, token=0)
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 .* token 6 "):
        model(tokens[:, 6:7], state)


def test_a_non_finite_input_is_reported_as_the_input():
    model = small("deltanet", check_finite=True)
    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    tokens = torch.zeros(1, 6, dtype=torch.long)
    tokens[0, 4] = 3
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 .*its input.* token 4"):
        model(tokens)


def test_off_by_default_and_finite_runs_pass():
    model = small("titans_lmm", check_finite=True)
    model(torch.randint(0, 37, (2, 9)))  # finite: no error
    quiet = small("titans_lmm", conv_size=0)
    poison_values(quiet, block=1, token=5)
    logits, _ = quiet(torch.randint(0, 37, (2, 9)))
    assert not torch.isfinite(logits).all()


def hope_model(name: str, **fields):
    """A tiny ``hope`` or ``hope_attention`` with ``check_finite`` on."""
    model = {
        "name": name,
        "vocab_size": 37,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 32,
        "cms_chunk_sizes": [4, 3],
        "cms_hidden": 12,
        "check_finite": True,
        **fields,
    }
    if name == "hope":
        model.update(chunk_size=4, other_chunk_size=2)
    cfg = load_config(None, {"model": model, "train": {"seq_len": 32}})
    torch.manual_seed(0)
    return build_model(cfg.model)


def poison_output(module, token: int, value: float = float("inf")):
    """Make ``module`` emit ``value`` at ``token`` (batch row 1 only)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[1, token] = value
        return output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize(
    "name,layer,expected",
    [
        ("hope", "mixer", r"block 1 \(hope mixer, self-modifying Titans\): one of its memories"),
        ("hope_attention", "mixer", r"block 1 \(attention\): its output"),
        ("hope", "cms", r"block 1 \(CMS level 1\): its memory"),
        ("hope_attention", "cms", r"block 1 \(CMS level 1\): its memory"),
    ],
)
def test_hope_models_name_the_first_non_finite_layer_and_token(name, layer, expected):
    model = hope_model(name)
    block = model.blocks[1]
    if layer == "mixer" and name == "hope":
        poison_output(block.mixer.in_proj, token=5)
    elif layer == "mixer":  # scores that overflow to inf at token 5
        poison_output(block.mixer.attn.qkv, token=5, value=1e30)
    else:
        poison_output(block.cms.levels[1].norm, token=5)
    with pytest.raises(NonFiniteMemoryError, match=expected + r".* token 5 \(batch row 1\)"):
        model(torch.randint(0, 37, (2, 9)))


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_a_cms_level_whose_update_overflows_is_named_at_its_next_chunk(name):
    # level 0 (C = 4) reads chunk 0 finite; its update overflows, so token 4 reads inf weights
    model = hope_model(name, cms_objective="local")
    with torch.no_grad():
        model.blocks[0].cms.levels[0].w2.mul_(1e30)
    with pytest.raises(
        NonFiniteMemoryError,
        match=r"block 0 \(CMS level 0\): its memory went non-finite at token 4 .*model\.cms_lrs",
    ):
        model(torch.randint(0, 37, (2, 9)))


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_hope_decoding_names_the_absolute_token(name):
    model = hope_model(name)
    tokens = torch.randint(0, 37, (2, 8))
    state = model.init_state(2)
    _, state = model(tokens[:, :6], state)
    poison_output(model.blocks[0].cms.levels[0].norm, token=0)
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 \(CMS level 0\).* token 6 "):
        model(tokens[:, 6:7], state)


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_hope_models_with_checks_on_run_finite_inputs_unchanged(name):
    checked, plain = hope_model(name), hope_model(name, check_finite=False)
    tokens = torch.randint(0, 37, (2, 9))
    # the same weights and code: the checks only read the outputs
    assert torch.equal(checked(tokens)[0], plain(tokens)[0])


def transformer(**fields):
    model = {"name": "transformer", "vocab_size": 37, "d_model": 16, "n_layers": 2, "n_heads": 2}
    cfg = load_config(None, {"model": {**model, "check_finite": True, **fields}})
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_the_transformer_names_the_first_non_finite_layer_and_token():
    model = transformer()
    poison_output(model.blocks[1].attn.qkv, token=5, value=1e30)  # scores overflow at token 5
    with pytest.raises(NonFiniteMemoryError, match=r"block 1 \(attention\): its output.* token 5 "):
        model(torch.randint(0, 37, (2, 9)))
    model = transformer()
    poison_output(model.blocks[0].mlp_norm, token=3, value=1e30)
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 \(MLP\): its output.* token 3 "):
        model(torch.randint(0, 37, (2, 9)))


ADVICE_MODELS = [*MEMORY_MODELS, "titans_mac", "hope", "hope_attention", "transformer"]


def checked_model(name: str):
    if name == "transformer":
        return transformer()
    return hope_model(name) if name.startswith("hope") else small(name, check_finite=True)


@pytest.mark.parametrize("name", ADVICE_MODELS)
def test_the_advice_names_only_keys_the_model_has(name):
    model = checked_model(name)
    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    tokens = torch.zeros(1, 6, dtype=torch.long)
    tokens[0, 4] = 3
    with pytest.raises(NonFiniteMemoryError, match=r"block 0 .*its input.* token 4") as info:
        model(tokens)
    message = str(info.value)
    keys = re.findall(r"\bmodel\.(\w+)", message)
    assert all(hasattr(model.config, key) for key in keys), message
    assert ("memory_max_lr" in keys) == name.startswith("titans"), message
    assert "optim.lr" in message and "train.precision=fp32" in message


def test_training_names_the_optimizer_step(debug_config):
    trainer = Trainer(debug_config("model.name=hope_attention", "model.check_finite=true"))
    trainer.train_step()  # finite: no error
    poison_output(trainer.model.blocks[1].cms.levels[0].norm, token=5)
    with pytest.raises(
        NonFiniteMemoryError, match=r"^optimizer step 2: block 1 \(CMS level 0\): .* token 5 "
    ):
        trainer.train_step()


@pytest.mark.parametrize("name", available_models())
def test_every_model_takes_check_finite(name):
    # the README lists model.check_finite for every model; hope and hope_attention refused it
    cfg = load_config(None, [f"model.name={name}", "model.check_finite=true"])
    assert cfg.model.check_finite is True
