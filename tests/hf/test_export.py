"""``nestlearn export``: a run as a Hugging Face folder that loads in any process.

The fresh-process tests run Python in a subprocess (no ``import nestlearn.hf`` beforehand), as
``lm_eval --model hf`` and ``pipeline(...)`` would, with the dynamic-module cache in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer

from nestlearn.cli.main import main
from nestlearn.config import load_config
from nestlearn.data.document import Document
from nestlearn.data.tokenizer import BPETokenizer, ByteTokenizer
from nestlearn.hf import NestlearnForCausalLM, from_hf
from nestlearn.hf.remote_code import AUTO_MAP, REMOTE_MODULE, shim_source
from nestlearn.models.registry import build_model
from nestlearn.train.checkpoint import load_model, save_checkpoint

TEXT = "def add(a, b):\n    return a + b\n"
ROOT = Path(__file__).resolve().parents[2]


def make_run(path: Path, name: str = "gated_deltanet", tokenizer=None) -> Path:
    tokenizer = tokenizer or ByteTokenizer()
    model = {"name": name, "vocab_size": tokenizer.vocab_size, "d_model": 16, "n_layers": 2}
    model.update({"n_heads": 2} if name == "transformer" else {"n_heads": 2, "chunk_size": 4})
    cfg = load_config(None, {"model": model, "train": {"seq_len": 32}})
    torch.manual_seed(0)
    save_checkpoint(path, 7, model=build_model(cfg.model), trainer_state={}, cfg=cfg,
                    tokenizer=tokenizer)  # fmt: skip
    return path


def bpe() -> BPETokenizer:
    return BPETokenizer.train([Document("d", TEXT * 30)], vocab_size=280, max_bytes=0, seed=0)


def fresh_env(tmp_path: Path) -> dict[str, str]:
    """A new process's environment: offline, the dynamic-module cache in tmp_path."""
    return {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }


