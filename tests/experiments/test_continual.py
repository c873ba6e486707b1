"""Continual learning: metrics of hand-made matrices, the protocol with known learners, a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nestlearn.data.classification import ClassificationData, LabelledText
from nestlearn.errors import ConfigError
from nestlearn.experiments import run_experiment
from nestlearn.experiments.continual import Task, make_tasks, run_continual
from nestlearn.experiments.continual_metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
)

NAN = math.nan


def test_metrics_of_a_hand_made_matrix():
    R = np.array([[0.9, NAN, NAN], [0.6, 0.8, NAN], [0.3, 0.5, 0.7]])
    assert average_accuracy(R) == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.5 - 0.8)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + 0.7 + 0.5) / 3)


def test_forgetting_uses_the_best_earlier_accuracy_and_bwt_can_be_positive():
    # Task 0 improves after task 1 (positive transfer) and then drops.
    R = np.array([[0.4, NAN, NAN], [0.8, 0.9, NAN], [0.6, 1.0, 0.5]])
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.4) + (1.0 - 0.9)) / 2)
    assert forgetting(R) == pytest.approx(((0.8 - 0.6) + (0.9 - 1.0)) / 2)


def test_a_single_task_has_no_backward_transfer():
    assert continual_metrics(np.array([[0.75]])) == {
        "average_accuracy": 0.75,
        "backward_transfer": 0.0,
        "forgetting": 0.0,
        "average_incremental_accuracy": 0.75,
    }


def test_metrics_refuse_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN at or below the diagonal"):
        backward_transfer(np.array([[1.0, NAN], [NAN, 1.0]]))


def toy_data(n_classes: int = 6, per_class: int = 5) -> ClassificationData:
    def split(kind: str) -> list[LabelledText]:
        return [
            LabelledText(f"{kind} example {i} of class {c}", f"class {c}")
            for c in range(n_classes)
            for i in range(per_class)
        ]

    return ClassificationData("toy", split("train"), split("test"))


class Oracle:
    """Knows every text's class: must score 1.0 everywhere."""

    def __init__(self, data: ClassificationData) -> None:
        self.truth = {e.text: e.label for e in data.train + data.test}
        self.learned: list[int] = []

    def learn(self, task: Task) -> dict[str, float]:
        self.learned.append(task.index)
        return {}

    def predict(self, texts, labels):
        return [labels.index(self.truth[t]) for t in texts]


class OnlyLatest(Oracle):
    """Knows only the classes of the task it learned last (total forgetting)."""

    def learn(self, task: Task) -> dict[str, float]:
        self.current = task.classes
        return super().learn(task)

    def predict(self, texts, labels):
        wrong = next(i for i, c in enumerate(labels) if c in self.current)
        known = [self.truth[t] if self.truth[t] in self.current else None for t in texts]
        return [wrong if k is None else labels.index(k) for k in known]


def test_an_oracle_scores_one_everywhere():
    data = toy_data()
    tasks = make_tasks(data, 3, 2)
    oracle = Oracle(data)
    result = run_continual(oracle, tasks)
    R = result["accuracy_matrix"]
    assert oracle.learned == [0, 1, 2]
    np.testing.assert_array_equal(np.tril(R), np.tril(np.ones((3, 3))))
    assert np.isnan(R[np.triu_indices(3, 1)]).all()
    assert result["metrics"]["average_accuracy"] == 1.0
    assert result["metrics"]["backward_transfer"] == 0.0


def test_total_forgetting_gives_known_metrics():
    data = toy_data()
    result = run_continual(OnlyLatest(data), make_tasks(data, 3, 2))
    np.testing.assert_array_equal(np.tril(result["accuracy_matrix"]), np.eye(3))
    m = result["metrics"]
    assert m["average_accuracy"] == pytest.approx(1 / 3)
    assert m["backward_transfer"] == -1.0
    assert m["forgetting"] == 1.0


def test_tasks_are_disjoint_seeded_and_capped():
    data = toy_data(n_classes=6, per_class=5)
    tasks = make_tasks(data, 2, 3, train_per_class=2, test_per_class=4, seed=1)
    classes = [c for t in tasks for c in t.classes]
    assert len(set(classes)) == 6
    assert all(len(t.train) == 3 * 2 and len(t.test) == 3 * 4 for t in tasks)
    assert all({e.label for e in t.train} == set(t.classes) for t in tasks)
    assert make_tasks(data, 2, 3, seed=1)[0].classes == tasks[0].classes
    other = [make_tasks(data, 2, 3, seed=s)[0].classes for s in range(2, 6)]
    assert any(o != tasks[0].classes for o in other)


def test_too_many_tasks_name_the_fix():
    with pytest.raises(ConfigError, match=r"need 8 classes but toy has 6.*lower --tasks"):
        make_tasks(toy_data(), 4, 2)


def test_end_to_end_on_the_offline_default(tmp_path):
    out = tmp_path / "cl"
    argv = [
        "--model=gated_deltanet",
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "--tasks=2",
        "--classes-per-task=2",
        "--train-per-class=4",
        "--test-per-class=3",
        "--steps-per-task=2",
        "--batch-size=4",
        "--prompt-len=24",
        f"--out={out}",
        "--no-progress",
    ]
    assert run_experiment("continual", argv) == 0
    written = json.loads((out / "result.json").read_text())
    assert written["experiment"] == "continual"
    [record] = written["results"]
    assert (record["model"], record["seed"]) == ("gated_deltanet", 0)
    assert written["table"]["rows"][0][0] == "gated_deltanet"
    assert (
        written["summary"]["gated_deltanet"]["ACC"]["mean"] == record["metrics"]["average_accuracy"]
    )
    assert record["data"] == "stdlib"
    R = record["accuracy_matrix"]
    assert R[0][1] is None and all(0.0 <= R[i][j] <= 1.0 for i in range(2) for j in range(i + 1))
    assert record["metrics"]["average_accuracy"] == pytest.approx((R[1][0] + R[1][1]) / 2)
    assert len(record["tasks"]) == 2 and len(record["task_stats"]) == 2
    assert "BWT" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0


def test_a_transformer_too_short_for_the_prompt_is_refused(tmp_path):
    from nestlearn.errors import SequenceTooLongError

    argv = ["--model=debug", "--tasks=1", "--classes-per-task=2", f"--out={tmp_path}"]
    with pytest.raises(SequenceTooLongError, match=r"reads at most 64.*lower --prompt-len"):
        run_experiment("continual", [*argv, "--train-per-class=2", "--test-per-class=1"])
