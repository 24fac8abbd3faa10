"""The fast path: the same LSTM and RNN layers as functional.py, with the gate arithmetic fused.

Same functions, same signatures, same return values as functional.py (the readable reference,
which is the textbook for the equations); tests/test_kernels.py checks one against the
other. module._backend picks this namespace when Numba imports (AVAILABLE) and LSTMKIT_REFERENCE != "1".
The code lives beside each cell: lstm_fused.py, rnn_fused.py and gru.py (reference and fused side
by side), built from jit.py (Numba kernels' pieces), blas.py (products and their threads) and
layer_rows.py (the gradients after the time loop, packed rows).

The equations are in functional.py (the reference) and in the docstrings of lstm_fused.py and
rnn_fused.py beside the kernels that compute them; shape letters as there (T, B, I, H, P, G = 4H).

Where the time goes, and what is done about it
    * Matrix products (BLAS through NumPy): the input projection of all T steps is one product
      (T*B, I) x (I, G); each step adds one (B, P) x (P, G) product written into a reused buffer
      (`out=`); the weight gradients are one product over all T*B rows after the backward loop.
    * A float32 LSTM layer with B >= 16 and no projection (lstm_parts.py) multiplies with
      OpenBLAS's own micro-kernel on weights packed once per call instead of np.matmul, which
      re-packs the weights at every step (1.4-1.5x on the per-step product); its input projection
      is two kernel calls per step, its weight gradients blocked kernel calls; and its batch is cut
      into parts, one per core, that run the whole time loop side by side (gemm_kernel.py).
    * Everything element-wise in a step (bias add, 3 sigmoids, 2 tanh, the cell update, and in
      backward all the local gradients) is ONE compiled Numba call per step, instead of ~20 NumPy
      ufunc calls that each walk (B, G) memory and allocate a temporary.
    * float32 tanh/sigmoid are a rational approximation (Eigen's float tanh; within a few float32
      ulps, tested) written in plain arithmetic, so LLVM vectorises the gate loop; math.tanh
      would be a scalar libm call per element (issue 4: 10x slower than NumPy's ufuncs).
      float64 keeps libm's tanh, so float64 results match the reference to ~1e-15.
    * Batch 1 (generation, and training at B = 1): forward and backward time loops run as one
      compiled call over all T steps with the matrix-vector products written out, because at
      that size Python and dispatch overhead, not arithmetic, is the cost. Callers need do
      nothing: lstm_layer_forward/backward take this path whenever B == 1.
    * Small products run on one BLAS thread (blas.SMALL_PRODUCT), and a batch-1 layer's products
      around its time loop up to blas.ISOLATED_PRODUCT.
    * No allocation inside the time loops. The largest arrays of a call (the LSTM's gates, its cell
      states kept for backward, dgates; in a module's stack also each layer's output, the weight
      gradients and the dx passed down between layers) are kept and reused from call to call
      (scratch.py, rnn_base.py): fresh multi-MB arrays are fresh pages, and page faults cost up to a
      quarter of a small step. What is handed to the caller (the output, the bottom dx) is new.
    * W_hh^T is read from its own contiguous copy (kept by the module per weight version): through
      the view W_hh.T, OpenBLAS transposes W_hh again at every step.
    * tanh(c_t) is recomputed in backward rather than cached: cheaper than a (T, B, H) array.
    * Denormals: measured no slowdown on the target CPU (Zen 3), so nothing flushes them.

The cache holds "gates" (T, B, G, after the nonlinearities) and "c" (T, B, H) like the
reference's, computed eagerly (they are the forward's working arrays, so they cost nothing extra),
plus references to the inputs and weights and to `out` (not copies).
"""

from .jit import AVAILABLE

if AVAILABLE:
    from .blas import _find_openblas  # noqa: F401 - the benchmark reports which BLAS runs
    from .lstm_fused import lstm_layer_backward, lstm_layer_forward  # noqa: F401
    from . import lstm_parts  # noqa: F401 - rnn_base asks it which layers read W_hh^T
    from .rnn_fused import rnn_layer_backward, rnn_layer_forward  # noqa: F401
