"""``nestlearn info``'s level table: numbers follow the CMS config order (slowest first)."""

from __future__ import annotations

from nestlearn.cli.main import main


def level_table(out: str) -> list[tuple[int, str]]:
    """(level, component) of every row of the table headed ``| level | component |``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| level | component"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((int(cells[0]), cells[1]))
    return rows


def test_cms_level_numbers_follow_cms_chunk_sizes(capsys):
    chunk_sizes = [64, 16, 4]
    argv = [
        "info",
        "hope-tiny",
        "model.n_layers=1",
        f"model.cms_chunk_sizes=[{','.join(map(str, chunk_sizes))}]",
        "model.cms_lrs=[0.5,0.5,0.5]",
    ]
    assert main(argv) == 0
    rows = level_table(capsys.readouterr().out)
    cms = {name: level for level, name in rows if ".cms.levels." in name}
    numbers = [cms[f"blocks.0.cms.levels.{i}"] for i in range(len(chunk_sizes))]
    # cms.levels.i is the i-th configured level: its number grows with i, one per frequency.
    assert numbers == sorted(numbers) and len(set(numbers)) == len(chunk_sizes)
    assert rows[0] == (1, "(all parameters)")  # the slowest level, once per optimizer step
    assert [level for level, _ in rows] == sorted(level for level, _ in rows)
