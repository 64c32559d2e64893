"""Headless matplotlib for hyjax's figures (end-of-run plots, a method's own figures)."""

from __future__ import annotations

import pathlib


def pyplot():
    """`matplotlib.pyplot` with the headless Agg backend, imported on first use (only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | pathlib.Path) -> pathlib.Path:
    """Writes `fig` as a PNG at `path` and closes it."""
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return pathlib.Path(path)
