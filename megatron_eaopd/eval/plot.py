"""A PNG plot of evaluation curves (OPD vs EOPD) when matplotlib is installed (optional)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["matplotlib_available", "plot_curves"]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
    path: str | os.PathLike,
    title: str = "OPD vs EOPD",
    xlabel: str = "iteration",
) -> Path | None:
    """Write one panel per metric, one line per method, to a PNG; None without matplotlib.

    Args:
        curves: ``curves[metric][method]`` is a list of ``(x, mean, spread)`` points; the spread
            (e.g. the standard deviation over seeds; 0 for a single run) is drawn as a band.
        path: the PNG file to write.
        title: figure title.
        xlabel: label of the x axis.

    Returns:
        The written path, or None when matplotlib is not installed.
    """
    if not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(curves)
    if not metrics:
        raise ValueError("no curves to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, points in curves[metric].items():
            pts = sorted(points)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            sd = [p[2] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=method)
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd)],
                [y + s for y, s in zip(ys, sd)],
                color=line.get_color(),
                alpha=0.2,
            )
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
