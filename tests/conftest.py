from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nestlearn.config import load_config

CUDA = torch.cuda.is_available()
# Every device this machine has: tests parametrized over it run on the CPU once, as before, and
# again on CUDA where there is one. Select the CUDA cases with ``pytest -k cuda``.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def device_params(cpu: bool = True) -> list:
    """``pytest.param``s of the devices, ids ``cpu`` and ``cuda``; the CUDA one is skipped
    without CUDA (so a CUDA-only test, ``cpu=False``, shows as skipped on the CPU)."""
    params = [pytest.param("cpu", id="cpu")] if cpu else []
    skip = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
    return [*params, pytest.param("cuda", id="cuda", marks=skip)]


def on_device(tree, device: str):
    """``tree`` (a tensor, or lists, tuples and dicts of them) with every tensor copied to
    ``device`` as a new leaf that requires grad where the original did; a tensor already there
    is returned unchanged, so a CPU run is the test as it was."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type == torch.device(device).type:
            return tree
        return tree.detach().to(device).requires_grad_(tree.requires_grad)
    if isinstance(tree, list | tuple):
        return type(tree)(on_device(x, device) for x in tree)
    if isinstance(tree, dict):
        return {key: on_device(x, device) for key, x in tree.items()}
    return tree


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
