"""The fast path: the same LSTM and RNN layers as functional.py, with the gate arithmetic fused.

Same functions, same signatures, same return values as functional.py (the readable reference,
which is the textbook for the equations below); tests/test_kernels.py checks one against the
other. module._backend picks this namespace when Numba imports (AVAILABLE) and LSTMKIT_REFERENCE != "1".
The code lives beside each cell: lstm_fused.py, rnn_fused.py and gru.py (reference and fused side
by side), built from jit.py (Numba kernels' pieces), blas.py (products and their threads) and
layer_rows.py (the gradients after the time loop, packed rows).

Shape letters
    T   time steps
    B   batch
    I   input size
    H   hidden size (the cell state c always has H)
    P   size of h and of the output: proj_size when projecting, else H
    G   4H, the four gate pre-activations stacked in PyTorch's order i, f, g, o

LSTM, one step:
    a_t = x_t W_ih^T + h_{t-1} W_hh^T + b                (B, G)
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)  (B, H) each
    c_t = f ⊙ c_{t-1} + i ⊙ g          m_t = o ⊙ tanh(c_t)          h_t = m_t W_hr^T or m_t
backward, one step (dm = dh_t W_hr or dh_t):
    do = dm ⊙ tanh(c_t)      dc = dc_t + dm ⊙ o ⊙ (1 - tanh²(c_t))
    da = [dc ⊙ g ⊙ i(1-i),  dc ⊙ c_{t-1} ⊙ f(1-f),  dc ⊙ i ⊙ (1-g²),  do ⊙ o(1-o)]
    dc_{t-1} = dc ⊙ f        dh_{t-1} = da W_hh
RNN:  h_t = φ(x_t W_ih^T + h_{t-1} W_hh^T + b),   da = dh ⊙ φ'(a)  (1 - h² or [h > 0]).

Where the time goes, and what is done about it
    * Matrix products (BLAS through NumPy): the input projection of all T steps is one product
      (T*B, I) x (I, G); each step adds one (B, P) x (P, G) product written into a reused buffer
      (`out=`); the weight gradients are one product over all T*B rows after the backward loop.
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
    * Small products run on one BLAS thread (blas.SMALL_PRODUCT).
    * No allocation inside the time loops; workspaces are allocated once per call.
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
    from .rnn_fused import rnn_layer_backward, rnn_layer_forward  # noqa: F401
