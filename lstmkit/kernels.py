"""The fast path: the same LSTM and RNN layers as functional.py, with the gate arithmetic fused.

Same functions, same signatures, same return values as functional.py (the readable reference,
which is the textbook for the equations below); tests/test_kernels.py checks one against the
other. modules.py picks this file when Numba imports (AVAILABLE) and LSTMKIT_REFERENCE != "1".

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
    * Small products run on one BLAS thread (see SMALL_PRODUCT below).
    * No allocation inside the time loops; workspaces are allocated once per call.
    * tanh(c_t) is recomputed in backward rather than cached: cheaper than a (T, B, H) array.
    * Denormals: measured no slowdown on the target CPU (Zen 3), so nothing flushes them.

The cache holds "gates" (T, B, G, after the nonlinearities) and "c" (T, B, H) like the
reference's, computed eagerly (they are the forward's working arrays, so they cost nothing extra),
plus references to the inputs and weights and to `out` (not copies).
"""

import math
import threading

import numpy as np

from .packed import check_batch_sizes

try:
    from numba import njit
    from numba.core import types
    from numba.extending import overload

    from . import jit_cache

    jit_cache.install()     # compiled kernels go to a per-user cache, never into the installed package
    AVAILABLE = True
except ImportError:  # the reference in functional.py is used instead
    AVAILABLE = False