def fresh_python(script: str, tmp_path: Path, timeout: float = 300) -> dict:
    """Run ``script`` in a new interpreter (:func:`fresh_env`); its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path, env=fresh_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_writes_a_folder_with_remote_code(tmp_path, capsys):
    run = make_run(tmp_path / "run", name="transformer")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", f"{REMOTE_MODULE}.py"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "nestlearn"
    assert (out / f"{REMOTE_MODULE}.py").read_text() == shim_source()

    hf = AutoModelForCausalLM.from_pretrained(out)
    reference, _ = load_model(run)
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ByteTokenizer().encode(TEXT)
    assert torch.equal(hf(ids).logits, reference(ids)[0])
    assert hf.generation_config.eos_token_id == ByteTokenizer().eos_id

    assert main(["export", str(run), str(out)]) == 2  # not empty: refused without --force
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--force", "--dtype", "bfloat16"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_from_pretrained_takes_a_run_or_checkpoint_folder(tmp_path):
    run = make_run(tmp_path / "run")
    reference, loaded = load_model(run)
    tokens = torch.randint(0, 257, (2, 9))
    for folder in (run, loaded.path):
        hf = NestlearnForCausalLM.from_pretrained(folder)
        assert not hf.training and hf.config.eos_token_id == 256
        assert from_hf(hf).config == reference.config
        assert torch.equal(hf(tokens).logits, reference(tokens)[0])
    half = NestlearnForCausalLM.from_pretrained(run, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="nestlearn export"):
        NestlearnForCausalLM.from_pretrained(run, revision="main")


def test_remote_code_without_nestlearn_names_the_install():
    with (
        mock.patch.dict(sys.modules, {"nestlearn.hf": None}),
        pytest.raises(ImportError, match=r"pip install 'nestlearn\[hf\]'"),
    ):
        exec(compile(shim_source(), REMOTE_MODULE, "exec"), {})


def test_exported_folder_loads_in_a_fresh_process(tmp_path):
    # AutoModelForCausalLM (remote code), AutoTokenizer and pipeline, nestlearn.hf not imported
    # first; a BPE run, so the tokenizer is a real one.
    tokenizer = bpe()
    run = make_run(tmp_path / "run", tokenizer=tokenizer)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    reference, _ = load_model(run)
    ids = tokenizer.encode(TEXT)
    expected = reference(torch.tensor([ids]))[0][0, -1]
    greedy = NestlearnForCausalLM.from_pretrained(run).generate(
        torch.tensor([ids]), max_new_tokens=4, do_sample=False
    )
    got = fresh_python(
        f"""
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok({TEXT!r}, return_tensors="pt")["input_ids"]
        generator = pipeline("text-generation", model={str(out)!r}, trust_remote_code=True)
        text = generator({TEXT!r}, max_new_tokens=4, do_sample=False, return_full_text=False)
        print(json.dumps({{
            "class": type(model).__module__ + "." + type(model).__name__,
            "ids": ids[0].tolist(),
            "last": model(ids).logits[0, -1].tolist(),
            "generated": text[0]["generated_text"],
        }}))
        """,
        tmp_path,
    )
    assert got["class"] == "nestlearn.hf.modeling.NestlearnForCausalLM"
    assert got["ids"] == ids
    assert got["last"] == expected.tolist()
    assert got["generated"] == tokenizer.decode(greedy[0, len(ids) :].tolist())


TASK = """\
task: nestlearn_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_hf_backend_scores_an_exported_folder(tmp_path):
    # `lm_eval --model hf` itself (its CLI, a fresh process) on a local two-question task; the
    # per-choice log-likelihoods it logs equal the nestlearn model's own.
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    run = make_run(tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    docs = [
        {"question": "def add(a, b):", "choices": ["\n    return", " pass"], "answer": 0},
        {"question": "1 + 1 =", "choices": [" 2", " 11"], "answer": 0},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={out},trust_remote_code=True",
        "--tasks", "nestlearn_tiny_choice", "--include_path", str(tasks),
        "--batch_size", "2", "--device", "cpu", "--log_samples", "--output_path", "results",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=fresh_env(tmp_path), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [samples] = (tmp_path / "results").rglob("samples_nestlearn_tiny_choice_*.jsonl")
    got = []
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        for args, resp in zip(row["arguments"].values(), row["resps"], strict=True):
            got.append((args["arg_0"], args["arg_1"], float(resp[0][0])))
    assert len(got) == 4  # two questions, two choices each
    reference, _ = load_model(run)
    tok = ByteTokenizer()
    with torch.no_grad():
        for context, continuation, score in got:
            ctx, cont = tok.encode(context), tok.encode(continuation)
            ids = torch.tensor([ctx + cont])
            logp = reference(ids)[0][0, :-1].log_softmax(-1)
            expected = logp[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).sum()
            assert score == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_lmeval_extra_installs_what_the_hf_backend_imports():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {req.split(">")[0].split("=")[0] for req in extras["optional-dependencies"]["lmeval"]}
    assert {"lm_eval", "accelerate", "transformers"} <= names


@pytest.mark.parametrize("family", ["byte_level_bpe", "sentencepiece_bpe"])
def test_a_converted_model_s_pretrained_tokenizer_is_exported(family):
    # nestlearn convert keeps a Llama-family tokenizer.json; export gives transformers the same
    # JSON, with that tokenizer's own end-of-text token as eos.
    tiny = pytest.importorskip("tests.convert.tiny_tokenizers")
    from nestlearn.convert.tokenizer import PretrainedTokenizer
    from nestlearn.hf import hf_tokenizer

    ours = PretrainedTokenizer(getattr(tiny, family)())
    theirs = hf_tokenizer(ours)
    assert theirs.eos_token == ours.eos_token and theirs.eos_token_id == ours.eos_id
    ids = ours.encode(tiny.TEXT)
    assert theirs(tiny.TEXT, add_special_tokens=False)["input_ids"] == ids
    assert theirs.decode(ids) == ours.decode(ids)
