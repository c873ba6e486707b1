"""Language models trained on one token stream and scored: shared by ``perplexity`` and
``ablations``.

A run is one (model, seed): a named config (``tiny``) or an architecture trained from a base
config (``debug``) with ``model.*`` overrides, into ``OUT/runs/NAME/seedK``. Every run of an
experiment sees the same data, tokenizer, batches and budget (the batch of step ``s`` is a pure
function of ``(train.seed, s)``, :mod:`nestlearn.train.trainer`), so runs differ only in the
model. :func:`train_run` is resumable: a run folder whose newest checkpoint is at
``train.steps`` is reused as it is, an unfinished one is resumed from its checkpoint (exactly, as
``nestlearn train --resume``), a folder without a checkpoint is started afresh.

Scores (SPEC §6): the validation curve (loss, perplexity and bits per byte at every
``train.eval_every`` step, from the run's ``metrics.jsonl``), and the text scores of
:func:`score_text`. Perplexity ``exp(mean NLL per token)``; bits per byte ``Σ NLL / (ln 2 ·
Σ bytes)``, comparable across tokenizers. The out-of-domain text is :func:`ood_text`: the English
prose of the Python documentation's topic pages (``pydoc_data.topics``, shipped with every
CPython), against a training corpus of Python source.

Equal parameter counts: :func:`equalize_widths` picks, per model, the MLP width (``mlp_hidden``;
``cms_hidden`` for HOPE models, per CMS level) whose parameter count is nearest a target.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nestlearn.config import load_config, named_configs, parse_overrides
from nestlearn.config.loader import to_dict
from nestlearn.config.schema import RunConfig
from nestlearn.errors import (
    ConfigError,
    NonFiniteLossError,
    NonFiniteMemoryError,
    SequenceTooLongError,
)
from nestlearn.eval.streaming import stream_perplexity
from nestlearn.eval.text import eval_tokens
from nestlearn.models.registry import available_models, build_model, model_config_class
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import load_model
from nestlearn.train.checkpoint_folders import list_checkpoints
from nestlearn.train.metrics import read_metrics
from nestlearn.train.runtime import resolve_device

# The field that sets each model family's MLP width (the knob that equalizes parameter counts).
WIDTH_FIELDS = ("cms_hidden", "mlp_hidden")
DIVERGED = (NonFiniteLossError, NonFiniteMemoryError)
# The headline numbers of a run (summary of perplexity and ablations).
METRICS = ("val_ppl", "val_bpb", "ood_ppl", "ood_bpb")


def is_architecture(name: str) -> bool:
    """True if ``name`` is a registered architecture rather than a named config or a file."""
    return name not in named_configs() and not Path(name).suffix


def run_config(
    name: str,
    *,
    base: str,
    seed: int,
    steps: int,
    run_dir: Path,
    sets: Sequence[str] = (),
    model: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
    progress: bool = False,
    device: str = "auto",
) -> RunConfig:
    """The config of run ``name`` (a named config, or an architecture on ``base``): ``sets``
    (``section.key=value``) for every run, then ``model`` / ``train`` overrides of this run."""
    overrides = parse_overrides(list(sets))
    if is_architecture(name):
        if name not in available_models():
            raise ConfigError(
                f"--models {name}: neither a named config nor an architecture; architectures: "
                f"{', '.join(available_models())}"
            )
        overrides.setdefault("model", {})["name"] = name
        config = base
    else:
        config = name
    overrides.setdefault("model", {}).update(model or {})
    section = overrides.setdefault("train", {})
    for key, value in (train or {}).items():  # defaults of this experiment: --set wins
        section.setdefault(key, value)
    section.update(out_dir=str(run_dir), steps=steps, seed=seed)
    section.setdefault("progress", progress)
    section.setdefault("device", device)
    return load_config(config, {**overrides, "name": Path(name).stem})


def train_run(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.train.out_dir``, reusing a finished run and resuming an
    unfinished one; ``{"step", "tokens_seen", "train_seconds", "n_params", "resumed",
    "already_finished"}``. A run that diverges raises (:data:`DIVERGED`)."""
    run_dir = Path(cfg.train.out_dir)
    if list_checkpoints(run_dir) and same_run(run_dir, cfg):
        trainer = Trainer.from_checkpoint(run_dir, _loop_overrides(cfg))
        resumed = True
    else:
        # Killed before its first checkpoint, or trained with other settings: nothing to keep.
        if run_dir.exists():
            shutil.rmtree(run_dir)
        trainer = Trainer(cfg)
        resumed = False
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_seconds": result.train_seconds,
        "n_params": result.n_params,
        "resumed": resumed,
        "already_finished": bool(result.extra.get("already_finished")),
    }


