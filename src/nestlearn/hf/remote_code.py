"""The code a saved nestlearn folder carries for ``trust_remote_code=True``.

``transformers`` loads a model type it does not know from Python files in the model folder named
by ``config.json``'s ``auto_map``. A nestlearn folder carries one small module,
``modeling_nestlearn.py``, that only imports the installed nestlearn package's classes (the
model code is not copied, so a folder cannot drift from the library that runs it); without
nestlearn it raises an ``ImportError`` with the install line. So in any process with nestlearn
installed::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works without ``import nestlearn.hf`` (``lm_eval --model hf``, ``pipeline(...)``).
"""

from __future__ import annotations

from pathlib import Path

from nestlearn import __version__

REMOTE_MODULE = "modeling_nestlearn"
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_MODULE}.NestlearnConfig",
    "AutoModelForCausalLM": f"{REMOTE_MODULE}.NestlearnForCausalLM",
}

SHIM = '''"""Remote code of a nestlearn model folder (written by nestlearn {version}).

transformers imports this file for AutoConfig / AutoModelForCausalLM with
trust_remote_code=True. The model code is the installed nestlearn package's; this file only
imports it.
"""

try:
    from nestlearn.hf import NestlearnConfig, NestlearnForCausalLM
except ImportError as exc:
    raise ImportError(
        "this model folder holds a nestlearn model (written by nestlearn {version}); loading it "
        "needs the nestlearn package with its Hugging Face extra in this environment: "
        "pip install 'nestlearn[hf]' (from the nestlearn repository: pip install -e '.[hf]')"
    ) from exc

__all__ = ["NestlearnConfig", "NestlearnForCausalLM"]
'''


def shim_source() -> str:
    """The text of ``modeling_nestlearn.py``."""
    return SHIM.format(version=__version__)


def write_remote_code(folder: str | Path) -> Path:
    """Write ``modeling_nestlearn.py`` into ``folder``; returns its path."""
    path = Path(folder) / f"{REMOTE_MODULE}.py"
    path.write_text(shim_source(), encoding="utf-8")
    return path
