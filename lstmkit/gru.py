"""The GRU from its equations: one layer, one direction, forward and backward; the readable
reference and the fused fast path side by side.

Shape letters
    T   time steps          B   batch           I   input size        H   hidden size
    G   3H, the three gate rows stacked in PyTorch's order r, z, n
    N   real tokens: Σ_t batch_sizes[t] (= T*B without batch_sizes)

Forward, one step (exactly torch.nn.GRU's definition):
    xa = x_t W_ih^T + b_ih                     (B, G)   the input's part, [xa_r, xa_z, xa_n]
    ha = h_{t-1} W_hh^T + b_hh                 (B, G)   the recurrent part, [ha_r, ha_z, ha_n]
    r = σ(xa_r + ha_r)     z = σ(xa_z + ha_z)
    n = tanh(xa_n + r ⊙ ha_n)                  the reset gate scales W_hn h + b_hn, bias included:
                                               so b_hn cannot be folded into b_in as the LSTM's
                                               biases are summed
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

Backward, one step. dh_t = dLoss/dh_t arrives from the output at t and from step t+1:
    dn = dh_t ⊙ (1 - z)      dz = dh_t ⊙ (h_{t-1} - n)      (h_t is linear in n and z)
    dan = dn ⊙ (1 - n²)                        the gradient at n's pre-activation
    dr = dan ⊙ ha_n                            (r multiplies ha_n inside that pre-activation)
    dar = dr ⊙ r(1-r)      daz = dz ⊙ z(1-z)
    dxa = [dar, daz, dan]                      the gradient at xa (and at b_ih)
    dha = [dar, daz, dan ⊙ r]                  the gradient at ha (and at b_hh): r scales ha_n
    dh_{t-1} = dh_t ⊙ z + dha W_hh             the direct path through z ⊙ h_{t-1}, and through ha
    dx_t = dxa W_ih
and summed over steps:  dW_ih = Σ dxa^T x_t   dW_hh = Σ dha^T h_{t-1}   db_ih = Σ dxa   db_hh = Σ dha

Packed batches (batch_sizes (T,), see packed.py): sequences sorted longest first, and at step t
only rows [:batch_sizes[t]] are computed. A finished row keeps its state, so h_T row b is sequence
b's state after its own last step; its out rows are zero. In backward the finished rows get no
gradient from dout (padding is a constant) and the gradient given at h_T starts at each
sequence's own last step; nothing computed from padding reaches any gradient.

gru_layer_forward / gru_layer_backward run the fused path unless LSTMKIT_REFERENCE=1 (the rule of
module._backend); reference_* and fused_* are both public so that tests can hold one against
the other. The backward runs the path its cache came from. The reference takes its array module
from x (device.py), so it runs on CuPy arrays unchanged; the GPU's fused path is cuda_layers.py,
and a CuPy input that reaches gru_layer_forward (LSTMKIT_REFERENCE=1 on the GPU) runs the reference.
"""

import os

import numpy as np

from .device import array_module
from .functional import sigmoid
from .packed import check_batch_sizes

try:
    from numba import njit

    from .blas import _mm, _single_blas_thread, _threads_per_step
    from .layer_rows import _add_initial_state_term
    from .jit import _JIT, _dot, _sigmoid, _tanh   # importing jit installs the jit cache
    AVAILABLE = True
except ImportError:  # the reference runs instead
    AVAILABLE = False


# ====================================================================== the reference
def _active(batch_sizes, T, B):
    """Batch size of every step: all B without batch_sizes."""
    return [B] * T if batch_sizes is None else check_batch_sizes(batch_sizes, T, B).tolist()


