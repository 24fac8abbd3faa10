"""The fast path of model.embedding_backward: each id's row of dW receives the gradients of its uses.

The readable form is one NumPy call, `np.add.at(dW, ids, dx)`, which handles repeated ids
correctly but goes element by element through NumPy's generic machinery: 4.5 ms a step for the
main job's 2,048 ids x 256 features, about 3% of its training step. The same loop compiled is a
row of vector adds per id (BENCHMARKS.md, "Fifth session"). tests/test_model.py holds the two
against each other.

Shape letters: V vocabulary, E features, N ids (all positions of the batch, flattened).
"""

import numpy as np

from .jit import AVAILABLE

if AVAILABLE:
    from .jit import _JIT, njit

    @njit(**_JIT)
    def _add_rows(dW, ids, dx):
        """dW (V, E) += for each n: row ids[n] gets dx[n] (E,); ids may repeat."""
        for n in range(ids.shape[0]):
            row = dW[ids[n]]
            src = dx[n]
            for e in range(src.shape[0]):
                row[e] += src[e]


def add_rows(dW, ids, dx):
    """dW[ids[n]] += dx[n] for every n, in place; True when done here, False when the caller must
    use np.add.at (Numba missing, or arrays this loop does not take: not NumPy, dtypes differ, not
    C-contiguous, ids not integers)."""
    if not AVAILABLE or not all(isinstance(a, np.ndarray) for a in (dW, ids, dx)):
        return False
    if ids.dtype.kind not in "iu" or dx.dtype != dW.dtype or not (dW.flags.c_contiguous and dx.flags.c_contiguous):
        return False
    _add_rows(dW, ids, dx)
    return True
