"""The offline default for continual learning: which standard-library module wrote a docstring?

Built from this interpreter's standard library, so it exists on every machine and needs no
download. Construction (deterministic for a given Python version and ``seed``):

1. Candidate classes are top-level stdlib modules or packages, taken in the fixed order of
   :data:`PREFERRED` then :data:`SPARE` (pure-Python modules present in CPython 3.10-3.13).
2. For a module, every ``.py`` file of it (``json.py``, or ``json/**.py`` without ``test``/``tests``
   folders) is parsed with :mod:`ast`; each class, function and method docstring gives one
   example: its first paragraph, whitespace collapsed, cut at a word boundary to
   :data:`MAX_CHARS`, kept if at least :data:`MIN_CHARS` long. Repeats inside a module are kept
   once; a text that an earlier class already holds is skipped, so no text has two labels.
3. A module becomes a class if it has at least ``train_per_class + test_per_class`` examples;
   the first ``n_classes`` such modules are the classes, named by the module (``asyncio``).
   Modules are parsed only until enough classes are found.
4. A class's examples are ordered by a hash of (text, seed); the first ``test_per_class`` are its
   test split, the next ``train_per_class`` its training split.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import warnings
from pathlib import Path

from nestlearn.data.classification import ClassificationData, LabelledText
from nestlearn.data.corpus import stable_hash
from nestlearn.errors import DataError

PREFERRED = (
    "asyncio",
    "email",
    "logging",
    "unittest",
    "xml",
    "http",
    "tarfile",
    "importlib",
    "multiprocessing",
    "mailbox",
    "urllib",
    "inspect",
    "ipaddress",
    "typing",
    "pathlib",
    "datetime",
    "threading",
    "doctest",
    "statistics",
    "zipfile",
)
SPARE = (
    "pydoc",
    "collections",
    "enum",
    "imaplib",
    "wsgiref",
    "xmlrpc",
    "configparser",
    "difflib",
    "calendar",
    "ssl",
    "subprocess",
    "shutil",
    "smtplib",
    "ftplib",
)
MIN_CHARS = 24
MAX_CHARS = 160
SKIPPED_DIRS = frozenset({"test", "tests", "__pycache__"})


def first_paragraph(docstring: str, max_chars: int = MAX_CHARS) -> str:
    """The docstring's first paragraph on one line, cut at a word boundary to ``max_chars``."""
    text = " ".join(docstring.strip().split("\n\n")[0].split())
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1].rsplit(" ", 1)[0]
    return cut if cut else text[:max_chars]


def module_files(root: Path, module: str) -> list[Path]:
    """``root/module.py``, or every ``.py`` file of package ``root/module`` (tests excluded)."""
    single = root / f"{module}.py"
    if single.is_file():
        return [single]
    package = root / module
    if not package.is_dir():
        return []
    return sorted(
        p
        for p in package.rglob("*.py")
        if not SKIPPED_DIRS.intersection(p.relative_to(package).parts[:-1])
    )


def module_docstrings(root: Path, module: str) -> list[str]:
    """Distinct first paragraphs of the module's class/function docstrings, in file order
    (parsed once per process: every seed of an experiment reads the same files)."""
    return list(_parsed_docstrings(Path(root), module))


@functools.cache
def _parsed_docstrings(root: Path, module: str) -> tuple[str, ...]:
    texts: dict[str, None] = {}
    for file in module_files(root, module):
        try:
            source = file.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                text = first_paragraph(doc) if doc else ""
                if len(text) >= MIN_CHARS:
                    texts[text] = None
    return tuple(texts)


def stdlib_classification(
    n_classes: int = 20,
    train_per_class: int = 24,
    test_per_class: int = 12,
    seed: int = 0,
    root: Path | None = None,
) -> ClassificationData:
    """The data set of the module docstring (``root``: the stdlib folder, for tests)."""
    if min(n_classes, train_per_class, test_per_class) <= 0:
        raise DataError("n_classes, train_per_class and test_per_class must be > 0")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    need = train_per_class + test_per_class
    train: list[LabelledText] = []
    test: list[LabelledText] = []
    taken: set[str] = set()
    chosen = []
    for module in (*PREFERRED, *SPARE):
        texts = [t for t in module_docstrings(root, module) if t not in taken]
        if len(texts) < need:
            continue
        taken.update(texts)
        texts.sort(key=lambda t: stable_hash(t, seed))
        test += [LabelledText(t, module) for t in texts[:test_per_class]]
        train += [LabelledText(t, module) for t in texts[test_per_class:need]]
        chosen.append(module)
        if len(chosen) == n_classes:
            break
    if len(chosen) < n_classes:
        raise DataError(
            f"the standard library in {root} has only {len(chosen)} modules with {need} "
            f"docstrings each ({', '.join(chosen)}); ask for fewer classes or fewer examples "
            "per class"
        )
    return ClassificationData("stdlib", train, test)
