"""``nestlearn train``: what the user reads when something is off is one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nestlearn.cli.main import main
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import MODEL_FILE, verify_checkpoint
from nestlearn.train.checkpoint_folders import checkpoint_root
from tests.conftest import subprocess_env


def test_a_skipped_corrupt_checkpoint_is_one_warning_line(debug_config):
    cfg = debug_config("train.steps=4", "train.ckpt_every=2", "train.eval_every=0")
    run = Path(cfg.train.out_dir)
    Trainer(cfg).fit()
    newest = checkpoint_root(run) / "step_00000004"
    model = newest / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "nestlearn", "train", "--resume", str(run)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"nestlearn train: warning: skipping corrupt checkpoint: {newest}: {MODEL_FILE} is "
        "corrupt (sha256 mismatch); use an earlier checkpoint"
    ]
    # Resumed from step 2, the corrupt step 4 was replaced by a good one.
    assert verify_checkpoint(newest)["step"] == 4


def test_out_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert main(["train", "debug", f"train.out_dir={file}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"nestlearn train: error: train.out_dir={file} is a file, not a folder; set "
        "train.out_dir to a folder (a new one for a new run)"
    ]
    assert file.read_text() == "keep me"
