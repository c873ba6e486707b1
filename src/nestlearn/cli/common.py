"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse

from nestlearn.config import RunConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="named config (`nestlearn info --list`) or a .yaml path; default: built-in defaults",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides"
    )


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell ``tiny`` from ``train.steps=5`` in the first slot: fix that here."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    return config, overrides


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config, overrides = split_config_arg(args)
    return load_config(config, overrides)
