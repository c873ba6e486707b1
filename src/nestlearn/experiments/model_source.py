"""Where an experiment's models come from, and the command-line pieces every experiment shares.

One module for all experiments:

- :func:`add_run_args` / :func:`setup`: ``--out``, ``--seed``/``--seeds``, ``--device``,
  ``--threads``, ``--no-progress``; threads, seeds and the device. :func:`apply_preset`:
  named scales of an experiment's defaults (``--preset tiny|paper``).
- Experiments on one model (continual, test-time, zero-shot): :func:`add_model_args` and
  :func:`model_from_args`. ``--checkpoint DIR`` loads a run folder (its newest valid checkpoint)
  or a step folder: the model, its weights and the tokenizer it was trained with (a checkpoint
  without ``tokenizer.json`` is refused by the checkpoint manifest check). ``--model NAME`` builds
  a fresh, randomly initialised model with the byte tokenizer (no corpus to prepare): NAME is a
  named config (``tiny``, ``gated_deltanet-tiny``, a ``.yaml`` path) or an architecture
  (``titans_lmm``: its ``NAME-tiny`` config if there is one, else the ``tiny`` config's shared
  sizes). ``model.key=value`` words override the fresh model's config.
- Experiments that train several small models on a synthetic task (MQAR, NIAH):
  :func:`add_architecture_args` (``--models``, ``--d-model``, ``--n-layers``, ``--n-heads``,
  ``--set``) and :func:`model_overrides`; the models are built by
  :func:`nestlearn.eval.synthetic.small_model`.
- :func:`check_context` (a context longer than a bounded model takes) and :func:`clone_state`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from nestlearn.config import load_config, named_configs
from nestlearn.config.loader import parse_overrides, read_named
from nestlearn.config.schema import ModelConfig
from nestlearn.data.tokenizer import ByteTokenizer, Tokenizer
from nestlearn.errors import ConfigError, SequenceTooLongError
from nestlearn.experiments.seeds import add_seed_args, resolve_seeds
from nestlearn.models.base import LanguageModel, State
from nestlearn.models.registry import available_models, build_model, model_config_class
from nestlearn.train.runtime import resolve_device, seed_everything

DEFAULT_MODEL = "gated_deltanet-tiny"


@dataclass
class ExperimentModel:
    model: LanguageModel
    tokenizer: Tokenizer
    name: str  # how results name the model ("gated_deltanet-tiny (fresh)", "runs/tiny step 600")
    fresh: bool  # randomly initialised (not from a checkpoint)
    device: torch.device


def add_run_args(parser: argparse.ArgumentParser, out: str) -> None:
    """``--out``, ``--seed S [S ...]`` / ``--seeds N`` (:mod:`nestlearn.experiments.seeds`),
    ``--device``, ``--threads``, ``--no-progress``."""
    parser.add_argument("--out", default=out, help=f"output folder (default {out})")
    add_seed_args(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, seeds and the device, from :func:`add_run_args`' arguments.

    Resolves ``args.seeds`` / ``args.seed`` (:func:`resolve_seeds`) and seeds torch with the
    first seed; an experiment running several seeds reseeds per run."""
    resolve_seeds(args)
    if args.threads < 0:
        raise ConfigError("--threads must be >= 0 (0 = torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    return resolve_device(args.device)


def apply_preset(
    args: argparse.Namespace, presets: Mapping[str, Mapping[str, Any]]
) -> argparse.Namespace:
    """Fill every flag left unset (``None``) from ``presets[args.preset]``: a named scale of an
    experiment's defaults that any flag given on the command line overrides; then the seeds
    (:func:`resolve_seeds`: a preset may set ``n_seeds``, which ``--seed``/``--seeds`` override)."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    resolve_seeds(args)
    return args


def add_model_args(
    parser: argparse.ArgumentParser,
    default: str = DEFAULT_MODEL,
    default_overrides: Sequence[str] = (),
) -> None:
    """``--model NAME``, ``--checkpoint DIR`` and ``model.key=value`` overrides (one model).

    ``default_overrides`` apply to a fresh model when no ``model.*`` override is given (an
    experiment whose CPU default needs a smaller model than the named config, say).
    """
    parser.set_defaults(default_overrides=list(default_overrides))
    group = parser.add_argument_group("model")
    shown = " ".join([default, *default_overrides])
    group.add_argument(
        "--model",
        default=default,
        help=f"named config, .yaml or architecture of a fresh model (default: {shown})",
    )
    group.add_argument(
        "--checkpoint", help="run folder or checkpoint folder to load instead of a fresh model"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="model.key=value", help="fresh model's config overrides"
    )


def add_architecture_args(parser: argparse.ArgumentParser, models: Sequence[str]) -> None:
    """``--models``, ``--d-model``, ``--n-layers``, ``--n-heads``, ``--set`` (small models)."""
    parser.add_argument(
        "--models", nargs="+", default=list(models), metavar="NAME",
        help=f"registered architectures to compare (default: {' '.join(models)})",
    )  # fmt: skip
    parser.add_argument("--d-model", type=int, help="residual width (default: the preset's)")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks")
    parser.add_argument("--n-heads", type=int, default=2, help="heads (where the model has them)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
        help="another model field for every model that has it (e.g. chunk_size=32); repeatable",
    )  # fmt: skip


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


def fresh_model_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """The model config ``--model NAME model.k=v ...`` describes (see the module docstring)."""
    extra = parse_overrides(overrides)
    if set(extra) - {"model"}:
        raise ConfigError(
            f"experiments take only model.* overrides, got {', '.join(sorted(extra))}; "
            "training and protocol settings are flags (see --help)"
        )
    # Experiments set their own lengths; the named config's train.seq_len must not veto a
    # smaller model.max_seq_len.
    extra["train"] = {"seq_len": 1}
    named = set(named_configs())
    if name in named or name.endswith((".yaml", ".yml")):
        return load_config(name, extra).model
    if f"{name}-tiny" in named:
        return load_config(f"{name}-tiny", extra).model
    if name not in available_models():
        raise ConfigError(
            f"--model {name!r} is neither a named config ({', '.join(sorted(named))}) nor an "
            f"architecture ({', '.join(available_models())})"
        )
    fields = {f.name for f in dataclasses.fields(model_config_class(name))}
    tiny = read_named("tiny").get("model") or {}
    model = {k: v for k, v in tiny.items() if k in fields}
    model.update(extra.get("model", {}), name=name)
    return load_config(None, {"model": model, "train": extra["train"]}).model


def model_from_args(args: argparse.Namespace) -> ExperimentModel:
    """Load ``--checkpoint`` or build ``--model`` on ``--device`` (eval mode, seeded init);
    also applies :func:`setup` (threads, seeds)."""
    from nestlearn.train.checkpoint import load_model

    device = setup(args)
    if args.checkpoint:
        if args.overrides:
            raise ConfigError(
                "model.* overrides apply to fresh models only; a checkpoint's model is fixed"
            )
        model, loaded = load_model(args.checkpoint, device=device)
        return ExperimentModel(model, loaded.tokenizer, f"{loaded.path}", False, device)
    overrides = args.overrides or getattr(args, "default_overrides", [])
    cfg = fresh_model_config(args.model, overrides)
    tokenizer = ByteTokenizer()
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).eval()
    name = " ".join([args.model, *overrides])
    return ExperimentModel(model, tokenizer, f"{name} (fresh, byte tokenizer)", True, device)


def check_context(model: LanguageModel, n_tokens: int, what: str, fix: str) -> None:
    """Raise :class:`SequenceTooLongError` if ``n_tokens`` exceed the model's context limit.

    Recurrent models (``context_limit is None``) stream any length and always pass.
    """
    limit = model.context_limit
    if limit is not None and n_tokens > limit:
        raise SequenceTooLongError(
            f"{what} is {n_tokens} tokens but this {model.config.name} model reads at most "
            f"{limit} (model.max_seq_len); {fix}, or use a recurrent model, which streams any "
            "length"
        )


def clone_state(state: State) -> State:
    """A copy of a decoding state that the model may overwrite freely (KV caches are written in
    place, so continuing twice from one state needs a copy per branch)."""
    return {k: v.clone() for k, v in state.items()}
