"""The offline default data set: stdlib docstrings labelled by their module."""

from __future__ import annotations

import pytest

from nestlearn.errors import DataError
from nestlearn.experiments.stdlib_topics import first_paragraph, stdlib_classification


def doc(text: str) -> str:
    return f'    """{text}"""\n'


def make_stdlib(root, modules: dict[str, list[str]]) -> None:
    """One function per docstring; package modules get their texts split over two files."""
    for i, (module, texts) in enumerate(modules.items()):
        funcs = [f"def f{k}():\n{doc(t)}" for k, t in enumerate(texts)]
        if i % 2:
            (root / module / "tests").mkdir(parents=True)
            (root / module / "__init__.py").write_text("".join(funcs[:2]))
            (root / module / "more.py").write_text("".join(funcs[2:]))
            (root / module / "tests" / "test_x.py").write_text(f"def t():\n{doc('Test text')}")
        else:
            (root / f"{module}.py").write_text("".join(funcs))


def texts(module: str, n: int) -> list[str]:
    return [f"Docstring number {k} of the {module} module." for k in range(n)]


def test_first_paragraph_is_one_line_cut_at_a_word():
    assert first_paragraph("  Spread\n   over lines.\n\n  More.") == "Spread over lines."
    assert first_paragraph("alpha beta gamma", max_chars=12) == "alpha beta"


def test_classes_are_modules_in_the_fixed_order_with_a_seeded_split(tmp_path):
    make_stdlib(
        tmp_path,
        {
            "asyncio": texts("asyncio", 6),
            "email": texts("email", 6),
            "logging": texts("logging", 2),  # too few: skipped
            "unittest": texts("unittest", 5),
        },
    )
    data = stdlib_classification(3, train_per_class=3, test_per_class=2, root=tmp_path)
    assert data.labels == ["asyncio", "email", "unittest"]
    assert len(data.train) == 9 and len(data.test) == 6
    for module in data.labels:
        train = {e.text for e in data.train if e.label == module}
        test = {e.text for e in data.test if e.label == module}
        assert not train & test and (train | test) <= set(texts(module, 6))
    assert "Test text" not in {e.text for e in data.train + data.test}
    again = stdlib_classification(3, train_per_class=3, test_per_class=2, root=tmp_path)
    assert again.train == data.train and again.test == data.test
    others = [stdlib_classification(3, 3, 2, seed=s, root=tmp_path).test for s in range(1, 5)]
    assert any(o != data.test for o in others)


def test_a_text_already_taken_by_an_earlier_class_is_skipped(tmp_path):
    shared = "A docstring that both modules carry."
    make_stdlib(
        tmp_path, {"asyncio": [shared, *texts("asyncio", 2)], "email": [shared, *texts("email", 3)]}
    )
    data = stdlib_classification(2, train_per_class=2, test_per_class=1, root=tmp_path)
    owners = [e.label for e in data.train + data.test if e.text == shared]
    assert owners == ["asyncio"]
    # asyncio (3 texts) is too small now, so it takes nothing and email keeps the shared text.
    with pytest.raises(DataError, match=r"only 1 modules with 4 docstrings each \(email\)"):
        stdlib_classification(2, train_per_class=3, test_per_class=1, root=tmp_path)


def test_this_python_has_the_default_set():
    data = stdlib_classification(4, train_per_class=4, test_per_class=2)
    assert len(data.labels) == 4 and len(data.train) == 16 and len(data.test) == 8
