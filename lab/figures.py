"""Figures without pyplot: matplotlib's object API draws straight to PNG, so nothing switches the process's backend."""

from __future__ import annotations

from typing import Any


def figure(rows: int = 1, cols: int = 1, **kwargs: Any):
    """A new (figure, axes) pair, as `pyplot.subplots` returns it, owned by no GUI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def colour(i: int):
    """The i-th of 20 distinct colours."""
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)
