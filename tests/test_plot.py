"""Per-layer charts: text bars scale with the value, PNG is a real image."""

import pytest

from prunecli.plot import bar_chart, save_png


def test_bar_chart_rows_and_lengths():
    text = bar_chart({"attention": [1.0, 0.5, 0.0], "mlp": [0.25, 1.0, 0.75]}, width=8)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "attention", "mlp"]
    assert len(lines) == 4
    assert lines[1].count("█") == 8 + 2  # 1.0 -> 8 blocks, 0.25 -> 2 blocks
    assert lines[3].count("█") == 6  # 0.0 and 0.75
    assert "0.50" in lines[2] and "1.00" in lines[2]


def test_bar_chart_rejects_ragged():
    with pytest.raises(ValueError):
        bar_chart({"a": [1.0], "b": [1.0, 0.5]})


def test_save_png(tmp_path):
    out = save_png(tmp_path / "w.png", {"kept": [0.2, 0.9]}, "widths", "kept fraction")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["w.png"]
