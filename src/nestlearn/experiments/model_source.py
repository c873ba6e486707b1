"""The model an experiment runs on: a trained checkpoint, or a fresh model from a config.

``--checkpoint DIR`` loads a run folder (its newest valid checkpoint) or a step folder: the
model, its weights and the tokenizer it was trained with. ``--model NAME`` builds a fresh,
randomly initialised model with the byte tokenizer (no corpus to prepare): NAME is a named config
(``tiny``, ``gated_deltanet-tiny``, a ``.yaml`` path) or an architecture (``titans_lmm``: its
``NAME-tiny`` config if there is one, else the ``tiny`` config's shared sizes). ``model.key=value``
words override the fresh model's config.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from nestlearn.config import load_config, named_configs
from nestlearn.config.loader import parse_overrides, read_named
from nestlearn.config.schema import ModelConfig
from nestlearn.data.tokenizer import ByteTokenizer, Tokenizer
from nestlearn.errors import ConfigError, SequenceTooLongError
from nestlearn.models.base import LanguageModel, State
from nestlearn.models.registry import available_models, build_model, model_config_class
from nestlearn.train.runtime import resolve_device

DEFAULT_MODEL = "gated_deltanet-tiny"


@dataclass
class ExperimentModel:
    model: LanguageModel
    tokenizer: Tokenizer
    name: str  # how results name the model ("gated_deltanet-tiny (fresh)", "runs/tiny step 600")
    fresh: bool  # randomly initialised (not from a checkpoint)
    device: torch.device


def add_model_args(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        help=f"named config, .yaml or architecture of a fresh model (default: {default})",
    )
    group.add_argument(
        "--checkpoint", help="run folder or checkpoint folder to load instead of a fresh model"
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=0, help="model init, data and sampling seed")
    group.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument(
        "overrides", nargs="*", metavar="model.key=value", help="fresh model's config overrides"
    )


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
    """Load ``--checkpoint`` or build ``--model`` on ``--device`` (eval mode, seeded init)."""
    from nestlearn.train.checkpoint import load_model

    if args.threads < 0:
        raise ConfigError("--threads must be >= 0 (0 = torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        if args.overrides:
            raise ConfigError(
                "model.* overrides apply to fresh models only; a checkpoint's model is fixed"
            )
        model, loaded = load_model(args.checkpoint, device=device)
        return ExperimentModel(model, loaded.tokenizer, f"{loaded.path}", False, device)
    cfg = fresh_model_config(args.model, args.overrides)
    tokenizer = ByteTokenizer()
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).eval()
    return ExperimentModel(model, tokenizer, f"{args.model} (fresh, byte tokenizer)", True, device)


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
