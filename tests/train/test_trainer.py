from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestlearn.data import train_batch
from nestlearn.models.registry import build_model
from nestlearn.train import Trainer
from nestlearn.train.optim import build_optimizer, build_scheduler
from nestlearn.train.runtime import seed_everything


def test_grad_accumulation_equals_one_big_batch(debug_config):
    """grad_accum=2 micro-batches of b == one batch of 2b made of the same sequences."""
    cfg = debug_config("train.grad_accum=2", "train.batch_size=3", "optim.grad_clip=0")
    trainer = Trainer(cfg)
    trainer.model.double()
    trainer.optimizer = build_optimizer(trainer.model, cfg.optim)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg.optim, cfg.train.steps)

    seed_everything(cfg.train.seed)
    model = build_model(trainer.cfg.model).double()
    model.load_state_dict(trainer.model.state_dict())
    optimizer = build_optimizer(model, cfg.optim)
    build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    batches = [
        train_batch(
            trainer.corpus.train,
            step=0,
            micro_step=m,
            batch_size=3,
            seq_len=cfg.train.seq_len,
            seed=cfg.train.seed,
        )
        for m in range(2)
    ]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    logits, _ = model(x)
    expected_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    expected_loss.backward()
    optimizer.step()

    loss, _ = trainer.train_step()
    assert abs(loss - expected_loss.item()) < 1e-12
    for (name, got), want in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_validation_metrics_are_consistent(debug_config):
    trainer = Trainer(debug_config())
    result = trainer.evaluate()
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    # Every byte-tokenizer id but eos (0 bytes) is one byte, so bpb >= loss / ln 2.
    assert result["bpb"] >= result["loss"] / math.log(2) - 1e-9
    uni = trainer.unigram_baseline()
    assert uni["tokens"] == result["tokens"]


def test_training_beats_the_unigram_baseline(debug_config):
    result = Trainer(
        debug_config("train.steps=400", "train.eval_every=0", "train.ckpt_every=0")
    ).fit()
    assert result.final_eval["loss"] < result.unigram_eval["loss"] - 0.2
