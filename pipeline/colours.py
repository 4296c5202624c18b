"""The jet colour map as a 256 x 3 table, so that drawing a heat map needs no plotting library.

The table is matplotlib's ``jet`` (its piecewise-linear segment data, sampled at 256 points the way
matplotlib builds its lookup table); ``tests/test_drawing.py`` checks it against matplotlib where that
is installed (the ``train`` extra).
"""

from __future__ import annotations

from functools import cache

import numpy as np

#: (x, value) breakpoints of each channel of matplotlib's ``jet``.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
SIZE = 256


@cache
def jet_table() -> np.ndarray:
    """The ``(256, 3)`` float table, values in 0..1."""
    x = np.linspace(0.0, 1.0, SIZE)
    channels = [np.interp(x, *zip(*_JET[name], strict=True)) for name in ("red", "green", "blue")]
    table = np.stack(channels, axis=1)
    table.setflags(write=False)
    return table


def jet(values: np.ndarray) -> np.ndarray:
    """RGB (``values.shape + (3,)``, 0..1) of ``values`` in 0..1 (clipped), as ``colormaps["jet"]``."""
    index = (np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * SIZE).astype(np.int64)
    return jet_table()[np.minimum(index, SIZE - 1)]
