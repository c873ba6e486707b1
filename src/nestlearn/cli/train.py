"""``nestlearn train [CONFIG] [overrides] [--resume RUN_DIR [--allow-data-change]]``.

Data-parallel: ``torchrun --nproc_per_node=N -m nestlearn train ...`` (docs/distributed.md).
"""

from __future__ import annotations

import argparse

from nestlearn.cli.common import add_config_args, config_from_args, split_config_arg
from nestlearn.config import parse_overrides
from nestlearn.errors import ConfigError
from nestlearn.train import Trainer


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="train a language model", description=__doc__)
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a run from its newest valid checkpoint (a run or checkpoint folder); "
        "overrides may change train.*/eval.*, not model.*/data.*",
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue even if the corpus, tokenizer or token streams differ "
        "from the checkpoint's (refused otherwise; the resume is then not exact)",
    )


def run(args: argparse.Namespace) -> int:
    if args.allow_data_change and not args.resume:
        raise ConfigError("--allow-data-change only applies with --resume RUN_DIR: drop it")
    if args.resume:
        config, overrides = split_config_arg(args)
        if config is not None:
            raise ConfigError(
                "--resume takes its config from the checkpoint; drop the config name "
                f"'{config}' (overrides like train.steps=... are allowed)"
            )
        trainer = Trainer.from_checkpoint(
            args.resume, parse_overrides(overrides), allow_data_change=args.allow_data_change
        )
    else:
        trainer = Trainer(config_from_args(args))
    try:
        result = trainer.fit()
    finally:
        trainer.close()  # under torchrun: leave the process group
    if not trainer.dist.is_main:
        return 0
    ev = result.final_eval
    state = "interrupted; checkpoint saved" if result.interrupted else "done"
    if result.extra.get("already_finished"):
        state = (
            f"already finished (train.steps={trainer.cfg.train.steps}): nothing to train, "
            "pass train.steps=N to train further"
        )
    scores = f", val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, bpb {ev['bpb']:.4f}" if ev else ""
    print(f"{state}: step {result.step}{scores} -> {result.checkpoint}")
    return 0
