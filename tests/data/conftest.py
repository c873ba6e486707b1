from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def make_tree(tmp_path: Path):
    """Write ``{relative path: str or bytes}`` under a fresh folder and return the folder."""

    def make(files: dict[str, str | bytes], name: str = "corpus") -> Path:
        root = tmp_path / name
        root.mkdir()
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_bytes(content.encode("utf-8"))
        return root

    return make
