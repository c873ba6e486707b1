"""``nestlearn info [CONFIG] [overrides] [--cost] | --checkpoint DIR | --list``: parameters,
levels, what a training step costs (FLOPs; ``--cost``: its time here) and the config."""

from __future__ import annotations

import argparse

import torch
import yaml

from nestlearn.cli.common import add_config_args, config_from_args
from nestlearn.config import named_configs, to_dict
from nestlearn.levels import LEVEL_HEADERS, levels_rows
from nestlearn.models.registry import available_models, build_model
from nestlearn.models.summary import count_parameters, parameter_table
from nestlearn.train.checkpoint import load_model
from nestlearn.train.report import markdown_table
from nestlearn.train.step_cost import measure_step_cost, step_flops


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name, help="parameters by component and the resolved config", description=__doc__
    )
    add_config_args(parser)
    parser.add_argument("--checkpoint", metavar="DIR", help="describe a trained checkpoint")
    parser.add_argument("--list", action="store_true", help="list named configs and models")
    parser.add_argument(
        "--cost", action="store_true",
        help="time training steps of the config on this machine (random tokens, after a warm-up)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("named configs:", ", ".join(named_configs()))
        print("models:", ", ".join(available_models()))
        return 0
    if args.checkpoint:
        model, loaded = load_model(args.checkpoint)
        cfg = loaded.config
        print(f"checkpoint {loaded.path} (step {loaded.step})\n")
    else:
        cfg = config_from_args(args)
        if cfg.model.vocab_size == 0:
            # Without training a tokenizer: bytes have 257 ids, a BPE at most data.vocab_size.
            cfg.model.vocab_size = 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
        # Shapes only (the meta device): a 1.3B config is described without allocating it.
        with torch.device("meta"):
            model = build_model(cfg.model)
    rows = [[component, n] for component, n in parameter_table(model)]
    rows.append(["total", count_parameters(model)])
    print(markdown_table(["component", "parameters"], rows))
    print(markdown_table(LEVEL_HEADERS, levels_rows(model.levels(cfg.optim.name))))
    cost = measure_step_cost(cfg) if args.cost else step_flops(model, cfg)
    print(cost.describe(cfg.train.steps) + "\n")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0
