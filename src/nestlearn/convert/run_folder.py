"""Write a converted model as a nestlearn run folder at step 0.

``OUT/checkpoints/step_00000000/`` is an ordinary checkpoint (:mod:`nestlearn.train.checkpoint`):
weights, the resolved run config, the tokenizer and a step-0 trainer state (fresh optimizer and
schedule for ``optim.*``/``train.*``), so ``nestlearn generate OUT``, ``nestlearn eval OUT`` and
``nestlearn train --resume OUT train.steps=N`` work on it. ``OUT/conversion.json`` records the
source and the exactness of the conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from nestlearn.config.loader import from_dict, save_config
from nestlearn.config.schema import RunConfig, TrainConfig
from nestlearn.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from nestlearn.errors import CheckpointError, ConfigError, DataError
from nestlearn.train.checkpoint import save_checkpoint
from nestlearn.train.checkpoint_folders import list_checkpoints
from nestlearn.utils.io import atomic_write_text


def resolve_tokenizer(spec: str, hf_dir: str | Path) -> Tokenizer:
    """``auto``: the HF folder's ``tokenizer.json``; ``byte``: nestlearn's byte tokenizer; else a
    path to a tokenizer.json: a byte-level BPE (GPT-2, Llama 3, Qwen2) or a SentencePiece BPE
    with byte fallback (Llama 2, Mistral), see :mod:`nestlearn.convert.tokenizer`. DataError
    with the fix when nestlearn cannot use it."""
    hf_dir = Path(hf_dir)
    if spec == "byte":
        return ByteTokenizer()
    path = hf_dir / "tokenizer.json" if spec == "auto" else Path(spec)
    if spec == "auto" and not path.is_file():
        raise DataError(
            f"{hf_dir} has no tokenizer.json (a tokenizer.model alone is not read: save the "
            "fast tokenizer with AutoTokenizer.from_pretrained(...).save_pretrained(dir)); pass "
            "--tokenizer PATH (a tokenizer.json) or --tokenizer byte (ids = UTF-8 bytes, only "
            "meaningful for models trained on bytes)"
        )
    try:
        return load_tokenizer(path)
    except DataError as exc:
        raise DataError(
            f"{exc}. nestlearn reads byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2) and "
            "SentencePiece BPEs with byte fallback (Llama 2, Mistral); pass --tokenizer PATH to "
            "another one, or --tokenizer byte"
        ) from None


def run_config(
    model_config: Any, out_dir: Path, tokenizer: Tokenizer, sections: Mapping[str, Any], name: str
) -> RunConfig:
    """Defaults < ``sections`` (``data.*``, ``optim.*``, ``train.*``, ...) with the converted
    ``model`` section, ``train.out_dir = out_dir``, ``data.tokenizer`` of the tokenizer and
    ``train.seq_len`` at most ``model.max_seq_len`` unless given."""
    if "model" in sections:
        raise ConfigError("model.* overrides are applied to the converted model, not here")
    data = dict(sections)
    data["model"] = asdict(model_config)
    train = {**dict(sections.get("train", {})), "out_dir": str(out_dir)}
    # The default training length, capped by the model's context (GPT-2: 1024, tiny models less).
    train.setdefault("seq_len", min(TrainConfig().seq_len, model_config.max_seq_len))
    data["train"] = train
    data["data"] = {**dict(sections.get("data", {})), "tokenizer": tokenizer.kind}
    data.setdefault("name", name)
    cfg = from_dict(data)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{cfg.model.vocab_size}; pass the tokenizer the model was trained with"
        )
    return cfg


def write_run_folder(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    sections: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    name: str = "converted",
) -> Path:
    """Save ``model`` (a built nestlearn model with ``.config``) as run folder ``out_dir`` at step
    0; returns the checkpoint folder. Refuses a folder that already holds checkpoints."""
    from nestlearn.train.level_steps import LevelSteps
    from nestlearn.train.optim import build_optimizer, build_scheduler
    from nestlearn.train.trainer import make_trainer_state

    out = Path(out_dir)
    if list_checkpoints(out):
        raise CheckpointError(
            f"{out} already holds checkpoints; choose a new output folder (nothing is overwritten)"
        )
    cfg = run_config(model.config, out, tokenizer, dict(sections or {}), name)
    out.mkdir(parents=True, exist_ok=True)
    # The state a fresh `nestlearn train` would checkpoint at step 0, for --resume.
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    trainer_state = make_trainer_state(
        step=0,
        seed=cfg.train.seed,
        optimizer=optimizer,
        scheduler=scheduler,
        level_steps=LevelSteps.from_spec(model, cfg.train.level_periods),
    )
    checkpoint = save_checkpoint(
        out, 0, model=model, trainer_state=trainer_state, cfg=cfg, tokenizer=tokenizer
    )
    save_config(cfg, out / "config.yaml")
    tokenizer.save(out / "tokenizer.json")
    if record is not None:
        atomic_write_text(out / "conversion.json", json.dumps(dict(record), indent=2) + "\n")
    return checkpoint
