"""Matrix products for the fused layers: NumPy's BLAS, with the thread count chosen per product.

Shape letters: as in the layer files (T, B, I, H, P, G); N real rows of a packed batch.
"""

import threading

import numpy as np

# ---------------------------------------------------------------------- BLAS threads
# NumPy's OpenBLAS splits every product over all cores. On a busy machine that is a disaster for
# small products: measured on the shared 2-core EPYC under load, a (512, 50) x (50, 65) product
# took 0.08 ms on one thread and 12 ms on two (each call waits for a descheduled worker), and a
# batch-1 training step went from 114 ms to 7 ms by running its small products on one thread. On
# an idle machine two threads still win down to ~2M multiply-adds ((32, 128) x (128, 512): a
# 1-layer H=128 step was 14 ms with two threads, 16 ms with one). So products under SMALL_PRODUCT
# multiply-adds (and the whole time loop when its per-step product is that small) run on one BLAS
# thread; bigger ones keep all of them. The count is only ever lowered and always restored; with a
# BLAS other than OpenBLAS this does nothing.
SMALL_PRODUCT = 1 << 21
# A batch-1 layer runs its whole time loop in one compiled call on one core, so by the time the
# products around that loop come (the input projection before it, the input and weight gradients
# after it) OpenBLAS's second thread has stopped spinning, and waking it costs more than it brings
# for products of a few million multiply-adds. Measured at (T, B, I, H, layers) = (50, 1, 65, 128, 2):
# (512, 49) x (49, 128) took 119 µs on two threads there against 46 µs in a loop of back-to-back
# calls; with every such product under ISOLATED_PRODUCT on one thread the training step went from
# 1.84 to 1.52 ms, while the same bound for all products made batch-32 steps 1.24x slower (their
# per-step products keep the second thread busy). The batch-1 layers pass it as their limit.
ISOLATED_PRODUCT = 1 << 23


def _find_openblas():
    """NumPy's OpenBLAS as (ctypes library, symbol prefix, symbol suffix), or None: its exported
    names differ between builds (scipy_openblas_..._64_, openblas_..., ...)."""
    import ctypes
    import glob
    import os
    paths = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    try:
        with open("/proc/self/maps") as f:
            paths += sorted({ln.split()[-1] for ln in f if "openblas" in ln and "/" in ln})
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            if hasattr(lib, f"{prefix}_get_num_threads{suffix}") and \
                    hasattr(lib, f"{prefix}_set_num_threads{suffix}"):
                return lib, prefix, suffix
    return None


def _blas_thread_functions():
    """(get_num_threads, set_num_threads) of NumPy's OpenBLAS, or None."""
    found = _find_openblas()
    if found is None:
        return None
    lib, prefix, suffix = found
    return getattr(lib, f"{prefix}_get_num_threads{suffix}"), getattr(lib, f"{prefix}_set_num_threads{suffix}")


try:
    _BLAS_THREADS = _blas_thread_functions()
except Exception:  # noqa: BLE001 - thread control is an optimisation, never a requirement
    _BLAS_THREADS = None


class _single_blas_thread:
    """with _single_blas_thread(macs): BLAS on one thread inside when macs < SMALL_PRODUCT (or the
    limit given, such as ISOLATED_PRODUCT).
    Nested or concurrent uses (several Python threads) share one depth count under a lock, so
    the count read before the first one is what the last one restores."""

    __slots__ = ("on",)
    _lock = threading.Lock()
    _depth = 0
    _saved = 1

    def __init__(self, macs, limit=None):
        self.on = _BLAS_THREADS is not None and macs < (SMALL_PRODUCT if limit is None else limit)

    def __enter__(self):
        if self.on:
            cls = _single_blas_thread
            with cls._lock:
                if cls._depth == 0:
                    cls._saved = _BLAS_THREADS[0]()
                    if cls._saved > 1:
                        _BLAS_THREADS[1](1)
                cls._depth += 1

    def __exit__(self, *exc):
        if self.on:
            cls = _single_blas_thread
            with cls._lock:
                cls._depth -= 1
                if cls._depth == 0 and cls._saved > 1:
                    _BLAS_THREADS[1](cls._saved)


class _threads_per_step:
    """with _threads_per_step(bs, macs_per_row) as threads: ... threads.at(t) in a packed time loop:
    BLAS on one thread for the steps whose recurrent product (bs[t] rows) is under SMALL_PRODUCT,
    as _single_blas_thread decides for a whole call. A packed batch's last steps are few rows: on
    all threads they would pay the cost small products pay there. batch_sizes never increase, so
    a loop switches once (forward: to one thread; backward: back)."""

    __slots__ = ("small", "ctx")

    def __init__(self, bs, macs_per_row):
        self.small = np.asarray(bs) * macs_per_row < SMALL_PRODUCT
        self.ctx = None

    def at(self, t):
        if self.small[t] and self.ctx is None:
            self.ctx = _single_blas_thread(0)
            self.ctx.__enter__()
        elif not self.small[t] and self.ctx is not None:
            self.ctx.__exit__()
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__()
            self.ctx = None


def _mm(a, b, out=None, limit=None):
    """a @ b for 2-D a, b; small products on one BLAS thread (see SMALL_PRODUCT; limit replaces it)."""
    with _single_blas_thread(a.shape[0] * a.shape[1] * b.shape[1], limit):
        return np.matmul(a, b, out=out)


def _c(a, dtype):
    """C-contiguous array of dtype (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=dtype)
