"""Reading charts of ``sae_core.plots`` back from their pixels (shared by tests/test_plots.py and the node tests):
where a colour is drawn, as dots, bars and the threshold line."""

from __future__ import annotations

import numpy as np

from sae_core.plots import THRESHOLD_COLOUR


def mask(img: np.ndarray, colour) -> np.ndarray:
    """``[H, W]`` bool: the pixels of exactly ``colour``."""
    return (np.asarray(img) == np.array(colour, dtype=np.uint8)).all(axis=-1)


def runs(indices: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of sorted ``indices``."""
    return np.split(indices, np.flatnonzero(np.diff(indices) > 1) + 1) if indices.size else []


def runs_y(m: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` image rows of each vertical run of rows holding ``m`` pixels, top to bottom."""
    return [(int(r[0]), int(r[-1])) for r in runs(np.flatnonzero(m.any(axis=1)))]


def bar_lengths(img: np.ndarray, colour) -> list[int]:
    """Pixel length of each horizontal bar of ``colour``, top to bottom (the legend's swatch first)."""
    m = mask(img, colour)
    return [int(m[a:b + 1].any(axis=0).sum()) for a, b in runs_y(m)]


def threshold_column(img: np.ndarray) -> tuple[float, int]:
    """``(column, first row)`` of the threshold line: the columns where its colour runs down the whole plot (the
    legend's short swatch of that colour is not one)."""
    m = mask(img, THRESHOLD_COLOUR)
    counts = m.sum(axis=0)
    cols = np.flatnonzero(counts >= 0.5 * counts.max())
    assert cols.size <= 3 and counts.max() > 100, cols  # one line, 3 px wide, down every row
    return float(cols.mean()), int(np.flatnonzero(m[:, cols[0]])[0])


def dots(img: np.ndarray, colour) -> list[float]:
    """Centre columns of the dots of ``colour`` in the plot (below the legend), left to right: pixels inside a
    solid 5x5 square of it (text and lines are thinner); dots in one column count once."""
    top = threshold_column(img)[1]
    m = mask(img[top:], colour)
    solid = np.lib.stride_tricks.sliding_window_view(m, (5, 5)).all(axis=(-1, -2))
    return [float(r.mean()) + 2 for r in runs(np.flatnonzero(solid.any(axis=0)))]


def as_array(image) -> np.ndarray:
    """A ComfyUI IMAGE ``[1, H, W, 3]`` in [0, 1] as the ``uint8`` array it was made from."""
    return (image[0].detach().cpu().numpy() * 255.0).round().astype(np.uint8)