# Settings that do not change what a run computes (where it lives, display, device).
NEUTRAL_TRAIN = ("out_dir", "progress", "device")


def same_run(run_dir: Path, cfg: RunConfig) -> bool:
    """True if the run folder's saved ``config.yaml`` is ``cfg`` up to :data:`NEUTRAL_TRAIN`
    and the vocabulary taken from the tokenizer."""
    try:
        saved = to_dict(load_config(str(Path(run_dir) / "config.yaml")))
    except (OSError, ValueError, ConfigError):
        return False
    wanted = to_dict(cfg)
    for config in (saved, wanted):
        for key in NEUTRAL_TRAIN:
            config["train"].pop(key, None)
        config["model"].pop("vocab_size", None)
    return saved == wanted


def _loop_overrides(cfg: RunConfig) -> dict[str, Any]:
    """What a resume may change: the loop's display and device (model and data are fixed)."""
    return {"train": {"progress": cfg.train.progress, "device": cfg.train.device}}


def eval_curve(run_dir: Path) -> list[dict[str, float]]:
    """The run's validation points ``{"step", "tokens", "loss", "ppl", "bpb"}``, in step order
    (one per ``train.eval_every`` steps and the final one)."""
    points = {}
    for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if record.get("kind") == "eval":
            points[int(record["step"])] = {k: record[k] for k in ("step", "tokens", "loss",
                                                                  "ppl", "bpb")}  # fmt: skip
    return [points[s] for s in sorted(points)]


def ood_text(max_chars: int = 0) -> tuple[str, str]:
    """``(text, label)``: the prose of ``pydoc_data.topics`` (the language reference's topic
    pages, plain English text shipped with CPython), topics in sorted order, joined by blank
    lines; the first ``max_chars`` characters (0 = all)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise ConfigError(
            "the out-of-domain text needs pydoc_data.topics, which this Python lacks; "
            "give --ood-source FILE (any English text) instead"
        ) from exc
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return (text[:max_chars] if max_chars else text), "pydoc_data.topics (Python docs prose)"


def score_text(
    model: torch.nn.Module,
    tokens: Sequence[int],
    token_bytes: Any,
    *,
    window: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    mode: str = "chunks",
) -> dict[str, float | None]:
    """``{"loss", "ppl", "bpb", "tokens"}`` of ``tokens`` (:func:`stream_perplexity`); all None
    (with ``"skipped"``) when the model cannot score them (too long, non-finite)."""
    try:
        return stream_perplexity(
            model, tokens, token_bytes, mode, window=window, stride=window, chunk=window,
            batch_size=batch_size, device=device,
        )  # fmt: skip
    except (SequenceTooLongError, NonFiniteLossError) as exc:
        return {"loss": None, "ppl": None, "bpb": None, "tokens": None, "skipped": str(exc)}


def parameter_count(cfg_model: Any, vocab_size: int = 257) -> int:
    """Parameters of the model ``cfg_model`` describes (built on the meta device: no memory);
    ``vocab_size`` where the config takes it from the tokenizer (0; 257 = the byte tokenizer)."""
    if not cfg_model.vocab_size:
        cfg_model = dataclasses.replace(cfg_model, vocab_size=vocab_size)
    with torch.device("meta"):
        model = build_model(cfg_model)
    return sum(p.numel() for p in model.parameters())


def width_field(model_name: str) -> str | None:
    """The MLP-width field of ``model_name``'s config (:data:`WIDTH_FIELDS`), if any."""
    fields = {f.name for f in dataclasses.fields(model_config_class(model_name))}
    return next((f for f in WIDTH_FIELDS if f in fields), None)


def equalize_widths(
    configs: Mapping[str, RunConfig], target: int, multiple: int = 8
) -> dict[str, dict[str, int]]:
    """Per run, ``{width_field: width}`` whose parameter count is nearest ``target`` (the count
    is affine in the MLP width: solved from two widths, rounded to ``multiple``; at least
    ``multiple``). A run that already sets its width, or whose model has none, is left as is."""
    chosen: dict[str, dict[str, int]] = {}
    for name, cfg in configs.items():
        field = width_field(cfg.model.name)
        if field is None or getattr(cfg.model, field):
            continue
        a, b = 32, 64
        counts = [parameter_count(dataclasses.replace(cfg.model, **{field: w})) for w in (a, b)]
        slope = (counts[1] - counts[0]) / (b - a)
        width = a + (target - counts[0]) / slope if slope > 0 else a
        chosen[name] = {field: max(multiple, multiple * round(width / multiple))}
    return chosen