def reference_forward(x, h0, W_ih, W_hh, b_ih=None, b_hh=None, batch_sizes=None, *, save=True):
    """One GRU layer in one direction. x (T, B, I), h0 (B, H), W_ih (G, I), W_hh (G, H),
    b_ih, b_hh (G,) or None, batch_sizes (T,) or None. Returns out (T, B, H), h_T (B, H), cache
    (None when save is False: no backward will follow, as under lstmkit.no_grad()). The cache
    references x, h0 and the weights, not copies."""
    xp = array_module(x)
    T, B, I = x.shape
    H = W_hh.shape[1]
    active = _active(batch_sizes, T, B)
    gates = xp.zeros((T, B, 3 * H), dtype=x.dtype)  # r, z, n after their nonlinearities
    ha_n = xp.zeros((T, B, H), dtype=x.dtype)       # W_hn h_{t-1} + b_hn, which dr needs
    out = xp.zeros((T, B, H), dtype=x.dtype)
    h = xp.array(h0, dtype=x.dtype)                 # the running state; finished rows keep theirs
    for t in range(T):
        n_t = active[t]                             # rows still running: always a prefix
        xa = x[t, :n_t] @ W_ih.T + (0 if b_ih is None else b_ih)
        ha = h[:n_t] @ W_hh.T + (0 if b_hh is None else b_hh)
        r = sigmoid(xa[:, :H] + ha[:, :H])
        z = sigmoid(xa[:, H : 2 * H] + ha[:, H : 2 * H])
        n = xp.tanh(xa[:, 2 * H :] + r * ha[:, 2 * H :])
        h[:n_t] = (1.0 - z) * n + z * h[:n_t]
        gates[t, :n_t] = xp.concatenate([r, z, n], axis=1)
        ha_n[t, :n_t] = ha[:, 2 * H :]
        out[t, :n_t] = h[:n_t]
    if not save:
        return out, h, None
    cache = {"path": "reference", "x": x, "h0": h0, "W_ih": W_ih, "W_hh": W_hh, "active": active,
             "has_b_ih": b_ih is not None, "has_b_hh": b_hh is not None,
             "gates": gates, "ha_n": ha_n, "h": out}
    return out, h, cache


def reference_backward(dout, dh_T, cache):
    """Backpropagation through time for reference_forward. dout (T, B, H), dh_T (B, H) or None.
    Returns dx, dh0, dW_ih, dW_hh, db_ih, db_hh (the biases' None when the forward had none)."""
    x, h0, W_ih, W_hh = cache["x"], cache["h0"], cache["W_ih"], cache["W_hh"]
    xp = array_module(x)
    gates, ha_n, out, active = cache["gates"], cache["ha_n"], cache["h"], cache["active"]
    T, B, I = x.shape
    H = W_hh.shape[1]
    dx = xp.zeros_like(x)
    dW_ih, dW_hh = xp.zeros_like(W_ih), xp.zeros_like(W_hh)
    db_ih, db_hh = xp.zeros(3 * H, x.dtype), xp.zeros(3 * H, x.dtype)
    # Rows not yet running (going backwards) keep the gradient given at their final state.
    dh_next = xp.zeros((B, H), x.dtype) if dh_T is None else xp.array(dh_T, dtype=x.dtype)
    for t in reversed(range(T)):
        n_t = active[t]
        h_prev = out[t - 1, :n_t] if t > 0 else h0[:n_t]
        r, z, n = xp.split(gates[t, :n_t], 3, axis=1)
        dh = dout[t, :n_t] + dh_next[:n_t]
        dn = dh * (1.0 - z)
        dz = dh * (h_prev - n)
        dan = dn * (1.0 - n * n)
        dar = dan * ha_n[t, :n_t] * r * (1.0 - r)
        daz = dz * z * (1.0 - z)
        dxa = xp.concatenate([dar, daz, dan], axis=1)          # (n_t, G)
        dha = xp.concatenate([dar, daz, dan * r], axis=1)      # (n_t, G)
        dx[t, :n_t] = dxa @ W_ih
        dW_ih += dxa.T @ x[t, :n_t]
        dW_hh += dha.T @ h_prev
        db_ih += dxa.sum(axis=0)
        db_hh += dha.sum(axis=0)
        dh_next[:n_t] = dh * z + dha @ W_hh
    return (dx, dh_next, dW_ih, dW_hh, db_ih if cache["has_b_ih"] else None,
            db_hh if cache["has_b_hh"] else None)


