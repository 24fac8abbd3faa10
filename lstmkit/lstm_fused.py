"""The fast path of the LSTM layer: functional.lstm_layer_forward / _backward with the gate
arithmetic fused (the readable reference is functional.py, the textbook for these equations;
tests/test_kernels.py holds one against the other).

Shape letters
    T   time steps
    B   batch
    I   input size
    H   hidden size (the cell state c always has H)
    P   size of h and of the output: proj_size when projecting, else H
    G   4H, the four gate pre-activations stacked in PyTorch's order i, f, g, o
    N   real rows of a packed batch

LSTM, one step:
    a_t = x_t W_ih^T + h_{t-1} W_hh^T + b                (B, G)
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)  (B, H) each
    c_t = f ⊙ c_{t-1} + i ⊙ g          m_t = o ⊙ tanh(c_t)          h_t = m_t W_hr^T or m_t
backward, one step (dm = dh_t W_hr or dh_t):
    do = dm ⊙ tanh(c_t)      dc = dc_t + dm ⊙ o ⊙ (1 - tanh²(c_t))
    da = [dc ⊙ g ⊙ i(1-i),  dc ⊙ c_{t-1} ⊙ f(1-f),  dc ⊙ i ⊙ (1-g²),  do ⊙ o(1-o)]
    dc_{t-1} = dc ⊙ f        dh_{t-1} = da W_hh

The cache holds "gates" (T, B, G, after the nonlinearities) and "c" (T, B, H) like the
reference's, computed eagerly (they are the forward's working arrays, so they cost nothing extra),
plus references to the inputs and weights and to `out` (not copies). kernels.py says where the
time goes and what is done about it.
"""

import numpy as np

from . import lstm_parts, scratch, tile_gemm
from .blas import ISOLATED_PRODUCT, _c, _mm, _single_blas_thread, _threads_per_step
from .jit import _JIT, _add2, _dot, _vecmat, _vecmat_add, njit
from .lstm_rows import _lstm_bwd_row, _lstm_bwd_step, _lstm_fwd_row, _lstm_fwd_step
from .layer_rows import _input_and_weight_grads, _packed_weight_grads, _packing, _scatter
from .packed import check_batch_sizes
from .tile_gemm import xwt_add


# ---------------------------------------------------------------------- batch 1, whole layer
@njit(**_JIT)
def _lstm_forward_b1(x, h0, c0, W_ih, W_hh, bias, W_hr, has_proj, xa, W_hh_T, a_hh):
    """B == 1: all T steps in one compiled call, outputs allocated here too (each NumPy call
    saved is ~1 µs, which is what one step costs at this size).
    x (T, 1, I), h0 (1, P), c0 (1, H). Returns gates (T, 1, G), c (T, 1, H), m (T, 1, H),
    out (T, 1, P), h_T (1, P), c_T (1, H); m is out itself without projection.
    Two ways to the pre-activations, picked by the caller:
      xa (T, G) = x W_ih^T from one BLAS product and W_hh_T (P, G) a transposed copy of W_hh:
          the recurrent product as unit-stride axpys over G, four rows of W_hh_T per pass
          (jit._vecmat_add; for T > 1, where the copy pays);
      xa empty: both products as dot products with the rows of W_ih, W_hh (one step: no copy,
          no extra call).
    a_hh: W_hh packed by tile_gemm (float32, G whole panels; the caller keeps it), or empty.
    Given, the recurrent product runs the tile with one row of X, which reads W_hh in its panels'
    order: 2.3 µs a step against the axpys' 3.3 at (G, P) = (512, 128) (the caller then made xa
    with the tile too). Empty, the axpys over W_hh_T."""
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
            if a_hh.shape[0] > 0:
                xwt_add(G, 1, P, a_hh.ctypes.data, hp.ctypes.data, P, a.ctypes.data, G)
            else:
                _vecmat_add(hp, W_hh_T, a)
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


