"""Both cores on one layer: the batch cut into two halves that run side by side, each on its own core.

The rows of a batch never meet inside a recurrent layer: row n's h_t depends on row n's inputs and
states only. So a layer over B rows is exactly two layers over the two halves of its rows, and the
halves can run at the same time, one on the calling thread and one on a worker thread, each with
BLAS on one thread. Only the weight gradients mix rows: each half computes its own part of
dW = Σ_rows da^T x, and the two parts are added.

Why, instead of BLAS's own threads on the whole batch (the default elsewhere): the per-step product
h_{t-1} W_hh^T has only B rows. Split over two BLAS threads, every step pays a hand-off between the
threads, and the fused gate kernel between two products runs on one core while the other waits.
Two independent halves wait for nothing until the layer ends: every product, every gate kernel and
the Python between them run on both cores. The price: each per-step product has B/2 rows, which
BLAS runs at a lower rate than B rows. The worker thread exists once per process and sleeps between
layers; Numba's kernels (nogil) and NumPy's products release the GIL, so the halves overlap.

Shape letters: T steps, B batch, I input size, H hidden, P size of h (H, or the projection).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .blas import _BLAS_THREADS, _single_blas_thread

# A layer runs in halves only when each half keeps at least MIN_HALF_ROWS rows and one step's
# recurrent product (B x P x 4H multiply-adds) is at least MIN_STEP_MACS: below that a half's
# products are too small for the split to pay for the hand-off (measured: see BENCHMARKS.md).
MIN_HALF_ROWS = 8
MIN_STEP_MACS = 1 << 21

_pool = None
_pool_lock = threading.Lock()


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worth_splitting(B, step_macs):
    """Whether a layer over B rows with step_macs multiply-adds per step runs in two halves: only
    with two cores to use (BLAS is allowed more than one thread, so the user did not ask for one),
    rows enough for two halves, and a per-step product big enough."""
    if os.environ.get("LSTMKIT_BATCH_HALVES") == "0" or _BLAS_THREADS is None:
        return False
    if B < 2 * MIN_HALF_ROWS or step_macs < MIN_STEP_MACS:
        return False
    return _cores() >= 2 and _BLAS_THREADS[0]() >= 2


def halves(B):
    """The two row ranges of a batch of B."""
    m = B // 2
    return slice(0, m), slice(m, B)


def run_both(fn, first, second):
    """(fn(*first), fn(*second)): the second on the worker thread, the first here, BLAS on one
    thread for both. An exception in either is raised here, after both have finished."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lstmkit-half")
    with _single_blas_thread(0):     # 0 multiply-adds: always one thread inside
        future = _pool.submit(fn, *second)
        try:
            a = fn(*first)
        finally:
            b = future.result()      # waits even when the first half raised, so no half outlives us
    return a, b


def rows(a, part):
    """Rows `part` of a (T, B, ...) array as its own C-contiguous array (the products need it)."""
    return np.ascontiguousarray(a[:, part])


def join_rows(a, b, axis):
    return np.concatenate([a, b], axis=axis)