def train_and_score(
    args: argparse.Namespace, cfg: RunConfig, label: str, seed: int
) -> dict[str, Any]:
    """Train (or reuse / resume, :func:`train_run`) run ``cfg``, then score it
    (:func:`score_run`): a unit's record, with the CPU seconds both took. A run that diverges
    is a record with ``failed`` and no scores."""
    start = time.process_time()
    try:
        trained = train_run(cfg)
    except DIVERGED as exc:
        print(f"{label} seed {seed}: training failed ({exc})")
        return {"model": label, "seed": seed, "failed": str(exc), **dict.fromkeys(METRICS)}
    device = resolve_device(args.device)
    record = score_run(args, Path(cfg.train.out_dir), label, seed=seed, device=device)
    record.update(trained=trained, cpu_seconds=time.process_time() - start)
    return record


def score_run(
    args: argparse.Namespace, path: Path, label: str, *, seed: int | None, device: Any
) -> dict[str, Any]:
    """Scores of the run folder ``path``: the validation curve; ``args.modes`` on the held-out
    text (``args.source`` or the run's validation split, first ``args.max_tokens`` + 1 tokens);
    the headline ``val_*`` (chunks of the run's window) and ``ood_*`` (:func:`ood_text` or
    ``args.ood_source``, chunks). ``args``: the scoring flags of ``perplexity``."""
    model, loaded = load_model(path, device=device)
    tokens, source = eval_tokens(loaded.config, loaded.tokenizer, args.source)
    if args.max_tokens > 0:
        tokens = tokens[: args.max_tokens + 1]
    window = args.window or loaded.config.eval.seq_len or loaded.config.train.seq_len
    stride = args.stride or max(1, window // 2)
    token_bytes = loaded.tokenizer.token_byte_lengths()
    record: dict[str, Any] = {
        "model": label, "seed": seed, "step": loaded.step, "source": source,
        "params": sum(p.numel() for p in model.parameters()),
        "curve": eval_curve(path), "modes": {},
    }  # fmt: skip
    for mode in args.modes:
        row: dict[str, Any] = {
            "window": None if mode == "streaming" else window,
            "stride": {"chunks": window, "sliding": stride}.get(mode),
        }
        try:
            row.update(
                stream_perplexity(
                    model,
                    tokens,
                    token_bytes,
                    mode,
                    window=window,
                    stride=stride,
                    chunk=args.chunk,
                    batch_size=args.batch_size,
                    device=device,
                    progress=not args.no_progress,
                )
            )
        except (SequenceTooLongError, NonFiniteLossError) as exc:
            print(f"{label} {mode}: not run ({exc})")
            row.update(loss=None, ppl=None, bpb=None, tokens=None, skipped=str(exc))
        record["modes"][mode] = row
    held_out = record["modes"].get("chunks") or score_text(
        model, tokens, token_bytes, window=window, batch_size=args.batch_size, device=device
    )
    ood, ood_label = ood_tokens(args, loaded.tokenizer)
    far = score_text(
        model, ood, token_bytes, window=window, batch_size=args.batch_size, device=device
    )
    record.update(val_ppl=held_out["ppl"], val_bpb=held_out["bpb"], ood_ppl=far["ppl"],
                  ood_bpb=far["bpb"], ood_source=ood_label, ood_tokens=far["tokens"])  # fmt: skip
    return record


def ood_tokens(args: argparse.Namespace, tokenizer) -> tuple[list[int], str]:
    """The out-of-domain text's tokens (eos first, as every training document), capped at
    ``args.max_tokens`` + 1."""
    if args.ood_source:
        path = Path(args.ood_source)
        if not path.is_file():
            raise ConfigError(f"--ood-source {path} does not exist; give a text file")
        text, label = path.read_text(encoding="utf-8", errors="replace"), str(path)
    else:
        text, label = ood_text(max_chars=8 * args.max_tokens)  # tokens of <= 8 chars; 0 = all
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    if args.max_tokens > 0:
        ids = ids[: args.max_tokens + 1]
    return ids, label
