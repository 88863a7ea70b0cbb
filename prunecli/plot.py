"""Per-layer charts: a text bar chart for the terminal and a PNG plot beside a checkpoint.

Both take the same input: one series of values per name (e.g. ``{"attention": [...],
"mlp": [...]}``), one value per layer, each a fraction in [0, 1] (kept width, or sparsity).
matplotlib is imported only when a PNG is written.

Example:
    >>> print(bar_chart({"mlp": [1.0, 0.5]}, width=4))
    layer  mlp
        0  ████ 1.00
        1  ██   0.50
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

_EIGHTHS = " ▏▎▍▌▋▊▉"


def _bar(value: float, width: int) -> str:
    if not math.isfinite(value):
        return "?".ljust(width)
    v = min(max(value, 0.0), 1.0) * width
    full = int(v)
    rest = int(round((v - full) * 8))
    if rest == 8:
        full, rest = full + 1, 0
    bar = "█" * full + (_EIGHTHS[rest] if rest and full < width else "")
    return bar.ljust(width)


def bar_chart(
    series: Mapping[str, Sequence[float]], width: int = 24, labels: Sequence[str] | None = None
) -> str:
    """Render per-layer fractions as one row per layer and one bar column per series.

    Args:
        series: series name -> one value in [0, 1] per layer (all the same length).
        width: characters for a value of 1.0.
        labels: row labels (default: the layer index).

    Returns:
        The chart as plain text (no colour codes), one line per layer plus a header.
    """
    names = list(series)
    if not names:
        return ""
    n = len(series[names[0]])
    if any(len(series[k]) != n for k in names):
        raise ValueError("every series needs one value per layer")
    rows = [str(i) for i in range(n)] if labels is None else [str(x) for x in labels]
    lw = max([len("layer")] + [len(r) for r in rows])
    col = width + 5
    head = "layer".rjust(lw) + "  " + " ".join(k[:col].ljust(col) for k in names)
    lines = [head.rstrip()]
    for i, r in enumerate(rows):
        cells = [f"{_bar(float(series[k][i]), width)} {float(series[k][i]):.2f}" for k in names]
        lines.append((r.rjust(lw) + "  " + " ".join(c.ljust(col) for c in cells)).rstrip())
    return "\n".join(lines)


def save_png(
    path: str | Path,
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write a grouped per-layer bar plot as a PNG (atomically: temp file, then rename).

    Args:
        path: destination ``.png``.
        series: series name -> one value per layer.
        title: plot title.
        ylabel: y-axis label (e.g. "kept fraction" or "sparsity").
        labels: x tick labels (default: the layer index).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    names = list(series)
    n = len(series[names[0]]) if names else 0
    xs = list(range(n))
    fig = Figure(figsize=(max(6.0, 0.28 * n * max(1, len(names))), 3.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / max(1, len(names))
    for j, k in enumerate(names):
        ax.bar(
            [x + (j - (len(names) - 1) / 2) * w for x in xs], [float(v) for v in series[k]], width=w, label=k
        )
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in (labels if labels is not None else xs)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.0)
    ax.set_title(title)
    if len(names) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