# ====================================================================== the fused fast path
# The same layer with kernels.py's recipe: one BLAS product for the input projection of every
# step, per step one BLAS product for h_{t-1} W_hh^T into a reused buffer and ONE compiled call
# for everything element-wise, and the weight gradients as one product each after the loop.
# Internally the real rows are kept packed, (N, ·), step t being rows [start[t], start[t+1]):
# every product then runs over real tokens only, and without batch_sizes the packed rows are
# simply the (T*B, ·) reshape of the grid, so one code path serves both. One sequence (B == 1, a
# generating sampler) runs all its steps in one compiled call instead (_gru_forward_b1: ~11 µs a
# step at H = 128 against ~18 µs for BLAS and kernel calls), with the same cache.
if AVAILABLE:
    @njit(**_JIT)
    def _gru_fwd_row(a, rec, b_ih, b_hh, hp, hn, h):
        """One batch row. a (G,): in x_t W_ih^T, out r, z, n; rec (G,) = h_{t-1} W_hh^T;
        hp (H,) = h_{t-1}; out hn (H,) = ha_n, h (H,) = h_t."""
        H = hp.shape[0]
        for j in range(H):
            r = _sigmoid(a[j] + b_ih[j] + rec[j] + b_hh[j])
            z = _sigmoid(a[H + j] + b_ih[H + j] + rec[H + j] + b_hh[H + j])
            ha = rec[2 * H + j] + b_hh[2 * H + j]
            n = _tanh(a[2 * H + j] + b_ih[2 * H + j] + r * ha)
            a[j] = r
            a[H + j] = z
            a[2 * H + j] = n
            hn[j] = ha
            h[j] = n + z * (hp[j] - n)          # (1 - z) n + z h_{t-1}, one multiply fewer

    @njit(**_JIT)
    def _gru_fwd_step(gates, rec, b_ih, b_hh, h_prev, ha_n, h):
        for m in range(gates.shape[0]):
            _gru_fwd_row(gates[m], rec[m], b_ih, b_hh, h_prev[m], ha_n[m], h[m])

    @njit(**_JIT)
    def _gru_bwd_row(g, hn, hp, dy, dhz, dhr, dxa, dha):
        """One batch row. g (G,) = r, z, n; hn = ha_n; hp = h_{t-1}; dh_t = dy + dhz + dhr.
        Out dxa, dha (G,), and dhz (H,) = dh_t ⊙ z, the direct part of dh_{t-1} (the caller
        adds dha W_hh into dhr)."""
        H = hp.shape[0]
        one = g.dtype.type(1)       # a typed 1: an int literal would promote float32 to float64
        for j in range(H):
            r = g[j]
            z = g[H + j]
            n = g[2 * H + j]
            dh = dy[j] + dhz[j] + dhr[j]
            dan = dh * (one - z) * (one - n * n)
            dar = dan * hn[j] * r * (one - r)
            daz = dh * (hp[j] - n) * z * (one - z)
            dxa[j] = dar
            dxa[H + j] = daz
            dxa[2 * H + j] = dan
            dha[j] = dar
            dha[H + j] = daz
            dha[2 * H + j] = dan * r
            dhz[j] = dh * z

    @njit(**_JIT)
    def _gru_bwd_step(gates, ha_n, h_prev, dy, dhz, dhr, dxa, dha):
        for m in range(gates.shape[0]):
            _gru_bwd_row(gates[m], ha_n[m], h_prev[m], dy[m], dhz[m], dhr[m], dxa[m], dha[m])


    @njit(**_JIT)
    def _gru_forward_b1(x, h0, W_ih, W_hh, b_ih, b_hh, gates, fill, save):
        """B == 1 (generation): all T steps in one compiled call, since at this size each NumPy
        call costs what a step does. x (T, I), h0 (H,); gates (T, G): x W_ih^T from one BLAS
        product, or (fill, for one step) computed here as dot products with W_ih's rows. The
        recurrent product is G dot products with W_hh's rows. Returns ha_n (T, H, or 1 row
        without save) and h (T, H); gates now hold r, z, n."""
        T = x.shape[0]
        G, H = W_hh.shape
        ha_n = np.empty((T if save else 1, H), x.dtype)
        h = np.empty((T, H), x.dtype)
        rec = np.empty(G, x.dtype)
        hp = h0
        for t in range(T):
            a = gates[t]
            if fill:
                for r in range(G):
                    a[r] = _dot(W_ih[r], x[t])
            for r in range(G):
                rec[r] = _dot(W_hh[r], hp)
            _gru_fwd_row(a, rec, b_ih, b_hh, hp, ha_n[t if save else 0], h[t])
            hp = h[t]
        return ha_n, h