# ---------------------------------------------------------------------- the layer
def lstm_layer_forward(x, h0, c0, W_ih, W_hh, b=None, W_hr=None, *, save=True, W_hh_T=None,
                       batch_sizes=None, out=None, packed=None):
    """One LSTM layer, one direction, all T steps; the contract of functional.lstm_layer_forward.

    x (T, B, I), h0 (B, P), c0 (B, H), W_ih (G, I), W_hh (G, P), b (G,) or None, W_hr (P, H) or None.
    Returns out (T, B, P), h_T (B, P), c_T (B, H), cache. The cache keeps a reference to `out`
    (it is h_t for every t, which the backward needs); don't write into `out` before backward.
    The cache's gates and c are reused by later calls once the cache itself is gone (scratch.py):
    keep the cache, not arrays taken out of it.
    save=False (no_grad): cache is None, and c_t, m_t live in (B, H) buffers instead of (T, B, H).
    W_hh_T: W_hh.T as a C-contiguous array, when the caller keeps one across calls (module.py
    does, refreshed when W_hh changes); every time loop reads it (see _lstm_forward_loop for why),
    and without it one is copied per call.
    batch_sizes (T,) or None: a packed batch (packed.py), run natively over its real rows only
    (_lstm_forward_packed); a batch whose sequences all run T steps is an ordinary one.
    A float32 batch of lstm_parts.MIN_BATCH rows or more without projection runs lstm_parts.py
    (a micro-kernel on packed weights, the batch in parts); the cache is the same.
    out: a C-contiguous (T, B, P) array of the result's dtype to write the output into, as NumPy's
    out= (stack_arrays.py passes kept arrays, so that a step maps no fresh memory); it is what is
    returned.
    packed: lstm_parts.pack_weights(W_ih, W_hh), when the caller keeps it across calls (rnn_base
    does without save, refreshed when the weights change); read when the call runs lstm_parts, and
    by a float32 batch-1 call over several steps (both its products on tile_gemm's tile).
    """
    dt = np.result_type(x.dtype, W_ih.dtype)
    x = _c(x, dt)
    W_ih, W_hh = _c(W_ih, dt), _c(W_hh, dt)
    T, B, I = x.shape
    G, P = W_hh.shape
    h0, c0 = _c(h0, dt), _c(c0, dt)
    bias = _c(b, dt) if b is not None else np.zeros(G, dt)
    proj = W_hr is not None
    W_hr = _c(W_hr, dt) if proj else None
    one_step = B == 1 and T == 1     # the only path that reads W_hh's rows rather than W_hh^T
    if out is not None and (out.shape != (T, B, P) or out.dtype != dt or not out.flags.c_contiguous):
        raise ValueError(f"lstm_layer_forward: out must be a C-contiguous {(T, B, P)} array of {dt}, "
                         f"got {out.shape} {out.dtype}")
    bs = None if batch_sizes is None else check_batch_sizes(batch_sizes, T, B)
    # a packed batch whose sequences all run T steps is an ordinary one
    parts = (bs is None or bs[-1] == B) and lstm_parts.usable(dt, B, proj)   # reads W_ih, W_hh packed
    if parts:
        W_hh_T = None
    elif W_hh_T is not None:
        W_hh_T = _c(W_hh_T, dt)
    elif not one_step:
        W_hh_T = np.ascontiguousarray(W_hh.T)
    if bs is not None and bs[-1] != B:
        result = _lstm_forward_packed(x, h0, c0, W_ih, W_hh, W_hh_T, bias, W_hr, b is not None, bs, save)
        if out is not None:
            out[...] = result[0]
            result = (out, *result[1:])
        return result
    if B == 1:
        # without save, the caller's packed weights (rnn_base keeps them) and G whole tile panels:
        # both products on tile_gemm's tile, on one core (no BLAS threads to wake for 50 x 65 x 512)
        tile = (packed is not None and not one_step and not proj and dt == np.float32
                and lstm_parts._tile_rows(G))
        if tile:
            a_ih, a_hh = packed.rows()
            xa = np.zeros((T, G), dt)
            xwt_add(G, T, I, a_ih.ctypes.data, x.ctypes.data, I, xa.ctypes.data, G)
        else:
            xa = np.empty((0, 0), dt) if one_step else _mm(x.reshape(T, I), W_ih.T, limit=ISOLATED_PRODUCT)
            a_hh = np.empty(0, dt)
        gates, c, m, y, h_T, c_T = _lstm_forward_b1(x, h0, c0, W_ih, W_hh, bias, W_hr if proj else W_hh,
                                                    proj, xa, xa if one_step else W_hh_T, a_hh)
        if out is None:
            out = y
        else:
            out[...] = y
            m = m if proj else out
    else:
        if parts:
            gates, c, out = lstm_parts.forward(x, h0, c0, W_ih, W_hh, bias, save, out, packed)
            m = out
        else:
            gates, c, m, out = _lstm_forward_loop(x, h0, c0, W_ih, W_hh_T, bias, W_hr, save, out)
        h_T, c_T = out[-1].copy(), c[-1].copy()
    if not save:
        if B > 1:     # nothing reads the gates and cell states after the loop without a backward
            scratch.give(gates.base)
            scratch.give(c)
        return out, h_T, c_T, None
    cache = scratch.Cache(x=x, h0=h0, c0=c0, W_ih=W_ih, W_hh=W_hh, W_hr=W_hr, has_bias=b is not None,
                          gates=gates, c=c, m=m if proj else None, h=out, W_hh_T=W_hh_T if B == 1 else None)
    if B > 1:
        scratch.give_when_gone(cache, gates.base, c)    # kept for the next step once the cache is gone
    return out, h_T, c_T, cache


