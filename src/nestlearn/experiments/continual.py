"""Continual learning: class-incremental text classification (SPEC §6; the paper's CLINC150,
Banking77 and DBpedia setting).

Protocol (``docs/experiments-continual.md``): the classes of a data set are put in a seeded order
and cut into ``T`` tasks of ``K`` classes. The model is fine-tuned on task 0, then task 1, ...
(only the current task's training examples, no replay); classification scores every class name
as a continuation of the prompt (:mod:`nestlearn.experiments.label_scoring`). After task ``i`` it
is tested on the test examples of every task ``j <= i``, choosing among all classes seen so far
(class-incremental: no task id at test time), giving ``R[i, j]``; average accuracy, backward
transfer, forgetting and average incremental accuracy follow
(:mod:`nestlearn.experiments.continual_metrics`).

``nestlearn experiment continual [--data stdlib|clinc150|banking77|dbpedia] [--model NAME |
--checkpoint DIR] [...]`` writes ``result.json``, ``results.md`` and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from nestlearn.config.schema import OptimConfig
from nestlearn.data.classification import (
    DATASETS,
    ClassificationData,
    LabelledText,
    load_classification,
    per_class,
)
from nestlearn.data.corpus import stable_hash
from nestlearn.errors import ConfigError
from nestlearn.eval.figures import save_figure
from nestlearn.eval.results import write_result
from nestlearn.experiments.continual_metrics import continual_metrics
from nestlearn.experiments.label_scoring import LabelScorer
from nestlearn.experiments.model_source import add_model_args, add_run_args, model_from_args
from nestlearn.experiments.seeds import resolve_seeds
from nestlearn.train.optim import build_optimizer
from nestlearn.train.report import markdown_table

NAME = "continual"
# Tasks x classes per task, per data set (CLINC150: 150 intents; Banking77: 77; DBpedia: 14).
METRIC_KEYS = (
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "average_incremental_accuracy",
)
METRIC_HEADERS = ["average accuracy", "backward transfer", "forgetting", "avg incremental accuracy"]
DEFAULT_SPLITS = {"stdlib": (5, 4), "clinc150": (15, 10), "banking77": (7, 11), "dbpedia": (7, 2)}


@dataclass
class Task:
    index: int
    classes: list[str]
    train: list[LabelledText]
    test: list[LabelledText]


class Learner(Protocol):
    """What the protocol needs from a classifier that learns."""

    def learn(self, task: Task) -> dict[str, float]:
        """Train on ``task.train``; return statistics to record (e.g. the final loss)."""

    def predict(self, texts: Sequence[str], labels: Sequence[str]) -> list[int]:
        """Index into ``labels`` of each text's predicted class."""


def make_tasks(
    data: ClassificationData,
    n_tasks: int,
    classes_per_task: int,
    train_per_class: int = 0,
    test_per_class: int = 0,
    seed: int = 0,
) -> list[Task]:
    """Cut the classes (in a seeded order) into tasks; ``*_per_class`` caps (0 = all) keep a
    seeded sample of each class's examples."""
    if n_tasks <= 0 or classes_per_task <= 0:
        raise ConfigError("--tasks and --classes-per-task must be > 0")
    train, test = per_class(data.train), per_class(data.test)
    labels = [c for c in data.labels if c in test]
    need = n_tasks * classes_per_task
    if need > len(labels):
        raise ConfigError(
            f"{n_tasks} tasks x {classes_per_task} classes need {need} classes but {data.name} "
            f"has {len(labels)} with test examples; lower --tasks or --classes-per-task"
        )
    labels = sorted(labels, key=lambda c: stable_hash(c, seed))[:need]

    def sample(examples: list[LabelledText], cap: int) -> list[LabelledText]:
        ordered = sorted(examples, key=lambda e: stable_hash(e.text, seed))
        return ordered[:cap] if cap > 0 else ordered

    tasks = []
    for t in range(n_tasks):
        classes = labels[t * classes_per_task : (t + 1) * classes_per_task]
        tasks.append(
            Task(
                t,
                classes,
                [e for c in classes for e in sample(train[c], train_per_class)],
                [e for c in classes for e in sample(test[c], test_per_class)],
            )
        )
    return tasks


