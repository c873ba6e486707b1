"""nestlearn.hf without transformers installed: one clear error naming the extra."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from nestlearn.errors import MissingDependencyError


def test_missing_transformers_names_the_install_line(monkeypatch):
    # A None entry in sys.modules makes `import transformers` raise ImportError.
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in [m for m in sys.modules if m == "nestlearn.hf" or m.startswith("nestlearn.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependencyError, match=r"nestlearn\[hf\]"):
        importlib.import_module("nestlearn.hf")


def test_core_imports_without_transformers():
    # Nothing outside nestlearn.hf needs transformers (a None entry blocks the import).
    code = (
        "import sys; sys.modules['transformers'] = None; "
        "import nestlearn.models, nestlearn.train, nestlearn.train.compile, "
        "nestlearn.train.activation_checkpointing, nestlearn.cli.main"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
