"""Plots written by the scripts and benchmarks: one way to get pyplot and to save a figure.

Matplotlib is imported on first use (most runs plot nothing) with the Agg backend, which
needs no display; figures are written atomically like every other output.
"""
from utils.fileio import atomic_output


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(figure, path, dpi=100):
    """Write `figure` as a PNG to `path` (atomically) and close it."""
    with atomic_output(path) as f:
        figure.savefig(f, format='png', dpi=dpi)
    pyplot().close(figure)
