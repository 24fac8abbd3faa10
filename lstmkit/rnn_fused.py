"""The fast path of the Elman RNN layer: functional.rnn_layer_forward / _backward with the
element-wise work of each step fused into one compiled call (tests/test_kernels.py holds it
against the reference).

Shape letters
    T   time steps    B   batch    I   input size    H   hidden size    N   real rows (packed)

RNN:  h_t = φ(x_t W_ih^T + h_{t-1} W_hh^T + b),   da = dh ⊙ φ'(a)  (1 - h² or [h > 0]).
"""

import numpy as np

from .blas import _c, _mm, _single_blas_thread, _threads_per_step
from .jit import _JIT, _tanh, njit
from .layer_rows import _input_and_weight_grads, _packed_weight_grads, _packing, _scatter
from .packed import check_batch_sizes


# ---------------------------------------------------------------------- one step, fused
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


# ---------------------------------------------------------------------- the layer
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
    W_hh_T = np.ascontiguousarray(W_hh.T)     # not the view: see lstm_fused._lstm_forward_loop
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
def _rnn_forward_packed(x, h0, W_ih, W_hh, bias, has_bias, nonlinearity, bs, save):
    """rnn_layer_forward over the real rows of a packed batch (B > 1, not all of length T)."""
    T, B, I = x.shape
    H = W_hh.shape[0]
    start, rows, last = _packing(bs, B)
    xr = x.reshape(T * B, I)[rows]
    h = _mm(xr, W_ih.T)                              # (N, H), becomes h in place
    rec = np.empty((B, H), x.dtype)
    W_hh_T = np.ascontiguousarray(W_hh.T)     # not the view: see lstm_fused._lstm_forward_loop
    relu = nonlinearity == "relu"
    h_prev = h0
    with _single_blas_thread(B * H * H), _threads_per_step(bs, H * H) as threads:
        for t in range(T):
            threads.at(t)
            s, e = start[t], start[t + 1]
            np.matmul(h_prev[: e - s], W_hh_T, out=rec[: e - s])
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
