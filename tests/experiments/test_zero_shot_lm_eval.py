"""The adapter inside lm-evaluation-harness, on a tiny local multiple-choice task (offline)."""

from __future__ import annotations

import json

import pytest

from nestlearn.experiments import run_experiment
from nestlearn.experiments.lm_scorer import LMScorer
from nestlearn.experiments.zero_shot import evaluate_tasks, lm_eval_model
from tests.experiments.test_zero_shot import TOK, ConstantLM, tiny

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm_eval is optional: pip install 'nestlearn[lmeval]'"
)

DOCS = [
    {"question": "Pick one:", "choices": ["aaaa", "bbbb"], "label": 0},
    {"question": "Pick one:", "choices": ["bbbb", "aaaa"], "label": 1},
    {"question": "Pick one:", "choices": ["bbbb", "aaaa"], "label": 0},
    {"question": "Pick again:", "choices": ["abab", "aaaa", "bbbb"], "label": 1},
]
TASK_YAML = """task: nestlearn_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    """A folder with the task YAML and its JSONL data; the datasets cache inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return folder


def test_a_model_that_always_says_a_scores_the_known_accuracy(tiny_task):
    # " aaaa" beats every other choice, so exactly the documents whose answer is "aaaa" are right.
    result = evaluate_tasks(
        lm_eval_model(ConstantLM(), TOK), ["nestlearn_tiny"], str(tiny_task), include_defaults=False
    )
    assert result["tasks"]["nestlearn_tiny"]["acc"] == 0.75
    assert result["headline"] == {"nestlearn_tiny": ("acc", 0.75)}
    assert result["average"] == 0.75


def test_the_experiment_agrees_with_a_direct_scoring(tiny_task, tmp_path):
    out = tmp_path / "zs"
    argv = [
        "--model=gated_deltanet",
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "--tasks=nestlearn_tiny",
        f"--include-path={tiny_task}",
        "--only-include-path",
        f"--out={out}",
    ]
    assert run_experiment("zero_shot", argv) == 0
    written = json.loads((out / "result.json").read_text())
    record = written["results"]
    scorer = LMScorer(tiny("gated_deltanet").float(), TOK)
    right = 0
    for doc in DOCS:
        scores = scorer.loglikelihood([(doc["question"], f" {c}") for c in doc["choices"]])
        best = max(range(len(scores)), key=lambda i: scores[i][0])
        right += best == doc["label"]
    assert written["experiment"] == "zero_shot"
    assert written["table"]["headers"] == ["model", "nestlearn_tiny", "average"]
    assert record["tasks"]["nestlearn_tiny"]["acc"] == right / len(DOCS)
    assert "nestlearn_tiny" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0


def test_unknown_tasks_are_named(tiny_task):
    from nestlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no task \['nope'\]"):
        evaluate_tasks(
            lm_eval_model(ConstantLM(), TOK), ["nope"], str(tiny_task), include_defaults=False
        )
