"""Parameters stepped every p optimizer steps: untouched in between, exact resume mid-period."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.models.registry import build_model
from nestlearn.train import Trainer
from nestlearn.train.level_steps import LevelSteps
from nestlearn.train.metrics import read_metrics

# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def loss_at(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
    return model(x).pow(2).sum() + model(x).sum()


def train(model: nn.Module, levels: LevelSteps, optimizer, steps: range) -> list[dict]:
    snapshots = []
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss_at(model, step).backward()
        levels.apply(step)
        optimizer.step()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    return snapshots


def test_period_p_parameters_change_only_every_p_steps_even_with_adamw_decay():
    model = toy()
    levels = LevelSteps(model, {"2.weight": 3, "2.bias": 3, "0.weight": 1})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = train(model, levels, optimizer, range(7))
    for step, snap in enumerate(snapshots):
        previous = before if step == 0 else snapshots[step - 1]
        moved = not torch.equal(snap["2.weight"], previous["2.weight"])
        assert moved == ((step + 1) % 3 == 0), step
        assert not torch.equal(snap["0.weight"], previous["0.weight"])


def test_the_released_gradient_is_the_sum_over_the_period():
    model, reference = toy(), toy()
    levels = LevelSteps(model, {"2.weight": 3})
    train(model, levels, torch.optim.SGD(model.parameters(), lr=0.01), range(3))
    # The same three gradients, each at the weights the first loop had then.
    total = torch.zeros_like(reference[2].weight)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01)
    for step in range(3):
        optimizer.zero_grad()
        loss_at(reference, step).backward()
        total += reference[2].weight.grad
        reference[2].weight.grad = None
        optimizer.step()
    torch.testing.assert_close(model[2].weight, reference[2].weight - 0.01 * total)


def test_resume_in_the_middle_of_a_period_is_exact():
    periods = {"2.weight": 4, "0.bias": 3}
    model = toy()
    levels = LevelSteps(model, periods)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    full = train(model, levels, optimizer, range(10))

    model = toy()
    levels = LevelSteps(model, periods)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    train(model, levels, optimizer, range(5))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "lv": levels.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = toy()
    model.load_state_dict(saved["model"])
    levels = LevelSteps(model, periods)
    levels.load_state_dict(saved["lv"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    optimizer.load_state_dict(saved["opt"])
    resumed = train(model, levels, optimizer, range(5, 10))
    for key in full[-1]:
        torch.testing.assert_close(resumed[-1][key], full[-1][key], rtol=0, atol=0, msg=key)


def hope(**fields):
    overrides = {
        "name": "hope_attention",
        "vocab_size": 11,
        "d_model": 8,
        "n_layers": 1,
        "n_heads": 2,
        "cms_chunk_sizes": [4, 2],
        "cms_lrs": [0.1, 0.1],
        **fields,
    }
    return build_model(load_config(None, {"model": overrides, "train": {"seq_len": 8}}).model)


def test_periods_from_the_cms_levels_and_from_globs():
    model = hope()
    levels = LevelSteps.from_spec(model, "cms, blocks.0.mixer.*=2")
    assert levels.periods["blocks.0.cms.levels.0.w1"] == 4
    assert levels.periods["blocks.0.cms.levels.1.norm.weight"] == 2
    assert levels.periods["blocks.0.mixer.attn.qkv.weight"] == 2
    assert "embed.weight" not in levels.periods
    assert LevelSteps.from_spec(model, "") is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("blocks.*=zero", "expected 'cms' or 'glob=period'"),
        ("nothing.*=2", "matches no parameter"),
    ],
)
def test_bad_specs_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        LevelSteps.from_spec(hope(), spec)
    with pytest.raises(ConfigError, match="has no CMS"):
        LevelSteps.from_spec(toy(), "cms")


def test_trainer_resume_with_level_periods_is_exact(debug_config):
    common = [
        "model.name=hope_attention",
        "model.cms_chunk_sizes=[8,4]",
        "model.cms_lrs=[0.1,0.1]",
        "model.n_layers=1",
        "train.level_periods=blocks.*.cms.levels.0.*=3",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.eval_every=0",
        "train.ckpt_every=0",
    ]
    full = debug_config(*common, "train.steps=7", out="full")
    Trainer(full).fit()
    part = debug_config(*common, "train.steps=5", out="part")
    Trainer(part).fit()
    run_dir = Path(part.train.out_dir)
    Trainer.from_checkpoint(run_dir, {"train": {"steps": 7}}).fit()

    def train_losses(path: str) -> list[float]:
        records = read_metrics(Path(path) / "metrics.jsonl")
        return [r["loss"] for r in records if r["kind"] == "train"]

    assert train_losses(part.train.out_dir) == train_losses(full.train.out_dir)
