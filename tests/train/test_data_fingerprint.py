"""Resume checks the data: a checkpoint records what it trained on; other data is refused."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import nestlearn.train.trainer as trainer_module
from nestlearn.cli.main import main
from nestlearn.config import load_config
from nestlearn.errors import DataError, NestlearnWarning
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import read_checkpoint
from nestlearn.train.distributed import DistEnv
from nestlearn.train.runtime import setup_runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document {i}\n" + "some words here " * 40 + "\n")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def run_cfg(tmp_path, corpus):
    def make(*overrides: str, source: str | Path = corpus, out: str = "run"):
        return load_config(
            "debug",
            [
                f"data.source={source}",
                f"train.out_dir={tmp_path / out}",
                "train.steps=2",
                "train.ckpt_every=1",
                "train.eval_every=0",
                "eval.max_tokens=64",
                *overrides,
            ],
        )

    return make


def fingerprint_of(checkpoint: Path) -> dict | None:
    return read_checkpoint(checkpoint).trainer_state["data"].get("fingerprint")


def test_unchanged_data_resumes_without_a_word(run_cfg):
    cfg = run_cfg()
    trainer = Trainer(cfg)
    trainer.fit()
    saved = fingerprint_of(trainer.last_checkpoint)
    assert saved == trainer.corpus.data_fingerprint and saved["documents"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NestlearnWarning)
        resumed = Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 3}})
    assert resumed.step == 2
    assert resumed.fit().step == 3


def test_an_edited_source_file_is_refused_by_name(run_cfg, corpus):
    cfg = run_cfg()
    Trainer(cfg).fit()
    with (corpus / "doc3.txt").open("a") as f:
        f.write("one more line\n")
    (corpus / "new.txt").write_text("a new file\n")
    with pytest.raises(DataError) as info:
        Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 3}})
    message = str(info.value)
    assert "\n" not in message
    assert "doc3.txt (edited), new.txt (added)" in message
    assert "step_00000002 was trained on" in message and "--allow-data-change" in message


def test_allow_data_change_resumes_with_a_warning_and_records_the_new_data(run_cfg, corpus):
    cfg = run_cfg()
    Trainer(cfg).fit()
    (corpus / "doc0.txt").unlink()
    expected = r"resuming on changed data \(--allow-data-change\): .*doc0\.txt \(removed\)"
    with pytest.warns(NestlearnWarning, match=expected):
        resumed = Trainer.from_checkpoint(
            Path(cfg.train.out_dir), {"train": {"steps": 3}}, allow_data_change=True
        )
    resumed.fit()
    assert fingerprint_of(resumed.last_checkpoint) == resumed.corpus.data_fingerprint
    # The new checkpoint holds the new data: resuming it needs no flag.
    assert Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 4}}).step == 3


def test_a_python_upgrade_of_the_stdlib_corpus_is_detected(run_cfg, tmp_path, monkeypatch):
    import nestlearn.data.corpus as corpus_module
    import nestlearn.data.fingerprint as fingerprint_module

    def python(version: str, stdlib: Path) -> None:
        monkeypatch.setattr(fingerprint_module.platform, "python_version", lambda: version)
        monkeypatch.setattr(corpus_module.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})

    old = write_corpus(tmp_path / "lib" / "python3.11")
    for path in old.glob("*.txt"):
        path.rename(path.with_suffix(".py"))
    python("3.11.7", old)
    cfg = run_cfg(source="stdlib")
    Trainer(cfg).fit()
    new = tmp_path / "lib" / "python3.12"
    old.rename(new)
    (new / "doc5.py").write_text("# rewritten in the new release\n")
    python("3.12.1", new)
    with pytest.raises(DataError) as info:
        Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 3}})
    message = str(info.value)
    assert "the Python standard library (data.source=stdlib)" in message
    assert "Python 3.11.7 then, 3.12.1 now" in message and "doc5.py (edited)" in message


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(run_cfg, monkeypatch):
    cfg = run_cfg()
    original = Trainer.trainer_state

    def as_older_nestlearn(self):
        state = original(self)
        state["data"].pop("fingerprint")
        return state

    monkeypatch.setattr(Trainer, "trainer_state", as_older_nestlearn)
    Trainer(cfg).fit()
    monkeypatch.setattr(Trainer, "trainer_state", original)
    expected = "records no data fingerprint .* the data could not be checked"
    with pytest.warns(NestlearnWarning, match=expected):
        resumed = Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 3}})
    resumed.fit()
    assert fingerprint_of(resumed.last_checkpoint) == resumed.corpus.data_fingerprint


@contextlib.contextmanager
def one_rank() -> Iterator[None]:
    """Trainers built inside take the data-parallel paths (sharded checkpoints) with one rank."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            trainer_module, "setup_parallel", lambda tc: (DistEnv(mode="ddp"), setup_runtime(tc))
        )
        patch.setattr(trainer_module, "wrap_model", lambda model, env, runtime: model)
        yield


def test_sharded_checkpoints_record_and_check_the_same_fingerprint(run_cfg, corpus):
    pytest.importorskip("torch.distributed.checkpoint")
    cfg = run_cfg()
    with one_rank():
        trainer = Trainer(cfg)
        trainer.fit()
    assert read_checkpoint(trainer.last_checkpoint).format == 2
    assert fingerprint_of(trainer.last_checkpoint) == trainer.corpus.data_fingerprint
    (corpus / "doc1.txt").write_text("other text\n")
    with one_rank(), pytest.raises(DataError, match=r"doc1\.txt \(edited\)"):
        Trainer.from_checkpoint(Path(cfg.train.out_dir), {"train": {"steps": 3}})


def test_cli_refuses_in_one_line_and_allows_with_the_flag(run_cfg, corpus, capsys):
    cfg = run_cfg()
    Trainer(cfg).fit()
    (corpus / "doc2.txt").write_text("changed\n")
    run = cfg.train.out_dir
    capsys.readouterr()
    assert main(["train", "--resume", run, "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "doc2.txt (edited)" in err
    with pytest.warns(NestlearnWarning, match=r"doc2\.txt \(edited\)"):
        assert main(["train", "--resume", run, "train.steps=3", "--allow-data-change"]) == 0
    assert main(["train", "debug", "--allow-data-change"]) == 2
    assert "--allow-data-change only applies with --resume" in capsys.readouterr().err