if AVAILABLE:
    # fastmath lets LLVM reassociate and use FMA; error_model="numpy" removes the Python-style
    # zero-division checks that would block vectorisation; boundscheck off is Numba's default.
    _JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

    # Coefficients of tanh(x) ~= x P(x²) / Q(x²) on [-7.9, 7.9] (Eigen's ptanh_float; outside
    # that range tanh(x) rounds to ±1 in float32). np.float32 globals keep the arithmetic in
    # float32: Python floats would promote every step to float64 and halve the vector width.
    _CLAMP = np.float32(7.90531110763549805)
    _A1 = np.float32(4.89352455891786e-03)
    _A3 = np.float32(6.37261928875436e-04)
    _A5 = np.float32(1.48572235717979e-05)
    _A7 = np.float32(5.12229709037114e-08)
    _A9 = np.float32(-8.60467152213735e-11)
    _A11 = np.float32(2.00018790482477e-13)
    _A13 = np.float32(-2.76076847742355e-16)
    _B0 = np.float32(4.89352518554385e-03)
    _B2 = np.float32(2.26843463243900e-03)
    _B4 = np.float32(1.18534705686654e-04)
    _B6 = np.float32(1.19825839466702e-06)
    _HALF32 = np.float32(0.5)

    def _tanh(x):  # pragma: no cover - replaced by the overload below inside compiled code
        return math.tanh(x)

    def _sigmoid(x):  # pragma: no cover
        return 0.5 * (1.0 + math.tanh(0.5 * x))

    @overload(_tanh, jit_options=dict(fastmath=True))
    def _tanh_ov(x):
        if isinstance(x, types.Float) and x.bitwidth == 32:
            def impl(x):
                x = min(max(x, -_CLAMP), _CLAMP)
                x2 = x * x
                p = x2 * _A13 + _A11
                p = p * x2 + _A9
                p = p * x2 + _A7
                p = p * x2 + _A5
                p = p * x2 + _A3
                p = p * x2 + _A1
                q = x2 * _B6 + _B4
                q = q * x2 + _B2
                q = q * x2 + _B0
                return x * p / q
            return impl
        return lambda x: math.tanh(x)

    @overload(_sigmoid, jit_options=dict(fastmath=True))
    def _sigmoid_ov(x):
        # σ(x) = (1 + tanh(x/2)) / 2: one vectorisable function for both, and no exp overflow.
        if isinstance(x, types.Float) and x.bitwidth == 32:
            return lambda x: _HALF32 + _HALF32 * _tanh(_HALF32 * x)
        return lambda x: 0.5 + 0.5 * math.tanh(0.5 * x)

    # Every loop over j below lives in its own small function that takes 1-D rows. Measured:
    # the same loop written inline over rows of 2-D arrays stays scalar (6x slower); as a separate
    # function on 1-D arguments LLVM vectorises it (8 floats per AVX2 instruction) and inlines it.

    # ------------------------------------------------------------------ LSTM, one step, fused
    @njit(**_JIT)
    def _lstm_fwd_row(a, r, bias, cp, cn, mn):
        """One batch row. a (G,): in x W_ih^T, out i, f, g, o; r (G,) = h_{t-1} W_hh^T;
        cp (H,) = c_{t-1}; out cn = c_t, mn = m_t."""
        H = cp.shape[0]
        for j in range(H):
            i = _sigmoid(a[j] + r[j] + bias[j])
            f = _sigmoid(a[H + j] + r[H + j] + bias[H + j])
            g = _tanh(a[2 * H + j] + r[2 * H + j] + bias[2 * H + j])
            o = _sigmoid(a[3 * H + j] + r[3 * H + j] + bias[3 * H + j])
            a[j] = i
            a[H + j] = f
            a[2 * H + j] = g
            a[3 * H + j] = o
            cj = f * cp[j] + i * g
            cn[j] = cj
            mn[j] = o * _tanh(cj)

    @njit(**_JIT)
    def _lstm_fwd_step(gates, rec, bias, c_prev, c, m):
        """gates (B, G): in x W_ih^T, out the activations; rec (B, G) = h_{t-1} W_hh^T;
        c_prev (B, H) in; c, m (B, H) out."""
        for n in range(gates.shape[0]):
            _lstm_fwd_row(gates[n], rec[n], bias, c_prev[n], c[n], m[n])

    @njit(**_JIT)
    def _lstm_bwd_row(a, cn, cp, y, hn, dcn, da):
        """One batch row. cn = c_t, cp = c_{t-1}; dm = y + hn; dcn (H,) in: dc_t, out: dc_{t-1};
        da (G,) out. tanh(c_t) is recomputed rather than stored: one cheap vector tanh here saves
        a (T, B, H) array in the cache and a store stream in the forward."""
        H = cn.shape[0]
        one = a.dtype.type(1)   # a typed 1: an int literal would promote float32 to float64
        for j in range(H):
            i = a[j]
            f = a[H + j]
            g = a[2 * H + j]
            o = a[3 * H + j]
            t = _tanh(cn[j])
            dm = y[j] + hn[j]
            dc = dcn[j] + dm * o * (one - t * t)
            da[j] = dc * g * i * (one - i)
            da[H + j] = dc * cp[j] * f * (one - f)
            da[2 * H + j] = dc * i * (one - g * g)
            da[3 * H + j] = dm * t * o * (one - o)
            dcn[j] = dc * f

    @njit(**_JIT)
    def _lstm_bwd_step(gates, c, c_prev, dy, dh_next, dc, dgates):
        """c = c_t; dm = dy + dh_next (B, H); dc (B, H) in: dc_t, out: dc_{t-1}; dgates (B, G) out."""
        for n in range(gates.shape[0]):
            _lstm_bwd_row(gates[n], c[n], c_prev[n], dy[n], dh_next[n], dc[n], dgates[n])

    # ------------------------------------------------------------------ LSTM, batch 1, whole layer
    @njit(**_JIT)
    def _dot(w, v):
        # The sum starts from a typed zero and the loop from k = 0. Starting from w[0] * v[0]
        # and k = 1 (an easy way to get the type) shifts the vector loop by one element and
        # leaves up to 31 to a scalar tail: measured 2x slower on the (4H, I) and (4H, H)
        # matrix-vector products of a batch-1 step at H = 128.
        s = w.dtype.type(0)
        for k in range(v.shape[0]):
            s += w[k] * v[k]
        return s

    @njit(**_JIT)
    def _lstm_forward_b1(x, h0, c0, W_ih, W_hh, bias, W_hr, has_proj, xa, W_hh_T):
        """B == 1: all T steps in one compiled call, outputs allocated here too (each NumPy call
        saved is ~1 µs, which is what one step costs at this size).
        x (T, 1, I), h0 (1, P), c0 (1, H). Returns gates (T, 1, G), c (T, 1, H), m (T, 1, H),
        out (T, 1, P), h_T (1, P), c_T (1, H); m is out itself without projection.
        Two ways to the pre-activations, picked by the caller:
          xa (T, G) = x W_ih^T from one BLAS product and W_hh_T (P, G) a transposed copy of W_hh:
              the recurrent product as P unit-stride axpys over G (for T > 1, where the copy pays);
          xa empty: both products as dot products with the rows of W_ih, W_hh (one step: no copy,
              no extra call)."""
        T = x.shape[0]
        G, P = W_hh.shape
        H = G // 4
        dt = x.dtype
        gates = np.empty((T, 1, G), dt)
        c = np.empty((T, 1, H), dt)
        out = np.empty((T, 1, P), dt)
        m = np.empty((T, 1, H), dt) if has_proj else out
        zeros = np.zeros(G, dt)   # bias and recurrent part are already in a
        use_xa = xa.shape[0] == T
        hp = h0[0]
        cp = c0[0]
        for t in range(T):
            a = gates[t, 0]
            if use_xa:
                _add2(xa[t], bias, a)
                for k in range(P):
                    _axpy(hp[k], W_hh_T[k], a)
            else:
                xt = x[t, 0]
                for r in range(G):
                    a[r] = bias[r] + _dot(W_ih[r], xt) + _dot(W_hh[r], hp)
            _lstm_fwd_row(a, zeros, zeros, cp, c[t, 0], m[t, 0])
            ht = out[t, 0]
            if has_proj:
                mt = m[t, 0]
                for p in range(P):
                    ht[p] = _dot(W_hr[p], mt)
            hp = ht
            cp = c[t, 0]
        return gates, c, m, out, out[T - 1].copy(), c[T - 1].copy()

    @njit(**_JIT)
    def _add2(u, v, out):
        for k in range(out.shape[0]):
            out[k] = u[k] + v[k]

    @njit(**_JIT)
    def _axpy(a, w, out):
        for k in range(out.shape[0]):
            out[k] += a * w[k]

    @njit(**_JIT)
    def _vecmat(v, W, out):
        """out (K,) = v (R,) W (R, K): rows of W scaled and added (unit stride, vectorised)."""
        out[:] = 0
        for r in range(W.shape[0]):
            _axpy(v[r], W[r], out)

    @njit(**_JIT)
    def _lstm_layer_bwd_b1(dout, gates, c, c0, W_hh_T, W_hr, has_proj, dh, dc, dgates, dh_all):
        """B == 1: the backward time loop in one compiled call. dout (T, P); dh (P,), dc (H,) in:
        the gradients at the final states, out: at h0, c0; dgates (T, G) and, with projection,
        dh_all (T, P) out. W_hh_T (P, G) is a transposed copy so that dh_{t-1} = W_hh^T da is P
        dot products of length G (measured 3x faster than G axpys of length P)."""
        T = dout.shape[0]
        H = c.shape[1]
        zeros = np.zeros(H, c.dtype)
        dm = np.empty(H, c.dtype)
        for t in range(T - 1, -1, -1):
            cp = c[t - 1] if t > 0 else c0
            y = dout[t]
            if has_proj:
                da = dh_all[t]
                for p in range(y.shape[0]):
                    da[p] = y[p] + dh[p]
                _vecmat(da, W_hr, dm)
                _lstm_bwd_row(gates[t], c[t], cp, dm, zeros, dc, dgates[t])
            else:
                _lstm_bwd_row(gates[t], c[t], cp, y, dh, dc, dgates[t])
            da_t = dgates[t]
            for p in range(dh.shape[0]):
                dh[p] = _dot(W_hh_T[p], da_t)

    # ------------------------------------------------------------------ fingerprints (contexts.py)
    @njit(**_JIT)
    def _fingerprint_words(w):
        """A 64-bit fingerprint of 32-bit words w: each word xor its index goes through a
        multiply-xorshift mix, so an edit anywhere moves the sums pseudo-randomly; two sums make
        64 bits. All 32-bit arithmetic, so it vectorises: measured 14.6 GB/s against zlib's CRC-32
        at 4.2, which made hashing a training step's input ~2% of the step at (T, B, I) = (50, 32, 128)."""
        s1 = np.uint32(0)
        s2 = np.uint32(0)
        for i in range(w.shape[0]):
            v = w[i] ^ (np.uint32(i) * np.uint32(0x9E3779B1))
            v = (v ^ (v >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
            v = (v ^ (v >> np.uint32(12))) * np.uint32(0x297A2D39)
            s1 += v
            s2 += v ^ (v >> np.uint32(15))
        return (np.uint64(s1) << np.uint64(32)) | np.uint64(s2)

    # ------------------------------------------------------------------ RNN, one step, fused
    @njit(**_JIT)
    def _rnn_fwd_row(a, r, bias, relu):
        zero = a.dtype.type(0)
        if relu:
            for j in range(a.shape[0]):
                a[j] = max(a[j] + r[j] + bias[j], zero)
        else:
            for j in range(a.shape[0]):
                a[j] = _tanh(a[j] + r[j] + bias[j])

    @njit(**_JIT)
    def _rnn_fwd_step(a, rec, bias, relu):
        """a (B, H): in x W_ih^T, out h_t = φ(a + rec + b)."""
        for n in range(a.shape[0]):
            _rnn_fwd_row(a[n], rec[n], bias, relu)

    @njit(**_JIT)
    def _rnn_bwd_row(h, y, d, relu, out):
        zero = h.dtype.type(0)
        one = h.dtype.type(1)
        if relu:
            for j in range(h.shape[0]):
                out[j] = (y[j] + d[j]) if h[j] > zero else zero
        else:
            for j in range(h.shape[0]):
                out[j] = (y[j] + d[j]) * (one - h[j] * h[j])

    @njit(**_JIT)
    def _rnn_bwd_step(h, dy, dh_next, relu, da):
        """da (B, H) = (dy + dh_next) ⊙ φ'(a), with φ' read off h_t."""
        for n in range(h.shape[0]):
            _rnn_bwd_row(h[n], dy[n], dh_next[n], relu, da[n])


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
    """with _single_blas_thread(macs): BLAS on one thread inside when macs < SMALL_PRODUCT.
    Nested or concurrent uses (several Python threads) share one depth count under a lock, so
    the count read before the first one is what the last one restores."""

    __slots__ = ("on",)
    _lock = threading.Lock()
    _depth = 0
    _saved = 1

    def __init__(self, macs):
        self.on = _BLAS_THREADS is not None and macs < SMALL_PRODUCT

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


def _mm(a, b, out=None):
    """a @ b for 2-D a, b; small products on one BLAS thread (see SMALL_PRODUCT)."""
    with _single_blas_thread(a.shape[0] * a.shape[1] * b.shape[1]):
        return np.matmul(a, b, out=out)


def _c(a, dtype):
    """C-contiguous array of dtype (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=dtype)


def lstm_layer_forward(x, h0, c0, W_ih, W_hh, b=None, W_hr=None, *, save=True, W_hh_T=None,
                       batch_sizes=None):
    """One LSTM layer, one direction, all T steps; the contract of functional.lstm_layer_forward.

    x (T, B, I), h0 (B, P), c0 (B, H), W_ih (G, I), W_hh (G, P), b (G,) or None, W_hr (P, H) or None.
    Returns out (T, B, P), h_T (B, P), c_T (B, H), cache. The cache keeps a reference to `out`
    (it is h_t for every t, which the backward needs); don't write into `out` before backward.
    save=False (no_grad): cache is None, and c_t, m_t live in (B, H) buffers instead of (T, B, H).
    W_hh_T: W_hh.T as a C-contiguous array, when the caller keeps one across calls (modules.py
    does, refreshed when W_hh changes); the batch-1 loops read it, else they copy W_hh.T per call.
    batch_sizes (T,) or None: a packed batch (packed.py), run natively over its real rows only
    (_lstm_forward_packed); a batch whose sequences all run T steps is an ordinary one.
    """
    dt = np.result_type(x.dtype, W_ih.dtype)
    x = _c(x, dt)
    W_ih, W_hh = _c(W_ih, dt), _c(W_hh, dt)
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    h0, c0 = _c(h0, dt), _c(c0, dt)
    bias = _c(b, dt) if b is not None else np.zeros(G, dt)
    proj = W_hr is not None
    W_hr = _c(W_hr, dt) if proj else None
    if batch_sizes is not None:
        bs = check_batch_sizes(batch_sizes, T, B)
        if bs[-1] != B:
            return _lstm_forward_packed(x, h0, c0, W_ih, W_hh, bias, W_hr, b is not None, bs, save)
    if B == 1:
        if W_hh_T is not None:
            W_hh_T = _c(W_hh_T, dt)
        if T > 1:
            xa = _mm(x.reshape(T, I), W_ih.T)
            W_hh_T = np.ascontiguousarray(W_hh.T) if W_hh_T is None else W_hh_T
        else:
            xa = np.empty((0, 0), dt)
        gates, c, m, out, h_T, c_T = _lstm_forward_b1(x, h0, c0, W_ih, W_hh, bias, W_hr if proj else W_hh,
                                                      proj, xa, W_hh_T if T > 1 else xa)
    else:
        gates, c, m, out = _lstm_forward_loop(x, h0, c0, W_ih, W_hh, bias, W_hr, save)
        h_T, c_T = out[-1].copy(), c[-1].copy()
    if not save:
        return out, h_T, c_T, None
    cache = {"x": x, "h0": h0, "c0": c0, "W_ih": W_ih, "W_hh": W_hh, "W_hr": W_hr,
             "has_bias": b is not None, "gates": gates, "c": c,
             "m": m if proj else None, "h": out, "W_hh_T": W_hh_T if B == 1 else None}
    return out, h_T, c_T, cache


def _lstm_forward_loop(x, h0, c0, W_ih, W_hh, bias, W_hr, save):
    """B > 1: one product for the input projection of every step, then per step one recurrent
    product and one fused kernel call. Returns gates (T, B, G), c, m, out. Without save, c and m
    are two and one (B, H) buffers that the steps take turns with (c[-1] is still c_T)."""
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dt = x.dtype
    proj = W_hr is not None
    c = np.empty((T if save else 2, B, H), dt)
    out = np.empty((T, B, P), dt)
    # Without projection m_t is h_t: the kernel writes straight into the output.
    m = np.empty((T if save else 1, B, H), dt) if proj else out
    # The kernel adds the bias to these input projections.
    gates = _mm(x.reshape(T * B, I), W_ih.T).reshape(T, B, G)
    rec = np.empty((B, G), dt)
    W_hh_T = W_hh.T            # a view: BLAS takes the transpose as a flag, no copy
    W_hr_T = W_hr.T if proj else None
    h_prev, c_prev = h0, c0
    with _single_blas_thread(B * P * G):
        for t in range(T):
            ct = c[t] if save else c[(t + T) % 2]   # the last step writes c[1] = c[-1]
            mt = m[t] if save or not proj else m[0]
            np.matmul(h_prev, W_hh_T, out=rec)
            _lstm_fwd_step(gates[t], rec, bias, c_prev, ct, mt)
            if proj:
                np.matmul(mt, W_hr_T, out=out[t])
            h_prev, c_prev = out[t], ct
    return gates, c, m, out


def lstm_layer_backward(dout, dh_T, dc_T, cache):
    """Backpropagation through time for lstm_layer_forward; functional.lstm_layer_backward's
    contract: returns dx, dh0, dc0, dW_ih, dW_hh, db (None without bias), dW_hr (None without
    projection)."""
    if "start" in cache:
        return _lstm_backward_packed(dout, dh_T, dc_T, cache)
    x, h0, c0 = cache["x"], cache["h0"], cache["c0"]
    W_ih, W_hh, W_hr = cache["W_ih"], cache["W_hh"], cache["W_hr"]
    gates, c, h = cache["gates"], cache["c"], cache["h"]
    proj = W_hr is not None
    dt = x.dtype
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dout = _c(dout, dt)
    dgates = np.empty((T, B, G), dt)
    dh_next = np.zeros((B, P), dt) if dh_T is None else np.array(dh_T, dtype=dt, order="C")
    dc = np.zeros((B, H), dt) if dc_T is None else np.array(dc_T, dtype=dt, order="C")
    dh_all = np.empty((T, B, P), dt) if proj else None   # dLoss/dh_t, for dW_hr after the loop
    if B == 1:
        W_hh_T = cache["W_hh_T"] if cache["W_hh_T"] is not None else np.ascontiguousarray(W_hh.T)
        _lstm_layer_bwd_b1(dout[:, 0], gates[:, 0], c[:, 0], c0[0], W_hh_T,
                           W_hr if proj else W_hh, proj, dh_next[0], dc[0], dgates[:, 0],
                           dh_all[:, 0] if proj else np.empty((0, 0), dt))
    else:
        if proj:
            dm = np.empty((B, H), dt)
            zeros_H = np.zeros((B, H), dt)
        with _single_blas_thread(B * P * G):
            for t in range(T - 1, -1, -1):
                c_prev = c[t - 1] if t > 0 else c0
                if proj:
                    np.add(dout[t], dh_next, out=dh_all[t])
                    np.matmul(dh_all[t], W_hr, out=dm)
                    _lstm_bwd_step(gates[t], c[t], c_prev, dm, zeros_H, dc, dgates[t])
                else:
                    _lstm_bwd_step(gates[t], c[t], c_prev, dout[t], dh_next, dc, dgates[t])
                np.matmul(dgates[t], W_hh, out=dh_next)

    dx, dW_ih, dW_hh, db = _input_and_weight_grads(dgates, x, h0, h, W_ih, cache["has_bias"])
    dW_hr = _mm(dh_all.reshape(T * B, P).T, cache["m"].reshape(T * B, H)) if proj else None
    return dx, dh_next, dc, dW_ih, dW_hh, db, dW_hr


def _input_and_weight_grads(da, x, h0, h, W_ih, has_bias):
    """After the backward loop, from the pre-activation gradients da (T, B, G) of every step:
    dx = da W_ih, dW_ih = Σ_t da_t^T x_t, dW_hh = Σ_t da_t^T h_{t-1}, db = Σ da; each one product
    over all T*B rows. h_{t-1} is h0 for t = 0 and the output h[t-1] after, so dW_hh is two
    products instead of concatenating a (T, B, P) copy of the outputs."""
    T, B, G = da.shape
    I, P = x.shape[2], h0.shape[1]
    dA = da.reshape(T * B, G)
    dx = _mm(dA, W_ih).reshape(T, B, I)
    dW_ih = _mm(dA.T, x.reshape(T * B, I))
    dW_hh = _mm(da[0].T, h0)
    if T > 1:
        dW_hh += _mm(da[1:].reshape((T - 1) * B, G).T, h[:-1].reshape((T - 1) * B, P))
    db = dA.sum(axis=0) if has_bias else None
    return dx, dW_ih, dW_hh, db


def rnn_layer_forward(x, h0, W_ih, W_hh, b=None, nonlinearity="tanh", *, save=True, batch_sizes=None):
    """One Elman RNN layer; functional.rnn_layer_forward's contract: out (T, B, H), h_T, cache
    (None when save is False: the forward keeps nothing else anyway). batch_sizes as in
    lstm_layer_forward."""
    dt = np.result_type(x.dtype, W_ih.dtype)
    x = _c(x, dt)
    W_ih, W_hh, h0 = _c(W_ih, dt), _c(W_hh, dt), _c(h0, dt)
    T, B, I = x.shape
    H = W_hh.shape[0]
    bias = _c(b, dt) if b is not None else np.zeros(H, dt)
    relu = nonlinearity == "relu"
    if batch_sizes is not None:
        bs = check_batch_sizes(batch_sizes, T, B)
        if bs[-1] != B:
            return _rnn_forward_packed(x, h0, W_ih, W_hh, bias, b is not None, nonlinearity, bs, save)
    h = _mm(x.reshape(T * B, I), W_ih.T).reshape(T, B, H)   # becomes h in place
    rec = np.empty((B, H), dt)
    W_hh_T = W_hh.T
    h_prev = h0
    with _single_blas_thread(B * H * H):
        for t in range(T):
            np.matmul(h_prev, W_hh_T, out=rec)
            _rnn_fwd_step(h[t], rec, bias, relu)
            h_prev = h[t]
    if not save:
        return h, h[-1].copy(), None
    cache = {"x": x, "h0": h0, "W_ih": W_ih, "W_hh": W_hh, "has_bias": b is not None,
             "nonlinearity": nonlinearity, "h": h}
    return h, h[-1].copy(), cache


def rnn_layer_backward(dout, dh_T, cache):
    """Backpropagation through time for rnn_layer_forward. Returns dx, dh0, dW_ih, dW_hh, db."""
    if "start" in cache:
        return _rnn_backward_packed(dout, dh_T, cache)
    x, h0, W_ih, W_hh, h = cache["x"], cache["h0"], cache["W_ih"], cache["W_hh"], cache["h"]
    dt = x.dtype
    T, B, I = x.shape
    H = W_hh.shape[0]
    relu = cache["nonlinearity"] == "relu"
    dout = _c(dout, dt)
    da = np.empty((T, B, H), dt)
    dh_next = np.zeros((B, H), dt) if dh_T is None else np.array(dh_T, dtype=dt, order="C")
    with _single_blas_thread(B * H * H):
        for t in range(T - 1, -1, -1):
            _rnn_bwd_step(h[t], dout[t], dh_next, relu, da[t])
            np.matmul(da[t], W_hh, out=dh_next)
    dx, dW_ih, dW_hh, db = _input_and_weight_grads(da, x, h0, h, W_ih, cache["has_bias"])
    return dx, dh_next, dW_ih, dW_hh, db


# ---------------------------------------------------------------------- packed batches
# A packed batch (batch_sizes, sorted longest first) is run over its real rows only, kept packed
# (N, ·) as gru.py's fused layer keeps them: step t is rows [start[t], start[t+1]), and the rows
# still running are a prefix of the previous step's, so every per-step product reads h_{t-1} as a
# contiguous slice and the weight gradients stay one product each over the N real rows. A finished
# sequence keeps its state; row b of h_T, c_T is its state at its own last step. In backward the
# gradient given at a final state waits in dh, dc until its sequence's last step is reached.
def _packing(bs, B):
    """start (T+1,), rows (N,): the flat (T*B) grid indices of the real rows, and each sequence's
    last row (B,)."""
    start = np.concatenate([[0], np.cumsum(bs)])
    rows = np.flatnonzero(np.arange(B)[None, :] < bs[:, None])
    lengths = (bs[None, :] > np.arange(B)[:, None]).sum(axis=1)
    return start, rows, start[lengths - 1] + np.arange(B)


def _scatter(rows_data, rows, T, B):
    """(N, F) packed rows -> (T, B, F), zeros at padding."""
    out = np.zeros((T * B, rows_data.shape[1]), rows_data.dtype)
    out[rows] = rows_data
    return out.reshape(T, B, -1)


def _lstm_forward_packed(x, h0, c0, W_ih, W_hh, bias, W_hr, has_bias, bs, save):
    """lstm_layer_forward over the real rows of a packed batch (B > 1, not all of length T)."""
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dt = x.dtype
    proj = W_hr is not None
    start, rows, last = _packing(bs, B)
    xr = x.reshape(T * B, I)[rows]                    # (N, I)
    N = xr.shape[0]
    gates = _mm(xr, W_ih.T)                           # (N, G), the kernel adds the bias
    c = np.empty((N, H), dt)
    h = np.empty((N, P), dt)
    m = np.empty((N, H), dt) if proj else h           # without projection m_t is h_t
    rec = np.empty((B, G), dt)
    h_prev, c_prev = h0, c0
    with _single_blas_thread(B * P * G), _threads_per_step(bs, P * G) as threads:
        for t in range(T):
            threads.at(t)
            s, e = start[t], start[t + 1]
            n = e - s
            np.matmul(h_prev[:n], W_hh.T, out=rec[:n])
            _lstm_fwd_step(gates[s:e], rec[:n], bias, c_prev[:n], c[s:e], m[s:e])
            if proj:
                np.matmul(m[s:e], W_hr.T, out=h[s:e])
            h_prev, c_prev = h[s:e], c[s:e]
    out = _scatter(h, rows, T, B)
    if not save:
        return out, h[last], c[last], None
    cache = {"x_shape": x.shape, "xr": xr, "h0": h0, "c0": c0, "W_ih": W_ih, "W_hh": W_hh, "W_hr": W_hr,
             "has_bias": has_bias, "start": start, "rows": rows, "bs": bs, "gates": gates, "c": c,
             "m": m if proj else None, "h": h}
    return out, h[last], c[last], cache


def _lstm_backward_packed(dout, dh_T, dc_T, cache):
    """lstm_layer_backward of _lstm_forward_packed: dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr."""
    xr, h0, c0, W_ih, W_hh, W_hr = (cache[k] for k in ("xr", "h0", "c0", "W_ih", "W_hh", "W_hr"))
    gates, c, h, start, rows = cache["gates"], cache["c"], cache["h"], cache["start"], cache["rows"]
    T, B, I = cache["x_shape"]
    N, G = gates.shape
    P, H = W_hh.shape[1], G // 4
    dt = xr.dtype
    proj = W_hr is not None
    dy = _c(dout, dt).reshape(T * B, P)[rows]                     # (N, P)
    dgates = np.empty((N, G), dt)
    dh = np.zeros((B, P), dt) if dh_T is None else np.array(dh_T, dtype=dt, order="C")
    dc = np.zeros((B, H), dt) if dc_T is None else np.array(dc_T, dtype=dt, order="C")
    dh_all = np.empty((N, P), dt) if proj else None
    dm, zeros_H = (np.empty((B, H), dt), np.zeros((B, H), dt)) if proj else (None, None)
    with _single_blas_thread(B * P * G), _threads_per_step(cache["bs"], P * G) as threads:
        for t in range(T - 1, -1, -1):
            threads.at(t)
            s, e = start[t], start[t + 1]
            n = e - s
            c_prev = c0 if t == 0 else c[start[t - 1] : start[t - 1] + n]
            if proj:
                np.add(dy[s:e], dh[:n], out=dh_all[s:e])
                np.matmul(dh_all[s:e], W_hr, out=dm[:n])
                _lstm_bwd_step(gates[s:e], c[s:e], c_prev[:n], dm[:n], zeros_H[:n], dc[:n], dgates[s:e])
            else:
                _lstm_bwd_step(gates[s:e], c[s:e], c_prev[:n], dy[s:e], dh[:n], dc[:n], dgates[s:e])
            np.matmul(dgates[s:e], W_hh, out=dh[:n])
    dx, dW_ih, dW_hh, db = _packed_weight_grads(dgates, xr, h0, h, W_ih, cache)
    dW_hr = _mm(dh_all.T, cache["m"]) if proj else None
    return dx, dh, dc, dW_ih, dW_hh, db, dW_hr


def _packed_weight_grads(da, xr, h0, h, W_ih, cache):
    """_input_and_weight_grads over packed rows: da, xr, h (N, ·). h_{t-1} of a row of step t >= 1
    is the row bs[t-1] places earlier (the same sequence one step back)."""
    T, B, I = cache["x_shape"]
    bs, N = cache["bs"], da.shape[0]
    dx = _scatter(_mm(da, W_ih), cache["rows"], T, B)
    dW_ih = _mm(da.T, xr)
    dW_hh = _mm(da[:B].T, h0)
    if T > 1:
        dW_hh += _mm(da[B:].T, h[np.arange(B, N) - np.repeat(bs[:-1], bs[1:])])
    db = da.sum(axis=0) if cache["has_bias"] else None
    return dx, dW_ih, dW_hh, db


def _rnn_forward_packed(x, h0, W_ih, W_hh, bias, has_bias, nonlinearity, bs, save):
    """rnn_layer_forward over the real rows of a packed batch (B > 1, not all of length T)."""
    T, B, I = x.shape
    H = W_hh.shape[0]
    start, rows, last = _packing(bs, B)
    xr = x.reshape(T * B, I)[rows]
    h = _mm(xr, W_ih.T)                              # (N, H), becomes h in place
    rec = np.empty((B, H), x.dtype)
    relu = nonlinearity == "relu"
    h_prev = h0
    with _single_blas_thread(B * H * H), _threads_per_step(bs, H * H) as threads:
        for t in range(T):
            threads.at(t)
            s, e = start[t], start[t + 1]
            np.matmul(h_prev[: e - s], W_hh.T, out=rec[: e - s])
            _rnn_fwd_step(h[s:e], rec[: e - s], bias, relu)
            h_prev = h[s:e]
    out = _scatter(h, rows, T, B)
    if not save:
        return out, h[last], None
    cache = {"x_shape": x.shape, "xr": xr, "h0": h0, "W_ih": W_ih, "W_hh": W_hh, "has_bias": has_bias,
             "nonlinearity": nonlinearity, "start": start, "rows": rows, "bs": bs, "h": h}
    return out, h[last], cache


def _rnn_backward_packed(dout, dh_T, cache):
    """rnn_layer_backward of _rnn_forward_packed: dx, dh0, dW_ih, dW_hh, db."""
    xr, h0, W_ih, W_hh, h = cache["xr"], cache["h0"], cache["W_ih"], cache["W_hh"], cache["h"]
    start = cache["start"]
    T, B, I = cache["x_shape"]
    N, H = h.shape
    dt = xr.dtype
    relu = cache["nonlinearity"] == "relu"
    dy = _c(dout, dt).reshape(T * B, H)[cache["rows"]]
    da = np.empty((N, H), dt)
    dh = np.zeros((B, H), dt) if dh_T is None else np.array(dh_T, dtype=dt, order="C")
    with _single_blas_thread(B * H * H), _threads_per_step(cache["bs"], H * H) as threads:
        for t in range(T - 1, -1, -1):
            threads.at(t)
            s, e = start[t], start[t + 1]
            _rnn_bwd_step(h[s:e], dy[s:e], dh[: e - s], relu, da[s:e])
            np.matmul(da[s:e], W_hh, out=dh[: e - s])
    dx, dW_ih, dW_hh, db = _packed_weight_grads(da, xr, h0, h, W_ih, cache)
    return dx, dh, dW_ih, dW_hh, db