def _lstm_forward_loop(x, h0, c0, W_ih, W_hh_T, bias, W_hr, save, out=None):
    """B > 1: one product for the input projection of every step, then per step one recurrent
    product and one fused kernel call. Returns gates (T, B, G), c, m, out. Without save, c and m
    are two and one (B, H) buffers that the steps take turns with (c[-1] is still c_T).
    W_hh_T (P, G) is W_hh^T in its own C-contiguous memory, not the view W_hh.T: with the view,
    OpenBLAS transposes W_hh while packing it, again at every step, and the per-step product
    ran at 57-69 GFLOP/s on one Zen 4 core against 72-90 with the copy (BENCHMARKS.md, issue 10)."""
    T, B, I = x.shape
    P, G = W_hh_T.shape
    H = G // 4
    dt = x.dtype
    proj = W_hr is not None
    c = scratch.take((T, B, H), dt) if save else np.empty((2, B, H), dt)    # the cache's c: kept (scratch.py)
    if out is None:
        out = np.empty((T, B, P), dt)   # handed to the caller: a new array unless one was given
    # Without projection m_t is h_t: the kernel writes straight into the output.
    m = np.empty((T if save else 1, B, H), dt) if proj else out
    # The kernel adds the bias to these input projections. A kept array (scratch.py): the largest
    # of the step, so a fresh one would be fresh pages every step.
    gates = _mm(x.reshape(T * B, I), W_ih.T, out=scratch.take((T * B, G), dt)).reshape(T, B, G)
    rec = np.empty((B, G), dt)
    W_hr_T = np.ascontiguousarray(W_hr.T) if proj else None    # (H, P), for the reason above
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
    if lstm_parts.usable(cache["x"].dtype, cache["x"].shape[1], cache["W_hr"] is not None):
        return (*lstm_parts.backward(dout, dh_T, dc_T, cache), None)
    x, h0, c0 = cache["x"], cache["h0"], cache["c0"]
    W_ih, W_hh, W_hr = cache["W_ih"], cache["W_hh"], cache["W_hr"]
    gates, c, h = cache["gates"], cache["c"], cache["h"]
    proj = W_hr is not None
    dt = x.dtype
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dout = _c(dout, dt)
    dgates = scratch.take((T * B, G), dt).reshape(T, B, G)    # kept between calls (scratch.py)
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

    limit = ISOLATED_PRODUCT if B == 1 else None      # blas.py: after a loop on one core
    dx, dW_ih, dW_hh, db = _input_and_weight_grads(dgates, x, h0, h, W_ih, cache["has_bias"], limit)
    dW_hr = _mm(dh_all.reshape(T * B, P).T, cache["m"].reshape(T * B, H), limit=limit) if proj else None
    scratch.give(dgates.base)         # read by nothing after this: the gradients above are new arrays
    return dx, dh_next, dc, dW_ih, dW_hh, db, dW_hr


# ---------------------------------------------------------------------- packed batches


# ---------------------------------------------------------------------- packed batches
# A packed batch (batch_sizes, sorted longest first) is run over its real rows only, kept packed
# (N, ·) as gru.py's fused layer keeps them: step t is rows [start[t], start[t+1]), and the rows
# still running are a prefix of the previous step's, so every per-step product reads h_{t-1} as a
# contiguous slice and the weight gradients stay one product each over the N real rows. A finished
# sequence keeps its state; row b of h_T, c_T is its state at its own last step. In backward the
# gradient given at a final state waits in dh, dc until its sequence's last step is reached.
def _lstm_forward_packed(x, h0, c0, W_ih, W_hh, W_hh_T, bias, W_hr, has_bias, bs, save):
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
    W_hr_T = np.ascontiguousarray(W_hr.T) if proj else None
    h_prev, c_prev = h0, c0
    with _single_blas_thread(B * P * G), _threads_per_step(bs, P * G) as threads:
        for t in range(T):
            threads.at(t)
            s, e = start[t], start[t + 1]
            n = e - s
            np.matmul(h_prev[:n], W_hh_T, out=rec[:n])
            _lstm_fwd_step(gates[s:e], rec[:n], bias, c_prev[:n], c[s:e], m[s:e])
            if proj:
                np.matmul(m[s:e], W_hr_T, out=h[s:e])
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
