"""The fast path of optim.py's Adam: the whole update of one parameter in one pass over its memory.

optim.Adam._update is the readable form (the textbook: torch.optim.Adam's rule, one NumPy
expression per line); written that way, one update walks the parameter's memory about twelve
times and allocates five temporaries as large as the parameter. Here the same arithmetic runs
element by element in one compiled loop: read p, g, m, v once, write p, m, v once. On the main
job's model (1.9M parameters) that is the difference between ~10 ms and ~2 ms a step (BENCHMARKS.md,
"Fifth session"). tests/test_optim.py holds the two against each other and against torch.

For each element, with c1 = lr / (1 - β1^t) and s2 = 1 / sqrt(1 - β2^t):
    m = β1 m + (1 - β1) g        v = β2 v + (1 - β2) g²        p -= c1 m / (sqrt(v) s2 + ε)
The scalars arrive as float64 and each element is computed in float64, then stored in the
parameter's dtype: at least as exact as the NumPy form, which rounds to float32 after every
operation.

Shape letters: n, the parameter's element count (every array is taken flat).
"""

import numpy as np

from . import contexts
from .jit import AVAILABLE

if AVAILABLE:
    from .jit import _JIT, njit

    @njit(**_JIT)
    def _adam_flat(p, g, m, v, beta1, beta2, c1, s2, eps):
        """p, g, m, v (n,) flat views; p, m, v updated in place."""
        one = 1.0
        for k in range(p.shape[0]):
            gk = float(g[k])
            mk = beta1 * m[k] + (one - beta1) * gk
            vk = beta2 * v[k] + (one - beta2) * gk * gk
            m[k] = mk
            v[k] = vk
            p[k] = p[k] - c1 * mk / (np.sqrt(vk) * s2 + eps)


def adam_update(p, g, m, v, beta1, beta2, c1, s2, eps):
    """One Adam update of p in place (see the module docstring); True when done here, False when
    the fast path does not apply (Numba missing, arrays not NumPy, not C-contiguous, or dtypes that
    differ) and the caller must run the NumPy form. A contexts.Parameter's version goes up, as any
    NumPy write into it would make it: the modules' arrays derived from p (W_hh^T, b_ih + b_hh) see
    that p changed."""
    arrays = (p, g, m, v)
    if not AVAILABLE or not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    if p.dtype.kind != "f" or not all(a.flags.c_contiguous and a.dtype == p.dtype for a in arrays):
        return False
    _adam_flat(*(np.asarray(a).reshape(-1) for a in arrays), float(beta1), float(beta2), float(c1),
               float(s2), float(eps))
    contexts.mark_written(p)
    return True
