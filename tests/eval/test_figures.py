"""The MQAR accuracy curves: equal curves stay visible, the legend covers no data."""

from __future__ import annotations

from nestlearn.eval import figures

PAIRS = [4, 8, 16, 32]
# Two models with the same accuracies (the common case at 100 %) and a third one.
PANELS = {
    "T = 64": {
        "a": (PAIRS, [1.0, 1.0, 1.0, 0.9]),
        "b": (PAIRS, [1.0, 1.0, 1.0, 0.9]),
        "c": (PAIRS, [1.0, 0.8, 0.5, None]),
    },
    "T = 128 (not trained)": {"a": (PAIRS, [1.0, 1.0, 1.0, 1.0]), "c": (PAIRS, [1.0] * 4)},
}


def drawn(monkeypatch, tmp_path):
    """Draw PANELS and return the figure as it is saved (kept open for inspection)."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path)

    monkeypatch.setattr(figures, "_save", keep)
    figures.plot_curves(
        PANELS, tmp_path / "mqar.png", xlabel="pairs", ylabel="accuracy", logx=True, baseline=0.1
    )
    assert (tmp_path / "mqar.png").stat().st_size > 0
    return kept[0]


def test_series_have_distinct_styles_and_are_drawn_slightly_apart(monkeypatch, tmp_path):
    fig = drawn(monkeypatch, tmp_path)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in "abc"}
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines.values()}
    assert len(styles) == 3
    xa, xb = lines["a"].get_xdata(), lines["b"].get_xdata()
    for true_x, x1, x2 in zip(PAIRS, xa, xb, strict=True):
        assert x1 != x2  # identical curves are not drawn on top of each other
        assert abs(x1 / true_x - 1) < 0.1 and abs(x2 / true_x - 1) < 0.1
    assert all(0 < line.get_alpha() < 1 for line in lines.values())
    # The same model keeps its colour and style in every panel.
    other = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert other["c"].get_marker() == lines["c"].get_marker()
    assert other["c"].get_color() == lines["c"].get_color()


def test_the_legend_lies_outside_every_panel(monkeypatch, tmp_path):
    fig = drawn(monkeypatch, tmp_path)
    fig.canvas.draw()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "c", "chance"]
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent())
    assert box.x1 <= fig.bbox.x1 + 1  # and it is inside the saved image
