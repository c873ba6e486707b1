"""Checkpoints: verified on read, never half-written, mismatches named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nestlearn.errors import CheckpointError, NonFiniteLossError
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    load_model,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from nestlearn.train.checkpoint_folders import list_checkpoints


@pytest.fixture
def trained(debug_config) -> Trainer:
    trainer = Trainer(debug_config("train.steps=10", "train.ckpt_every=5", "train.keep_last=3"))
    trainer.fit()
    return trainer


def test_layout_and_keep_last(trained):
    steps = [p.name for p in list_checkpoints(trained.run_dir)]
    assert steps == ["step_00000005", "step_00000010"]
    manifest = verify_checkpoint(trained.run_dir / "checkpoints" / "step_00000010")
    assert manifest["step"] == 10
    assert set(manifest["files"]) == {MODEL_FILE, STATE_FILE, "config.yaml", "tokenizer.json"}
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.md"):
        assert (trained.run_dir / name).is_file()


def test_keep_last_prunes(debug_config):
    trainer = Trainer(debug_config("train.steps=8", "train.ckpt_every=2", "train.keep_last=2"))
    trainer.fit()
    assert [p.name for p in list_checkpoints(trainer.run_dir)] == [
        "step_00000006",
        "step_00000008",
    ]


def test_trainer_state_loads_without_unpickling_code(trained):
    loaded = read_checkpoint(trained.run_dir)
    # read_checkpoint uses weights_only=True; this is what makes that possible.
    state = torch.load(loaded.path / STATE_FILE, weights_only=True)
    assert state["step"] == 10 and "optimizer" in state and "rng" in state


def test_loaded_model_matches_trained_model(trained):
    model, loaded = load_model(trained.run_dir)
    assert loaded.step == 10
    x = torch.randint(0, loaded.tokenizer.vocab_size, (2, 16))
    trained.model.eval()
    torch.testing.assert_close(model(x)[0], trained.model(x)[0])


def _corrupt(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_corrupt_and_truncated_files_are_detected(trained):
    newest = trained.run_dir / "checkpoints" / "step_00000010"
    _corrupt(newest / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt"):
        verify_checkpoint(newest)
    # A run folder falls back to the newest valid checkpoint, saying which one it skipped.
    with pytest.warns(UserWarning, match=r"step_00000010"):
        assert resolve_checkpoint(trained.run_dir).name == "step_00000005"
    older = trained.run_dir / "checkpoints" / "step_00000005"
    state = older / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated"):
        verify_checkpoint(older)
    with pytest.raises(CheckpointError, match=r"no valid checkpoint"):
        resolve_checkpoint(trained.run_dir)


def test_missing_manifest_and_missing_folder(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint"):
        resolve_checkpoint(tmp_path / "step_00000001")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"holds no checkpoints"):
        resolve_checkpoint(tmp_path)


def test_weights_of_another_config_are_refused(trained):
    from nestlearn.config import replace
    from nestlearn.models.registry import build_model

    other = replace(trained.cfg, ["model.d_model=48"]).model
    with pytest.raises(CheckpointError, match=r"do not match the model config"):
        load_weights(build_model(other), trained.last_checkpoint)


def test_resume_refuses_model_or_data_changes(trained):
    with pytest.raises(CheckpointError, match=r"cannot change model.d_model"):
        Trainer.from_checkpoint(trained.run_dir, {"model": {"d_model": 48}})
    with pytest.raises(CheckpointError, match=r"cannot change data.max_bytes"):
        Trainer.from_checkpoint(trained.run_dir, {"data": {"max_bytes": 1000}})


def test_fresh_run_refuses_a_folder_with_checkpoints(trained):
    with pytest.raises(CheckpointError, match=r"already holds checkpoints"):
        Trainer(trained.cfg)


def test_vocab_smaller_than_tokenizer_is_refused(trained, tmp_path):
    from nestlearn.config import replace
    from nestlearn.errors import ConfigError

    cfg = replace(trained.cfg, ["model.vocab_size=100", f"train.out_dir={tmp_path / 'new'}"])
    with pytest.raises(ConfigError, match=r"smaller than the tokenizer"):
        Trainer(cfg, corpus=trained.corpus)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(debug_config, monkeypatch):
    trainer = Trainer(debug_config("train.steps=12", "train.ckpt_every=5"))
    forward = type(trainer.model).forward

    def poisoned(self, tokens, state=None):
        logits, state = forward(self, tokens, state)
        return logits * float("nan") if trainer.step >= 7 else logits, state

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"at step 8.*step_00000005"):
        trainer.fit()
    assert resolve_checkpoint(trainer.run_dir).name == "step_00000005"
    verify_checkpoint(trainer.run_dir / "checkpoints" / "step_00000005")
