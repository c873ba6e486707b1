"""Test-time learning / knowledge incorporation (SPEC §6): memories that keep learning across
documents, against memories reset per document, and the forgetting of earlier facts.

Protocol (``docs/experiments-continual.md``):

1. Training (skip with ``--train-steps 0``): the model learns the fact task of
   :mod:`nestlearn.experiments.facts`: episodes of 1..``n_docs`` documents followed by a query of
   every fact, loss on the answers only. Untrained tiny models cannot answer queries at all, so
   without this step the comparison would only measure chance.
2. Evaluation on fresh episodes (a seed stream disjoint from training), two conditions:

   - ``carry``: documents are read one after another, the decoding state (every layer's
     memory, or a Transformer's KV cache) carried from one to the next;
   - ``reset``: the state is reset before each document, so only the current one is known.

   After reading document ``n`` (``n = 0..D-1``) the facts of each document ``d <= n`` are
   queried as one chain (that document's facts in a seeded order) from a copy of the state:
   queries never change what later documents see, and the queries of one document never mix
   with those of another (a chain of mostly unknown facts would distort the known ones).
   ``A[n, d]`` is the share of document ``d``'s facts whose whole answer is the model's greedy
   prediction (teacher-forced).
3. Summaries per condition: final accuracy (mean of ``A[D-1, :]``), accuracy by age (how many
   documents ago a fact was read), and the continual metrics of ``A`` (backward transfer,
   forgetting). The carried state after the last document is saved with safetensors, restored,
   and queried again: the answers must be identical (``state_roundtrip_exact``).

``nestlearn experiment test_time [--models NAME ... | --model NAME | --checkpoint DIR]
[--seeds N] [--preset tiny|cpu] [...]`` compares fresh models (default: hope, hope_attention,
titans_lmm, gated_deltanet, transformer of about equal size), each seed one resumable unit
(:mod:`nestlearn.experiments.model_comparison`), and writes ``result.json``, ``results.md``,
``forgetting.png``, ``test_time.png`` and each unit's ``states/MODEL-seedS.safetensors`` to
``--out``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.errors import ConfigError
from nestlearn.eval.figures import plot_bars, plot_curves
from nestlearn.eval.results import write_result
from nestlearn.eval.synthetic import train_synthetic
from nestlearn.experiments.continual_metrics import continual_metrics
from nestlearn.experiments.facts import (
    Episode,
    answer_hits,
    chance_accuracy,
    document_batch,
    query_batch,
    sample_episode,
    training_batch,
)
from nestlearn.experiments.model_comparison import (
    DEFAULT_MODELS,
    ModelSpec,
    add_comparison_args,
    build,
    model_specs,
    parameter_count,
    parameter_counts,
    run_units,
    summary_over_seeds,
)
from nestlearn.experiments.model_source import (
    add_run_args,
    apply_preset,
    check_context,
    clone_state,
)
from nestlearn.experiments.seeds import format_spread, seeds_label
from nestlearn.models.base import LanguageModel, State
from nestlearn.train.report import markdown_table

NAME = "test_time"
CONDITIONS = ("carry", "reset")
# Small fresh models (d_model 64, 2 blocks, 2 heads; the tiny width trains ~5x slower) with the
# MLP / CMS widths that bring each to about 150k parameters (docs/experiments-continual.md).
DEFAULT_OVERRIDES = ("model.d_model=64", "model.n_layers=2", "model.n_heads=2")
MODEL_SIZES = {
    "hope_attention": ["model.cms_hidden=128"],
    "gated_deltanet": ["model.mlp_hidden=240"],
    "transformer": ["model.mlp_hidden=256"],
}
KEY_LEN = 1
VALUE_DIGITS = 2
SUMMARY_KEYS = ("final_accuracy", "last_document_accuracy", "backward_transfer", "forgetting")
SUMMARY_HEADERS = ["final accuracy", "last document", "backward transfer", "forgetting"]
FIGURES = ("forgetting.png", "test_time.png")
# The numbers result.json's summary holds per model (over seeds).
HEADLINE = (
    "carry_final_accuracy", "reset_final_accuracy", "carry_minus_reset",
    "carry_last_document_accuracy", "carry_forgetting", "train_final_loss",
)  # fmt: skip
# Defaults by scale. tiny: the protocol measured in docs/experiments-continual.md; cpu: the
# suite's (all default models x 3 seeds in about 13 CPU-minutes).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "docs": 4, "facts_per_doc": 3, "key_len": KEY_LEN, "value_digits": VALUE_DIGITS,
        "episodes": 32, "train_steps": 2000, "batch_size": 16, "lr": 3e-3,
        "default_overrides": list(DEFAULT_OVERRIDES), "model_sizes": MODEL_SIZES,
    },
    "cpu": {
        "docs": 3, "facts_per_doc": 2, "key_len": KEY_LEN, "value_digits": VALUE_DIGITS,
        "episodes": 32, "train_steps": 700, "batch_size": 4, "lr": 3e-3,
        "default_overrides": list(DEFAULT_OVERRIDES), "model_sizes": MODEL_SIZES, "n_seeds": 3,
    },
}  # fmt: skip


def train_fact_recall(
    model: LanguageModel,
    tokenizer: Tokenizer,
    steps: int,
    batch_size: int,
    lr: float,
    n_docs: int,
    facts_per_doc: int,
    value_digits: int = 2,
    seed: int = 0,
    progress: bool = False,
    key_len: int = 2,
) -> list[float]:
    """Train on whole episodes (1..``n_docs`` documents, one count per batch); returns the
    losses. AdamW without weight decay, linear warmup over the first 10% of the steps, then
    cosine to 10% of ``lr``, gradient clipping 1 (:func:`nestlearn.eval.synthetic.train_synthetic`).
    """
    device = next(model.parameters()).device
    rng = random.Random(f"train-{seed}")

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        docs = rng.randint(1, n_docs)
        episodes = [
            sample_episode(rng, docs, facts_per_doc, key_len, value_digits)
            for _ in range(batch_size)
        ]
        return training_batch(tokenizer, episodes, rng, device)

    return train_synthetic(
        model, sample, steps=steps, lr=lr, weight_decay=0.0, warmup=steps // 10, device=device,
        desc="train", progress=progress,
    )  # fmt: skip


@torch.no_grad()
def recall(
    model: LanguageModel,
    tokenizer: Tokenizer,
    episodes: Sequence[Episode],
    order: Sequence[tuple[int, int]],
    state: State,
) -> torch.Tensor:
    """``[B, K]`` bool: which queried facts ``order[k] = (d, f)`` each episode answers exactly,
    reading the query chain from a copy of ``state`` (``state`` itself is never changed)."""
    device = next(model.parameters()).device
    tokens, owner = query_batch(tokenizer, episodes, order, device)
    logits, _ = model(tokens, clone_state(state))
    return answer_hits(logits, tokens, owner)


def query_order(docs: Sequence[int], n_facts: int, seed: int, stage: int) -> list[tuple[int, int]]:
    """The facts ``(d, f)`` of documents ``docs`` in the seeded order queried at ``stage``."""
    facts = [(d, f) for d in docs for f in range(n_facts)]
    return random.Random(f"order-{seed}-{stage}-{list(docs)}").sample(facts, len(facts))


@torch.no_grad()
def recall_matrix(
    model: LanguageModel,
    tokenizer: Tokenizer,
    episodes: Sequence[Episode],
    carry: bool,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, State]:
    """``A[n, d]`` of the module docstring for one condition, and the final state."""
    device = next(model.parameters()).device
    D, n_facts = len(episodes[0]), len(episodes[0][0])
    A = np.full((D, D), np.nan)
    state = model.init_state(len(episodes), device)
    bar = tqdm(range(D), desc="carry" if carry else "reset", disable=not progress)
    for n in bar:
        if not carry:
            state = model.init_state(len(episodes), device)
        _, state = model(document_batch(tokenizer, episodes, n, device), state)
        for d in range(n + 1):
            order = query_order([d], n_facts, seed, n)
            A[n, d] = float(recall(model, tokenizer, episodes, order, state).float().mean())
    return A, state


def stream_lengths(tokenizer: Tokenizer, episodes: Sequence[Episode]) -> dict[str, int]:
    """Tokens a model must hold: a training episode (every document, then a query of every fact),
    and the last query of each condition (carry: every document; reset: one; then the chain of
    one document's facts)."""
    D, n_facts = len(episodes[0]), len(episodes[0][0])
    docs = [document_batch(tokenizer, episodes, d).shape[1] for d in range(D)]

    def chain(which: Sequence[int]) -> int:
        return query_batch(tokenizer, episodes, query_order(which, n_facts, 0, 0))[0].shape[1]

    per_doc = max(chain([d]) for d in range(D))
    return {
        "a training episode": sum(docs) + chain(range(D)),
        "the carried document stream with its queries": sum(docs) + per_doc,
        "the longest document with its queries": max(docs) + per_doc,
    }


def check_streams(
    model: LanguageModel, tokenizer: Tokenizer, episodes: Sequence[Episode], training: bool
) -> None:
    """Refuse, before any work, streams an attention model cannot hold."""
    for what, n_tokens in stream_lengths(tokenizer, episodes).items():
        if training or what != "a training episode":
            check_context(model, n_tokens, what, "use fewer --docs or --facts-per-doc")


def state_roundtrip(
    model: LanguageModel,
    tokenizer: Tokenizer,
    episodes: Sequence[Episode],
    state: State,
    path: Path,
) -> bool:
    """Save ``state`` with safetensors, load it back, and compare the answers to every fact
    (queried document by document, as in :func:`recall_matrix`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    device = next(model.parameters()).device
    restored = safetensors.torch.load_file(str(path), device=str(device))
    for d in range(len(episodes[0])):
        order = query_order([d], len(episodes[0][0]), 0, -1)
        before = recall(model, tokenizer, episodes, order, state)
        if not torch.equal(before, recall(model, tokenizer, episodes, order, restored)):
            return False
    return True


def summarize(A: np.ndarray) -> dict[str, Any]:
    D = A.shape[0]
    return {
        "final_accuracy": float(A[-1].mean()),
        "last_document_accuracy": float(A[-1, -1]),
        # Age a = documents read since the fact's document: A[D-1, D-1-a].
        "final_accuracy_by_age": [float(A[-1, D - 1 - a]) for a in range(D)],
        **{k: v for k, v in continual_metrics(A).items() if k != "average_accuracy"},
    }


def run_test_time(
    model: LanguageModel,
    tokenizer: Tokenizer,
    n_docs: int,
    facts_per_doc: int,
    episodes: int,
    value_digits: int = 2,
    seed: int = 0,
    state_path: Path | None = None,
    progress: bool = False,
    key_len: int = 2,
) -> dict[str, Any]:
    """Evaluate both conditions on ``episodes`` fresh episodes (step 2 and 3 of the protocol)."""
    rng = random.Random(f"eval-{seed}")
    eps = [
        sample_episode(rng, n_docs, facts_per_doc, key_len, value_digits) for _ in range(episodes)
    ]
    check_streams(model, tokenizer, eps, training=False)
    result: dict[str, Any] = {"chance_accuracy": chance_accuracy(value_digits), "conditions": {}}
    model.eval()
    for condition in CONDITIONS:
        A, state = recall_matrix(model, tokenizer, eps, condition == "carry", seed, progress)
        result["conditions"][condition] = {"recall_matrix": A.tolist(), **summarize(A)}
        if condition == "carry" and state_path is not None:
            result["state_roundtrip_exact"] = state_roundtrip(
                model, tokenizer, eps, state, state_path
            )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"nestlearn experiment {NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_comparison_args(parser, DEFAULT_MODELS)
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale of the defaults below: tiny (4 documents x 3 facts, 2,000 training steps, "
        "one seed) or cpu (the suite's: 3 x 2 facts, 3 seeds); any flag given overrides it",
    )  # fmt: skip
    task = parser.add_argument_group("facts")
    task.add_argument("--docs", type=int, help="documents per episode (tiny: 4)")
    task.add_argument("--facts-per-doc", type=int, help="tiny: 3")
    task.add_argument("--key-len", type=int, help=f"letters per key (tiny: {KEY_LEN})")
    task.add_argument("--value-digits", type=int, help=f"digits per value (tiny: {VALUE_DIGITS})")
    task.add_argument("--episodes", type=int, help="evaluation episodes (tiny: 32)")
    train = parser.add_argument_group("training on the fact task")
    train.add_argument("--train-steps", type=int, help="0 = evaluate as is (tiny: 2000)")
    train.add_argument("--batch-size", type=int, help="tiny: 16")
    train.add_argument("--lr", type=float, help="tiny: 3e-3")
    add_run_args(parser, f"runs/experiments/{NAME}")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad sizes before any work."""
    for flag in ("docs", "facts_per_doc", "key_len", "value_digits", "episodes", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    if args.train_steps < 0:
        raise ConfigError("--train-steps must be >= 0")
    if args.docs * args.facts_per_doc > 26**args.key_len:
        raise ConfigError(
            f"--docs x --facts-per-doc = {args.docs * args.facts_per_doc} facts need distinct keys "
            f"but --key-len {args.key_len} gives {26**args.key_len}; use a longer --key-len"
        )


def run_one(args: argparse.Namespace, spec: ModelSpec, seed: int) -> dict[str, Any]:
    """One unit: spec's model (initialised from ``seed``) trained on the fact task with training
    stream ``seed``, then evaluated on the evaluation stream ``seed``."""
    source = build(spec, args, seed)
    probe = sample_episode(
        random.Random(0), args.docs, args.facts_per_doc, args.key_len, args.value_digits
    )
    check_streams(source.model, source.tokenizer, [probe], training=args.train_steps > 0)
    progress = not args.no_progress
    losses = []
    if args.train_steps:
        losses = train_fact_recall(
            source.model, source.tokenizer, args.train_steps, args.batch_size, args.lr,
            args.docs, args.facts_per_doc, args.value_digits, seed, progress, args.key_len,
        )  # fmt: skip
    state_path = Path(args.out) / "states" / f"{spec.key}-seed{seed}.safetensors"
    result = run_test_time(
        source.model, source.tokenizer, args.docs, args.facts_per_doc, args.episodes,
        args.value_digits, seed, state_path, progress, args.key_len,
    )  # fmt: skip
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "source": source.name,
        "parameters": parameter_count(source),
        "protocol": {
            "docs": args.docs,
            "facts_per_doc": args.facts_per_doc,
            "key_len": args.key_len,
            "value_digits": args.value_digits,
            "episodes": args.episodes,
            "train_steps": args.train_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": seed,
        },
        "train_final_loss": float(np.mean(tail)) if tail else None,
        **result,
    }


def unit_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """A seed's headline numbers: per condition its summaries and accuracy by age, the gain of
    carrying the state (``carry_minus_reset``, final accuracy) and the final training loss."""
    numbers: dict[str, float | None] = {"train_final_loss": record.get("train_final_loss")}
    for name, c in record["conditions"].items():
        numbers.update({f"{name}_{k}": c[k] for k in SUMMARY_KEYS})
        numbers.update({f"{name}_age{a}": v for a, v in enumerate(c["final_accuracy_by_age"])})
    numbers["carry_minus_reset"] = (
        record["conditions"]["carry"]["final_accuracy"]
        - record["conditions"]["reset"]["final_accuracy"]
    )
    return numbers


def main(argv: Sequence[str] = ()) -> int:
    args = apply_preset(build_parser().parse_intermixed_args(list(argv)), PRESETS)
    check_args(args)
    specs = model_specs(args)
    records = run_units(args, specs, lambda spec, seed: run_one(args, spec, seed), NAME)
    keys = [
        *(f"{c}_{k}" for c in CONDITIONS for k in SUMMARY_KEYS),
        *(f"{c}_age{a}" for c in CONDITIONS for a in range(args.docs)),
        "carry_minus_reset",
        "train_final_loss",
    ]
    stats = summary_over_seeds(records, specs, unit_metrics, keys)
    # result.json's summary: the headline numbers; the rest goes to tables and figures.
    summary = {label: {k: s[k] for k in HEADLINE} for label, s in stats.items()}
    sizes = parameter_counts(records, specs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chance = chance_accuracy(args.value_digits)
    plot_comparison(stats, args.docs, chance, out, seeds_label(args.seeds))
    headers = ["model", "parameters", "condition", *SUMMARY_HEADERS, "seeds"]
    rows = [
        [label, sizes[label], c, *(format_spread(s[f"{c}_{k}"]) for k in SUMMARY_KEYS),
         s[f"{c}_final_accuracy"]["n"]]
        for label, s in stats.items()
        for c in CONDITIONS
    ]  # fmt: skip
    write_result(
        out, NAME, args=vars(args), headers=headers, rows=rows, figures=list(FIGURES),
        results=records, markdown=render_table(args, stats, headers, rows, chance),
        summary=summary,
    )  # fmt: skip
    for label, s in summary.items():
        print(
            f"{NAME}, {label}: final accuracy carry {format_spread(s['carry_final_accuracy'])} "
            f"vs reset {format_spread(s['reset_final_accuracy'])} (chance {chance:.3f})"
        )
    print(f"results in {out}")
    return 0


def render_table(
    args: argparse.Namespace,
    summary: Mapping[str, Mapping[str, Any]],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    chance: float,
) -> str:
    """The summaries per model and condition, and accuracy by age (mean ± std over seeds)."""
    by_age = markdown_table(
        ["model", "condition", *[f"age {a}" for a in range(args.docs)]],
        [
            [label, c, *(format_spread(s[f"{c}_age{a}"]) for a in range(args.docs))]
            for label, s in summary.items()
            for c in CONDITIONS
        ],
    )
    gain = markdown_table(
        ["model", "carry - reset (final accuracy)", "final training loss"],
        [
            [label, format_spread(s["carry_minus_reset"]), format_spread(s["train_final_loss"])]
            for label, s in summary.items()
        ],
    )
    return "\n".join(
        [
            f"# Test-time learning: {seeds_label(args.seeds)}\n",
            f"Chance: {chance:.4f}. Age = documents read since the fact. Mean ± sample standard "
            "deviation over seeds; `parameters`: the fresh model's count.\n",
            markdown_table(list(headers), [["—" if v is None else v for v in r] for r in rows]),
            "What carrying the state adds, and how well the task was learned:\n",
            gain,
            "Accuracy after the last document, by the age of the fact:\n",
            by_age,
        ]
    )


def plot_comparison(
    summary: Mapping[str, Mapping[str, Any]], docs: int, chance: float, out: Path, seeds: str
) -> None:
    """``forgetting.png``: accuracy after the last document by the age of the fact, one panel
    per condition; ``test_time.png``: final accuracy carry and reset per model. Bands and error
    bars: ± the standard deviation over seeds."""
    ages = list(range(docs))
    panels = {
        c: {label: (ages, [s[f"{c}_age{a}"]["mean"] for a in ages]) for label, s in summary.items()}
        for c in CONDITIONS
    }
    errors = {
        c: {label: [s[f"{c}_age{a}"]["std"] for a in ages] for label, s in summary.items()}
        for c in CONDITIONS
    }
    plot_curves(
        panels, out / FIGURES[0], xlabel="age of the fact (documents read since)",
        ylabel="recall accuracy", title=f"test-time learning ({seeds})", baseline=chance,
        errors=errors,
    )  # fmt: skip
    plot_bars(
        {label: {c: s[f"{c}_final_accuracy"]["mean"] for c in CONDITIONS}
         for label, s in summary.items()},
        out / FIGURES[1], ylabel="final accuracy (all documents)",
        title=f"carry vs reset ({seeds})",
        errors={label: {c: s[f"{c}_final_accuracy"]["std"] for c in CONDITIONS}
                for label, s in summary.items()},
    )  # fmt: skip