def accuracy(learner: Learner, examples: Sequence[LabelledText], labels: Sequence[str]) -> float:
    """Share of ``examples`` whose predicted class (among ``labels``) is their label."""
    if not examples:
        raise ValueError("no test examples to score")
    preds = learner.predict([e.text for e in examples], labels)
    return float(np.mean([labels[p] == e.label for p, e in zip(preds, examples, strict=True)]))


def run_continual(
    learner: Learner, tasks: Sequence[Task], progress: bool = False
) -> dict[str, Any]:
    """The protocol of the module docstring; returns ``R``, the metrics and per-task stats."""
    T = len(tasks)
    R = np.full((T, T), np.nan)
    seen: list[str] = []
    stats = []
    bar = tqdm(total=T, desc="tasks", unit="task", disable=not progress)
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        stats.append(learner.learn(task))
        seen += task.classes
        for j in range(i + 1):
            R[i, j] = accuracy(learner, tasks[j].test, seen)
        stats[-1]["seconds"] = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(acc=f"{np.nanmean(R[i]):.3f}")
    bar.close()
    return {"accuracy_matrix": R, "metrics": continual_metrics(R), "task_stats": stats}


class LMLearner:
    """Fine-tunes a language model on each task with AdamW (one optimizer for the whole run)."""

    def __init__(
        self,
        scorer: LabelScorer,
        steps_per_task: int,
        batch_size: int,
        lr: float,
        seed: int = 0,
        eval_batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        self.scorer = scorer
        self.steps_per_task = steps_per_task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.optimizer = build_optimizer(scorer.model, OptimConfig(lr=lr, weight_decay=0.0))
        self.generator = torch.Generator().manual_seed(seed)

    def learn(self, task: Task) -> dict[str, float]:
        model = self.scorer.model
        model.train()
        losses = []
        bar = tqdm(
            range(self.steps_per_task),
            desc=f"task {task.index}",
            leave=False,
            disable=not self.progress,
        )
        for _ in bar:
            idx = torch.randint(len(task.train), (self.batch_size,), generator=self.generator)
            batch = [task.train[i] for i in idx.tolist()]
            loss = self.scorer.loss([e.text for e in batch], [e.label for e in batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        tail = losses[-max(1, len(losses) // 5) :] if losses else [float("nan")]
        return {"final_loss": float(np.mean(tail)), "steps": len(losses)}

    def predict(self, texts: Sequence[str], labels: Sequence[str]) -> list[int]:
        return self.scorer.predict(texts, labels, self.eval_batch_size)


def load_data(args: argparse.Namespace, n_classes: int) -> ClassificationData:
    if args.data != "stdlib":
        return load_classification(args.data, args.data_path)
    if args.data_path:
        raise ConfigError("--data stdlib is built from this Python; it takes no --data-path")
    if args.train_per_class <= 0 or args.test_per_class <= 0:
        raise ConfigError("--data stdlib needs --train-per-class and --test-per-class > 0")
    from nestlearn.experiments.stdlib_topics import stdlib_classification

    return stdlib_classification(
        n_classes, args.train_per_class, args.test_per_class, seed=args.seed
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"nestlearn experiment {NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="stdlib", choices=("stdlib", *DATASETS))
    data.add_argument("--data-path", help="local file/folder of the data set (default: HF cache)")
    data.add_argument("--tasks", type=int, help="number of tasks (default: per data set)")
    data.add_argument("--classes-per-task", type=int, help="classes per task (default: per set)")
    data.add_argument("--train-per-class", type=int, default=24, help="0 = all")
    data.add_argument("--test-per-class", type=int, default=12, help="0 = all")
    run = parser.add_argument_group("protocol")
    run.add_argument("--steps-per-task", type=int, default=60)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--prompt-len", type=int, default=96, help="tokens per prompt")
    run.add_argument("--eval-batch-size", type=int, default=32)
    add_run_args(parser, f"runs/experiments/{NAME}")
    return parser


def main(argv: Sequence[str] = ()) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    resolve_seeds(args)
    n_tasks, per_task = DEFAULT_SPLITS[args.data]
    n_tasks = args.tasks or n_tasks
    per_task = args.classes_per_task or per_task
    for flag in ("steps_per_task", "batch_size", "prompt_len", "eval_batch_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    data = load_data(args, n_tasks * per_task)
    source = model_from_args(args)
    tasks = make_tasks(
        data, n_tasks, per_task, args.train_per_class, args.test_per_class, args.seed
    )
    scorer = LabelScorer(source.model, source.tokenizer, args.prompt_len)
    scorer.check_fits([c for t in tasks for c in t.classes])
    progress = not args.no_progress
    learner = LMLearner(
        scorer,
        args.steps_per_task,
        args.batch_size,
        args.lr,
        args.seed,
        args.eval_batch_size,
        progress,
    )
    result = run_continual(learner, tasks, progress=progress)
    record = {
        "model": source.name,
        "data": args.data,
        "protocol": {
            "tasks": n_tasks,
            "classes_per_task": per_task,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "steps_per_task": args.steps_per_task,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "prompt_len": args.prompt_len,
            "seed": args.seed,
        },
        "tasks": [t.classes for t in tasks],
        **result,
        "accuracy_matrix": result["accuracy_matrix"].tolist(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(result["accuracy_matrix"], out / "accuracy.png", source.name)
    m = result["metrics"]
    write_result(
        out, NAME, args=vars(args), headers=[*METRIC_HEADERS, "model", "data"],
        rows=[[*(m[k] for k in METRIC_KEYS), source.name, args.data]], figures=["accuracy.png"],
        results=record, markdown=render_table(record),
    )  # fmt: skip
    print(
        f"{NAME} on {args.data} ({n_tasks} tasks x {per_task} classes), {source.name}: "
        f"ACC {m['average_accuracy']:.3f}, BWT {m['backward_transfer']:+.3f}, "
        f"forgetting {m['forgetting']:.3f}; results in {out}"
    )
    return 0


def render_table(record: dict[str, Any]) -> str:
    """The metrics and the accuracy matrix (rows: after task i; columns: task j) as markdown."""
    m = record["metrics"]
    R = record["accuracy_matrix"]
    lines = [
        f"# Continual learning: {record['data']}, {record['model']}\n",
        markdown_table(METRIC_HEADERS, [[m[k] for k in METRIC_KEYS]]),
        "Accuracy R[i, j] on task j after training task i:\n",
        markdown_table(
            ["after \\ task", *[str(j) for j in range(len(R))]],
            [
                [f"task {i}", *["" if np.isnan(v) else f"{v:.3f}" for v in row]]
                for i, row in enumerate(np.asarray(R, dtype=float))
            ],
        ),
    ]
    return "\n".join(lines)


def plot_accuracy(R: np.ndarray, path: Path, title: str) -> Path:
    """Left: the accuracy matrix as a heat map; right: each task's accuracy across stages."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]

    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        image = left.imshow(np.ma.masked_invalid(R), vmin=0, vmax=1, cmap="viridis")
        left.set_xlabel("tested on task j")
        left.set_ylabel("after training task i")
        left.set_xticks(range(T))
        left.set_yticks(range(T))
        for i in range(T):
            for j in range(i + 1):
                left.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7, c="w")
        fig.colorbar(image, ax=left, fraction=0.046)
        for j in range(T):
            right.plot(range(j, T), R[j:, j], marker="o", ms=3, lw=1, label=f"task {j}")
        seen = [np.mean(R[i, : i + 1]) for i in range(T)]
        right.plot(range(T), seen, color="k", lw=2.5, label="all seen")
        right.set_xlabel("after training task")
        right.set_ylabel("test accuracy")
        right.set_ylim(-0.02, 1.02)
        right.grid(alpha=0.3)
        right.legend(fontsize=6, ncol=2)
        fig.suptitle(f"class-incremental accuracy: {title}", fontsize=9)

    return save_figure(path, draw, (10, 4.2))
