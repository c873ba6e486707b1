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

``nestlearn experiment test_time [--model NAME | --checkpoint DIR] [...]`` writes
``result.json``, ``results.md``, ``forgetting.png`` and ``state.safetensors`` to ``--out``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.errors import ConfigError
from nestlearn.eval.figures import save_figure
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
from nestlearn.experiments.model_source import (
    add_model_args,
    add_run_args,
    check_context,
    clone_state,
    model_from_args,
)
from nestlearn.experiments.seeds import resolve_seeds
from nestlearn.models.base import LanguageModel, State
from nestlearn.train.report import markdown_table

NAME = "test_time"
CONDITIONS = ("carry", "reset")
# CPU-minutes defaults (docs/experiments-continual.md): a small fresh model and one-letter keys.
DEFAULT_OVERRIDES = ("model.d_model=64", "model.n_layers=2", "model.n_heads=2")
KEY_LEN = 1
VALUE_DIGITS = 2
SUMMARY_KEYS = ("final_accuracy", "last_document_accuracy", "backward_transfer", "forgetting")
SUMMARY_HEADERS = ["final accuracy", "last document", "backward transfer", "forgetting"]


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
    add_model_args(parser, "gated_deltanet", DEFAULT_OVERRIDES)
    task = parser.add_argument_group("facts")
    task.add_argument("--docs", type=int, default=4, help="documents per episode")
    task.add_argument("--facts-per-doc", type=int, default=3)
    task.add_argument("--key-len", type=int, default=KEY_LEN, help="letters per key")
    task.add_argument("--value-digits", type=int, default=VALUE_DIGITS, help="digits per value")
    task.add_argument("--episodes", type=int, default=32, help="evaluation episodes")
    train = parser.add_argument_group("training on the fact task")
    train.add_argument("--train-steps", type=int, default=2000, help="0 = evaluate as is")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=3e-3)
    add_run_args(parser, f"runs/experiments/{NAME}")
    return parser


def main(argv: Sequence[str] = ()) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    resolve_seeds(args)
    for flag in ("docs", "facts_per_doc", "key_len", "value_digits", "episodes", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    if args.train_steps < 0:
        raise ConfigError("--train-steps must be >= 0")
    source = model_from_args(args)
    if args.docs * args.facts_per_doc > 26**args.key_len:
        raise ConfigError(
            f"--docs x --facts-per-doc = {args.docs * args.facts_per_doc} facts need distinct keys "
            f"but --key-len {args.key_len} gives {26**args.key_len}; use a longer --key-len"
        )
    probe = sample_episode(
        random.Random(0), args.docs, args.facts_per_doc, args.key_len, args.value_digits
    )
    check_streams(source.model, source.tokenizer, [probe], training=args.train_steps > 0)
    progress = not args.no_progress
    out = Path(args.out)
    losses = []
    if args.train_steps:
        losses = train_fact_recall(
            source.model,
            source.tokenizer,
            args.train_steps,
            args.batch_size,
            args.lr,
            args.docs,
            args.facts_per_doc,
            args.value_digits,
            args.seed,
            progress,
            args.key_len,
        )
    result = run_test_time(
        source.model,
        source.tokenizer,
        args.docs,
        args.facts_per_doc,
        args.episodes,
        args.value_digits,
        args.seed,
        out / "state.safetensors",
        progress,
        args.key_len,
    )
    tail = losses[-max(1, len(losses) // 10) :]
    record = {
        "model": source.name,
        "protocol": {
            "docs": args.docs,
            "facts_per_doc": args.facts_per_doc,
            "key_len": args.key_len,
            "value_digits": args.value_digits,
            "episodes": args.episodes,
            "train_steps": args.train_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
        },
        "train_final_loss": float(np.mean(tail)) if tail else None,
        **result,
    }
    plot_forgetting(record, out / "forgetting.png")
    carry, reset = (result["conditions"][c]["final_accuracy"] for c in CONDITIONS)
    rows = [
        [source.name, c, *(result["conditions"][c][k] for k in SUMMARY_KEYS)] for c in CONDITIONS
    ]
    write_result(
        out, NAME, args=vars(args), headers=["model", "condition", *SUMMARY_HEADERS], rows=rows,
        figures=["forgetting.png"], results=record, markdown=render_table(record),
    )  # fmt: skip
    print(
        f"{NAME}, {source.name}: final accuracy carry {carry:.3f} vs reset {reset:.3f} "
        f"(chance {result['chance_accuracy']:.3f}); results in {out}"
    )
    return 0


def render_table(record: dict[str, Any]) -> str:
    conditions = record["conditions"]
    D = len(conditions["carry"]["recall_matrix"])
    summary = markdown_table(
        ["condition", *SUMMARY_HEADERS],
        [[name, *(c[k] for k in SUMMARY_KEYS)] for name, c in conditions.items()],
    )
    by_age = markdown_table(
        ["condition", *[f"age {a}" for a in range(D)]],
        [[name, *c["final_accuracy_by_age"]] for name, c in conditions.items()],
    )
    return "\n".join(
        [
            f"# Test-time learning: {record['model']}\n",
            f"Chance: {record['chance_accuracy']:.4f}. Age = documents read since the fact.\n",
            summary,
            "Accuracy after the last document, by the age of the fact:\n",
            by_age,
        ]
    )


def plot_forgetting(record: dict[str, Any], path: Path) -> Path:
    """Accuracy by age after the last document, and the carried condition's matrix."""

    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        for i, (name, c) in enumerate(record["conditions"].items()):
            ages = range(len(c["final_accuracy_by_age"]))
            left.plot(ages, c["final_accuracy_by_age"], marker="o", color=f"C{i}", label=name)
        left.axhline(record["chance_accuracy"], color="grey", ls="--", lw=1, label="chance")
        left.set_xlabel("age of the fact (documents read since)")
        left.set_ylabel("recall accuracy")
        left.set_ylim(-0.02, 1.02)
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        A = np.array(record["conditions"]["carry"]["recall_matrix"], dtype=float)
        image = right.imshow(np.ma.masked_invalid(A), vmin=0, vmax=1, cmap="viridis")
        right.set_xlabel("facts of document d")
        right.set_ylabel("after reading document n")
        right.set_title("carry: A[n, d]", fontsize=9)
        fig.colorbar(image, ax=right, fraction=0.046)
        fig.suptitle(f"test-time learning: {record['model']}", fontsize=9)

    return save_figure(path, draw, (10, 4.2))
