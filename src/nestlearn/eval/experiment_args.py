"""Command-line pieces the evaluation experiments share: output, device, threads, seed, models."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from nestlearn.config.loader import model_config_class
from nestlearn.errors import ConfigError
from nestlearn.train.runtime import resolve_device, seed_everything


def add_common_args(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--out", default=out, help=f"output folder (default {out})")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and model init")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_model_args(parser: argparse.ArgumentParser, models: Sequence[str]) -> None:
    parser.add_argument(
        "--models", nargs="+", default=list(models), metavar="NAME",
        help=f"registered architectures to compare (default: {' '.join(models)})",
    )  # fmt: skip
    parser.add_argument("--d-model", type=int, default=64, help="residual width")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks")
    parser.add_argument("--n-heads", type=int, default=2, help="heads (where the model has them)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
        help="another model field for every model that has it (e.g. chunk_size=32); repeatable",
    )  # fmt: skip


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, seeds and the device, from the common arguments."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    return resolve_device(args.device)


def model_overrides(models: Sequence[str], sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model, the ``--set key=value`` fields its config class has.

    A key that no chosen model has is an error (a typo would otherwise do nothing).
    """
    parsed: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.removeprefix("model.")
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not of the form key=value (e.g. chunk_size=32)")
        parsed[key] = yaml.safe_load(raw) if raw else ""
    fields = {
        name: {f.name for f in dataclasses.fields(model_config_class(name))} for name in models
    }
    for key in parsed:
        if not any(key in f for f in fields.values()):
            raise ConfigError(f"--set {key}=...: none of the models {', '.join(models)} has it")
    return {name: {k: v for k, v in parsed.items() if k in fields[name]} for name in models}
