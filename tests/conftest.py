from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nestlearn.config import load_config


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One token cache per test session: tests never touch the user's ~/.cache.
    cache = tmp_path_factory.getbasetemp() / "nestlearn-cache"
    monkeypatch.setenv("NESTLEARN_CACHE", str(cache))
    monkeypatch.delenv("NESTLEARN_FAULT", raising=False)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny tensors: thread hand-offs only add overhead and
    stall on a busy machine); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def debug_config(tmp_path: Path):
    """A seconds-long run in its own folder; extra overrides as arguments."""

    def make(*overrides: str, out: str = "run"):
        return load_config("debug", [f"train.out_dir={tmp_path / out}", *overrides])

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