def _packing(batch_sizes, T, B):
    """(start (T+1,), rows): step t is packed rows [start[t], start[t+1]); rows are the flat
    (T*B) grid indices of the real rows in packed order, None without batch_sizes."""
    if batch_sizes is None:
        return np.arange(T + 1) * B, None
    bs = check_batch_sizes(batch_sizes, T, B)
    start = np.concatenate([[0], np.cumsum(bs)])
    return start, np.flatnonzero(np.arange(B)[None, :] < bs[:, None])


def fused_forward(x, h0, W_ih, W_hh, b_ih=None, b_hh=None, batch_sizes=None, *, save=True):
    """reference_forward's contract, fused. The cache holds packed rows (N, ·), not (T, B, ·)."""
    dt = np.result_type(x.dtype, W_ih.dtype)
    x, h0 = np.ascontiguousarray(x, dt), np.ascontiguousarray(h0, dt)
    W_ih, W_hh = np.ascontiguousarray(W_ih, dt), np.ascontiguousarray(W_hh, dt)
    T, B, I = x.shape
    G, H = W_hh.shape
    bi = np.zeros(G, dt) if b_ih is None else np.ascontiguousarray(b_ih, dt)
    bh = np.zeros(G, dt) if b_hh is None else np.ascontiguousarray(b_hh, dt)
    start, rows = _packing(batch_sizes, T, B)
    xr = x.reshape(T * B, I) if rows is None else x.reshape(T * B, I)[rows]     # (N, I)
    if B == 1:   # one sequence: its steps in one compiled call; the cache is the same either way
        gates = _mm(xr, W_ih.T) if T > 1 else np.empty((1, G), dt)
        ha_n, h = _gru_forward_b1(xr, h0[0], W_ih, W_hh, bi, bh, gates, T == 1, save)
    else:
        gates, ha_n, h = _fused_loop(xr, h0, W_ih, W_hh, bi, bh, start, save)
    if rows is None:
        out = h.reshape(T, B, H)
        h_T = out[-1].copy()
    else:
        out = np.zeros((T * B, H), dt)
        out[rows] = h
        out = out.reshape(T, B, H)
        last = start[:-1][_lengths(start) - 1] + np.arange(B)   # each sequence's own last step
        h_T = h[last]
    if not save:
        return out, h_T, None
    cache = {"path": "fused", "xr": xr, "x_shape": x.shape, "h0": h0, "W_ih": W_ih, "W_hh": W_hh,
             "has_b_ih": b_ih is not None, "has_b_hh": b_hh is not None, "start": start,
             "rows": rows, "gates": gates, "ha_n": ha_n, "h": h}
    return out, h_T, cache


def _fused_loop(xr, h0, W_ih, W_hh, bi, bh, start, save):
    """B > 1: the input projection of every real row in one product, then per step one product
    for h_{t-1} W_hh^T and one compiled call. Returns gates (N, G), ha_n (N, H; (B, H) scratch
    without save), h (N, H), each over the packed rows."""
    B, H = h0.shape
    G, N = W_hh.shape[0], xr.shape[0]
    dt = xr.dtype
    gates = _mm(xr, W_ih.T)                 # (N, G): x W_ih^T, turned into r, z, n in place
    # ha_n is kept for backward; without one, a (B, H) scratch takes each step's in turn.
    ha_n = np.empty((N if save else B, H), dt)
    h = np.empty((N, H), dt)                # h_t of every real row
    rec = np.empty((B, G), dt)
    h_prev = h0
    with _single_blas_thread(B * H * G), _threads_per_step(np.diff(start), H * G) as threads:
        for t in range(start.shape[0] - 1):
            threads.at(t)
            s, e = start[t], start[t + 1]
            n = e - s                       # the running rows are a prefix of the previous step's
            np.matmul(h_prev[:n], W_hh.T, out=rec[:n])
            _gru_fwd_step(gates[s:e], rec[:n], bi, bh, h_prev[:n], ha_n[s:e] if save else ha_n[:n],
                          h[s:e])
            h_prev = h[s:e]
    return gates, ha_n, h


