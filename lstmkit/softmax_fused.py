"""The fast path of model.softmax_cross_entropy_forward: the loss and its gradient in one pass per
row of logits, compiled.

The readable form (model.py) is six NumPy passes over the (N, V) logits (max, subtract, exp, sum,
divide, and the backward's own pass for (p - onehot) / N), each a trip through memory and on one
thread: 4.9 ms of the main job's 115 ms step at N = 2,048, V = 1,669, where torch's fused
cross_entropy takes 1.7 (BENCHMARKS.md, "Eighth session"). Here each row is read once into cache
and written once, as the gradient backward needs:

    m_n = max_v z[n, v]                     s_n = Σ_v exp(z[n, v] - m_n)
    loss = (1/N) Σ_n (m_n + log s_n - z[n, y_n])                    (mean over rows, in float64)
    dz[n, v] = exp(z[n, v] - m_n) / (s_n N) - [v = y_n] / N        (softmax - onehot, over N)

exp is jit.py's vectorised float32 exp (~1 ulp; libm's for float64). tests/test_model.py holds
this against the readable form and torch.

Shape letters: N rows (positions), V classes (vocabulary).
"""

import math

import numpy as np

from .jit import AVAILABLE

if AVAILABLE:
    from .jit import _JIT, _exp, njit

    @njit(**_JIT)
    def _row_max(z):
        m = z[0]
        for v in range(z.shape[0]):
            m = max(m, z[v])
        return m

    @njit(**_JIT)
    def _exp_shifted(a, m):
        """a = exp(a - m) in place; returns the sum. One array in and out: a loop reading one
        array and writing another that may be the same one vectorises only behind a runtime
        overlap check, which an in-place call fails (measured: 10.3 ms against 2.9 at the main
        job's size), so a separate dz gets a copy of the row first."""
        s = a.dtype.type(0)
        for v in range(a.shape[0]):
            e = _exp(a[v] - m)
            a[v] = e
            s += e
        return s

    @njit(**_JIT)
    def _scale(a, out):
        for v in range(out.shape[0]):
            out[v] *= a

    @njit(**_JIT)
    def _cross_entropy_rows(z, y, dz, in_place):
        """Σ_n of the rows' losses (float64); dz (N, V) = (softmax(z) - onehot(y)) / N, written over
        z when in_place (dz is z)."""
        N = z.shape[0]
        inv_n = z.dtype.type(1.0 / N)
        total = 0.0
        for n in range(N):
            m = _row_max(z[n])
            z_y = z[n, y[n]]                       # read before the row is overwritten
            if not in_place:
                dz[n, :] = z[n]
            s = _exp_shifted(dz[n], m)
            total += float(m) + math.log(float(s)) - float(z_y)
            _scale(inv_n / s, dz[n])
            dz[n, y[n]] -= inv_n
        return total


def cross_entropy(z, y, overwrite=False):
    """(mean loss as a Python float, dz) for logits z (N, V) and targets y (N,), dz the gradient
    of the mean loss, written over z when overwrite; or None when the caller must use the readable
    form (Numba missing, arrays this loop does not take, or a target outside 0..V-1: model.py
    raises IndexError for those before it calls here; checked again because this loop indexes
    memory with the targets)."""
    if not AVAILABLE or not (isinstance(z, np.ndarray) and isinstance(y, np.ndarray)):
        return None
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.dtype not in (np.float32, np.float64) or z.size == 0:
        return None
    if y.dtype.kind not in "iu" or not z.flags.c_contiguous or y.min() < 0 or y.max() >= z.shape[1]:
        return None
    dz = z if overwrite else np.empty_like(z)
    return _cross_entropy_rows(z, y, dz, overwrite) / z.shape[0], dz