def _lengths(start):
    """Sequence lengths (B,) from the step starts: sequence b runs while b < batch_sizes[t]."""
    bs = np.diff(start)
    return (bs[None, :] > np.arange(bs[0])[:, None]).sum(axis=1)


def fused_backward(dout, dh_T, cache):
    """reference_backward's contract, fused: dx, dh0, dW_ih, dW_hh, db_ih, db_hh."""
    xr, h0, W_ih, W_hh = cache["xr"], cache["h0"], cache["W_ih"], cache["W_hh"]
    gates, ha_n, h, start, rows = cache["gates"], cache["ha_n"], cache["h"], cache["start"], cache["rows"]
    T, B, I = cache["x_shape"]
    N, G = gates.shape
    H = G // 3
    dt = xr.dtype
    dout = np.ascontiguousarray(dout, dt).reshape(T * B, H)
    dy = dout if rows is None else dout[rows]                          # (N, H)
    dxa, dha = np.empty((N, G), dt), np.empty((N, G), dt)
    # dh_{t-1} in two halves, so neither needs an extra add per step: dhz = dh_t ⊙ z from the
    # kernel, dhr = dha W_hh from BLAS. Rows that have not started (going backwards) keep dh_T.
    dhz = np.zeros((B, H), dt) if dh_T is None else np.array(dh_T, dtype=dt, order="C")
    dhr = np.zeros((B, H), dt)
    with _single_blas_thread(B * H * G), _threads_per_step(np.diff(start), H * G) as threads:
        for t in range(T - 1, -1, -1):
            threads.at(t)
            s, e = start[t], start[t + 1]
            n = e - s
            h_prev = h0 if t == 0 else h[start[t - 1] : start[t - 1] + n]
            _gru_bwd_step(gates[s:e], ha_n[s:e], h_prev[:n], dy[s:e], dhz[:n], dhr[:n],
                          dxa[s:e], dha[s:e])
            np.matmul(dha[s:e], W_hh, out=dhr[:n])
    dx_rows = _mm(dxa, W_ih)
    if rows is None:
        dx = dx_rows.reshape(T, B, I)
    else:
        dx = np.zeros((T * B, I), dt)
        dx[rows] = dx_rows
        dx = dx.reshape(T, B, I)
    if T > 1:   # the h_{t-1} of the rows of steps >= 1: the row bs[t-1] places earlier
        bs = np.diff(start)
        prev = h[: N - B] if rows is None else h[np.arange(B, N) - np.repeat(bs[:-1], bs[1:])]
        dW_hh = _mm(dha[B:].T, prev)
    else:
        dW_hh = np.zeros((dha.shape[1], h0.shape[1]), dt)
    _add_initial_state_term(dW_hh, dha[:B], h0)
    return (dx, dhz + dhr, _mm(dxa.T, xr), dW_hh, dxa.sum(axis=0) if cache["has_b_ih"] else None,
            dha.sum(axis=0) if cache["has_b_hh"] else None)


# ====================================================================== which one runs
def _use_fused():
    return AVAILABLE and os.environ.get("LSTMKIT_REFERENCE") != "1"


def gru_layer_forward(x, h0, W_ih, W_hh, b_ih=None, b_hh=None, batch_sizes=None, *, save=True):
    """One GRU layer, one direction: the fused path, or the reference when LSTMKIT_REFERENCE=1.
    x (T, B, I), h0 (B, H), W_ih (G, I), W_hh (G, H), b_ih, b_hh (G,) or None, batch_sizes (T,)
    or None. Returns out (T, B, H), h_T (B, H), cache (None when save is False)."""
    forward = fused_forward if _use_fused() and isinstance(x, np.ndarray) else reference_forward
    return forward(x, h0, W_ih, W_hh, b_ih, b_hh, batch_sizes, save=save)


def gru_layer_backward(dout, dh_T, cache):
    """Backward of gru_layer_forward, by the path that made the cache. Returns dx, dh0, dW_ih,
    dW_hh, db_ih, db_hh (None for a bias the forward did not have). Returned, not accumulated."""
    path = cache["path"]
    if path == "cuda":
        from . import cuda_layers
        return cuda_layers.gru_layer_backward(dout, dh_T, cache)
    backward = fused_backward if path == "fused" else reference_backward
    return backward(dout, dh_T, cache)
